"""Fully-local training (config.mode='local'): no server, no averaging."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from fedjax_eff import core
from fedjax_eff.data import FederatedData, pack
from fedjax_eff.experiment import Experiment, train_and_evaluate
from fedjax_eff.experiment import local
from tests import helpers
from tests.test_experiment import tiny_config


def _setup(clients=3, steps=3, batch=4):
  """A tiny MLP, its single-client update, and 3 ragged clients."""
  kw, params = helpers.tiny_setup('mlp', model_kwargs=dict(hidden=(16,)))
  fns = core.build_round(**kw, donate=False)
  data = helpers.ragged_clients(sizes=(5, 17, 9)[:clients])
  return fns.client_update, params, data, dict(steps=steps, batch=batch)


def _cohort(data, round_num, steps, batch):
  return pack(data, np.arange(data.num_clients), steps=steps,
              batch_size=batch, seed=0, round_num=round_num)


def _run_vectorised(client_update, params, data, rounds, shape, chunk=2):
  """`rounds` rounds of the vectorised local step (C=2 of 3 clients: a
  vmapped chunk and a remainder)."""
  step = jax.jit(local.build_local_step(client_update, chunk_size=chunk))
  stacked = local.stack(params, data.num_clients)
  for r in range(rounds):
    c = _cohort(data, r, **shape)
    keys = core.round.client_keys(jax.random.key(r), data.num_clients)
    stacked, _ = step(stacked, dict(c.batches), c.mask, dict(c.ctx), keys,
                      np.int32(r))
  return stacked


def test_vectorised_equals_per_client_loop():
  client_update, params, data, shape = _setup()
  rounds = 2
  stacked = _run_vectorised(client_update, params, data, rounds, shape)
  single = jax.jit(client_update)
  for i in range(data.num_clients):
    p = params
    for r in range(rounds):
      c = _cohort(data, r, **shape)
      key = core.round.client_keys(jax.random.key(r), data.num_clients)[i]
      out = single(p, {k: v[i] for k, v in c.batches.items()}, c.mask[i],
                   {k: v[i] for k, v in c.ctx.items()}, key, np.int32(r))
      p = jax.tree.map(lambda x, d: x - d, p, out.delta)  # Δ = start - end
    assert helpers.max_abs_diff(local.unstack(stacked, i), p) < 1e-5
    assert helpers.max_abs_diff(p, params) > 1e-3  # it did train


def test_no_averaging_params_depend_only_on_own_data():
  client_update, params, data, shape = _setup()
  base = _run_vectorised(client_update, params, data, 2, shape)
  # Client 1 gets entirely different data (same size).
  clients = {cid: data.client(cid) for cid in data.client_ids}
  other = dict(clients[data.client_ids[1]])
  other['x'] = other['x'][::-1] * -3.0
  other['y'] = (other['y'] + 1) % 5
  clients[data.client_ids[1]] = other
  changed = _run_vectorised(client_update, params, FederatedData(clients),
                            2, shape)
  for i in (0, 2):
    assert helpers.max_abs_diff(local.unstack(base, i),
                                local.unstack(changed, i)) < 1e-6
  assert helpers.max_abs_diff(local.unstack(base, 1),
                              local.unstack(changed, 1)) > 1e-3


def _local_config(**overrides):
  return tiny_config(**{'mode': 'local', 'num_rounds': 4, 'eval_every': 2,
                        'tensorboard': False, 'accounting': False,
                        'local.num_clients': 4, **overrides})


def test_local_run_outputs_and_resume_equals_unbroken(tmp_path):
  straight = train_and_evaluate(_local_config(accounting=True),
                                str(tmp_path / 'a'))
  assert straight['mode'] == 'local' and straight['rounds'] == 4
  train_and_evaluate(_local_config(num_rounds=2), str(tmp_path / 'b'))
  resumed = train_and_evaluate(_local_config(), str(tmp_path / 'b'))
  assert resumed['resumed_from_round'] == 2
  assert resumed['params_sha256'] == straight['params_sha256']

  lines = [json.loads(l) for l in open(tmp_path / 'a' / 'metrics.jsonl')]
  assert [l['round'] for l in lines] == [1, 2, 3, 4]
  for l in lines:
    assert l['upload_bits'] == 0 and l['download_bits'] == 0
    assert l['num_clients'] == 4 and np.isfinite(l['train_loss'])
  assert 'test_accuracy' in lines[1] and 'test_accuracy' not in lines[2]
  assert 'device_peak_bytes' in lines[0]
  final = straight['final_metrics']
  assert (final['test_accuracy_min'] <= final['test_accuracy']
          <= final['test_accuracy_max'])
  assert 'heldout_accuracy' in final and 'test_loss' in final
  # The training loss falls as each client fits its own data.
  assert lines[-1]['train_loss'] < lines[0]['train_loss']
  resumed_lines = [json.loads(l)
                   for l in open(tmp_path / 'b' / 'metrics.jsonl')]
  assert ([l['train_loss'] for l in resumed_lines]
          == [l['train_loss'] for l in lines])

  summary = json.load(open(tmp_path / 'a' / 'summary.json'))
  for key in ('final_metrics', 'wall_time_seconds', 'config', 'versions',
              'params_sha256', 'device_cost', 'communication', 'clients'):
    assert key in summary
  assert summary['config']['mode'] == 'local'
  assert len(summary['clients']) == 4
  comm = summary['communication']
  assert comm['initial_download_bits_per_client'] == 32 * summary['num_params']
  assert comm['upload_bits_total'] == 0
  assert summary['initial_download_bits'] == comm[
      'initial_download_bits_per_client']
  assert '4' in os.listdir(tmp_path / 'a' / 'checkpoints')
  # Nothing left to do: the same params, the summary still complete.
  again = train_and_evaluate(_local_config(), str(tmp_path / 'b'))
  assert again['params_sha256'] == straight['params_sha256']
  assert again['final_metrics']['test_accuracy'] == pytest.approx(
      final['test_accuracy'])


def test_bad_mode_and_mixed_workdir_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match=r'config\.mode'):
    train_and_evaluate(tiny_config(mode='lokal'), str(tmp_path / 'a'))
  with pytest.raises(ValueError, match=r'config\.local\.num_clients'):
    train_and_evaluate(_local_config(**{'local.num_clients': 21}),
                       str(tmp_path / 'a'))
  # A federated run's workdir is not resumed as a local one.
  wd = tmp_path / 'fed'
  os.makedirs(wd / 'checkpoints')
  (wd / 'config.json').write_text(json.dumps({'mode': 'federated'}))
  with pytest.raises(ValueError, match='fresh --workdir'):
    train_and_evaluate(_local_config(), str(wd))


def _changed_leaves(before, after):
  flat_b = jax.tree_util.tree_flatten_with_path(before)[0]
  flat_a = jax.tree.leaves(after)
  return {jax.tree_util.keystr(p) for (p, b), a in zip(flat_b, flat_a)
          if not np.array_equal(np.asarray(b), np.asarray(a))}


def test_head_only_local_training_changes_only_the_head():
  c = _local_config(**{'model.name': 'vit', 'local.num_clients': 3})
  c.model.kwargs = ml_collections.ConfigDict(dict(
      preset='tiny', num_layers=2, d_model=16, num_heads=2, mlp_dim=32,
      patch_size=2))
  c.techniques = [ml_collections.ConfigDict(dict(
      name='partial_training', layers=(), train_head=True))]
  exp = Experiment(c)
  trainer = local.LocalTrainer(exp)
  params = trainer.init()
  start = jax.tree.map(np.asarray, params)
  for r in range(2):
    params, stats = trainer.round(params, trainer.cohort(r), r)
    assert stats['finite'].all()
  for i in range(trainer.num_clients):
    changed = _changed_leaves(local.unstack(start, i),
                              local.unstack(params, i))
    assert changed and all(k.startswith("['head']") for k in changed), changed


def test_tiered_programs_each_client_trains_its_tiers_layers():
  """last_n with n=(1, 2) over two tiers: one call per tier, and each
  client moves exactly the layers of its own tier's program."""
  c = _local_config(**{'local.num_clients': 6,
                       'devices.tier_fractions': [0.5, 0.5]})
  c.model.kwargs.hidden = (16, 16)
  c.techniques = [ml_collections.ConfigDict(dict(name='last_n', n=(0, 1)))]
  exp = Experiment(c)
  trainer = local.LocalTrainer(exp)
  assert len(trainer.groups) == 2  # both tiers present among 6 clients
  params = trainer.init()
  start = jax.tree.map(np.asarray, params)
  params, _ = trainer.round(params, trainer.cohort(0), 0)
  for i, tier in enumerate(trainer.tiers):
    tops = {k.split("'")[1] for k in _changed_leaves(
        local.unstack(start, i), local.unstack(params, i))}
    assert tops == ({'head'} if tier == 0 else {'head', 'dense1'})


def test_local_mode_runs_no_upload_codec(tmp_path):
  """Nothing is uploaded, so a quantizer must not touch local updates: the
  run equals the same run without it, bit for bit."""
  plain = train_and_evaluate(_local_config(num_rounds=2),
                             str(tmp_path / 'plain'))
  quantized = train_and_evaluate(
      _local_config(num_rounds=2, techniques=[ml_collections.ConfigDict(
          dict(name='quantize', bits=1, block_size=0))]),
      str(tmp_path / 'q1'))
  assert quantized['params_sha256'] == plain['params_sha256']
  assert quantized['final_metrics']['upload_bits'] == 0.0
