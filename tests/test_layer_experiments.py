"""Layer-structured techniques as a user runs them: configs end to end.

Layer-wise SSL (a contrastive ViT, one layer per stage, depth dropout per
chunk) resumes mid-schedule to the same parameters as an unbroken run, its
linear-probe accuracy and the per-stage device cost land in metrics.jsonl
and summary.json; budget-aware last-n runs heterogeneous tiers in one round
and reports their costs per tier.
"""

import json

import numpy as np

from fedjax_eff.experiment import train_and_evaluate
from tests.test_experiment import load_config, override


def tiny(c, **overrides):
  c.num_rounds, c.clients_per_round = 4, 4
  c.data.num_clients, c.data.heldout_clients = 20, 3
  c.client.local_steps, c.client.batch_size = 2, 8
  c.eval_every, c.checkpoint_every, c.progress = 2, 1, False
  return override(c, **overrides)


def layerwise_ssl(**overrides):
  c = load_config('layerwise_ssl')
  c.model.kwargs.update(num_layers=2, d_model=16, num_heads=2, mlp_dim=32,
                        head_hidden=16, num_classes=8)
  c.techniques[0].rounds_per_layer = 2   # stages: layer 0, 0, 1, 1
  c.task.probe_steps, c.task.probe_max_examples = 30, 300
  return tiny(c, **overrides)


def test_layerwise_ssl_resumes_mid_schedule_and_reports_device_cost(
    tmp_path):
  straight = train_and_evaluate(layerwise_ssl(), str(tmp_path / 'a'))
  # The resumed run skips device accounting (it does not touch training).
  train_and_evaluate(layerwise_ssl(num_rounds=3, accounting=False,
                                   eval_every=10), str(tmp_path / 'b'))
  resumed = train_and_evaluate(layerwise_ssl(accounting=False, eval_every=10),
                               str(tmp_path / 'b'))
  assert resumed['resumed_from_round'] == 3
  assert resumed['params_sha256'] == straight['params_sha256']

  lines = [json.loads(l) for l in open(tmp_path / 'a' / 'metrics.jsonl')]
  assert [l['round'] for l in lines] == [1, 2, 3, 4]
  # The linear probe of the SSL features is the accuracy reported.
  assert 0.2 < lines[1]['test_accuracy'] <= 1.0
  assert 'probe_train_accuracy' in lines[3]
  # Stage 1 (layer 1 active) runs deeper: more FLOPs and a bigger download;
  # the upload is one block + its head in both stages, plus the embedding
  # in stage 0 (it trains with the first layer).
  s0, s1 = lines[0], lines[2]
  assert s1['device_flops_per_round'] > s0['device_flops_per_round']
  assert s1['download_bits'] > s0['download_bits']
  assert s0['upload_bits'] > s1['upload_bits'] > 0
  for l in lines:
    assert l['device_peak_bytes'] > 0
  summary = json.load(open(tmp_path / 'a' / 'summary.json'))
  assert summary['technique'] == 'layerwise+depth_dropout'
  stages = {c['stage'] for c in summary['device_cost']}
  assert len(stages) == 2, stages
  # Stage 1 with depth dropout: a device that skipped frozen block 0 runs
  # (and is charged) a cheaper program than one that did not. (Each
  # variant its own measurement: their gates are NumPy arrays, once left
  # out of the cost cache's key.)
  stage1 = summary['device_cost'][-1]['stage']  # (rows in stage order)
  variants = {c['variant']: c for c in summary['device_cost']
              if c['variant'] is not None and c['stage'] == stage1}
  assert set(variants) == {0, 1}, summary['device_cost']
  assert (variants[1]['device_flops_per_round']
          < variants[0]['device_flops_per_round'])


def test_budgeted_last_n_tiers_in_one_round(tmp_path):
  c = tiny(load_config('caff_tiers'), num_rounds=2, clients_per_round=10)
  c.data.num_clients = 40
  c.model.kwargs.update(num_layers=2, d_model=32, mlp_dim=64)
  # Upload budgets pick n exactly: a block is 8,512 values (34 kB), the
  # head 394 (1.6 kB): tier 0 affords the head only, tier 1 one block.
  budgets = [dict(memory_bytes=1e9, flops_per_round=1e12, upload_bytes=2e4),
             dict(memory_bytes=1e9, flops_per_round=1e12, upload_bytes=5e4),
             dict(memory_bytes=1e9, flops_per_round=1e12, upload_bytes=1e9)]
  c.techniques[0].budgets = budgets
  summary = train_and_evaluate(c, str(tmp_path / 'caff'))
  assert summary['technique'] == 'last_n0_1_2'
  line = [json.loads(l) for l in open(tmp_path / 'caff' / 'metrics.jsonl')][-1]
  ups = [line.get(f'tier{t}/upload_bits') for t in range(3)]
  present = [u for u in ups if u is not None]
  assert len(present) >= 2 and present == sorted(present), ups
  costs = {c['tier']: c for c in summary['device_cost']}
  for t, b in enumerate(budgets):
    assert costs[t]['upload_bits'] / 8 <= b['upload_bytes']
    assert costs[t]['device_peak_bytes'] > 0
  assert (costs[0]['device_peak_bytes'] < costs[1]['device_peak_bytes']
          < costs[2]['device_peak_bytes'])
  assert (costs[0]['device_flops_per_round']
          < costs[2]['device_flops_per_round'])
  assert np.isfinite(line['train_loss'])


def test_every_config_loads_and_validates():
  import glob
  import os
  from fedjax_eff.experiment.validation import validate_config
  names = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
      '*.py'))]
  assert {'default', 'layerwise_ssl', 'caff_tiers', 'partial_vit'} <= set(
      names)
  for name in names:
    validate_config(load_config(name))
