"""benchmarks/lm_study.py's grid, without training: model sizes per
`--size`, the drawn-subset arms, the paper-scale cells for an accelerator,
and the seed/server-lr bookkeeping."""

import jax
import numpy as np

from fedjax_eff.models import get_model
from tests import helpers


def _load():
  return helpers.load_benchmark('lm_study')


def _num_params(c) -> int:
  m = get_model(c.model.name, c.data.vocab_size, **c.model.kwargs)
  p = jax.eval_shape(lambda: m.init(jax.random.key(0),
                                    np.zeros((1, 4), np.int32)))
  return sum(x.size for x in jax.tree.leaves(p))


def test_sizes_drawn_subsets_and_paper_cells():
  lm = _load()
  sizes = {n: _num_params(lm.config(n, 2, 2, 1, '4m'))
           for n in ('lstm_fedadam', 'tf_fedadam', 'cf_fedadam',
                     'lstm_small_fedadam')}
  # Ro et al.'s comparison: same-size ~3.7M models and the 0.6M LSTM.
  for n in ('lstm_fedadam', 'tf_fedadam', 'cf_fedadam'):
    assert 3.0e6 < sizes[n] < 4.5e6, sizes
  assert 0.5e6 < sizes['lstm_small_fedadam'] < 0.7e6
  assert _num_params(lm.config('tf_fedadam', 2, 2, 1, '0.6m')) < 0.7e6
  # Drawn subsets: two of the four blocks per round / per client.
  for name, mode in lm.DRAWN.items():
    t = lm.config(name, 2, 2, 1).techniques[0]
    assert (t.name, t.mode, t.num_layers) == ('partial_training', mode, 2)
  c = lm.config('tf_fedyogi', 2, 2, 1, seed=3, server_lr_scale=0.3)
  assert c.seed == 3 and np.isclose(c.server.learning_rate, 0.3e-2)
  # The paper-scale cells: ~20M models, 10k vocabulary, 50 clients/round.
  paper = lm.config('tf_partial_q4', 2, 2, 1, 'paper')
  assert paper.clients_per_round == 50 and paper.client.epochs == 1
  assert paper.model.kwargs.vocab_size == 10_004
  assert [t.name for t in paper.techniques] == ['partial_training',
                                                'quantize']
  assert lm.config('lstm_fedavg', 2, 2, 1, 'paper').model.kwargs.preset == (
      'large')
  # Ro et al.'s small LSTM at paper scale is Stack Overflow's 4M one; at
  # '4m' every small LSTM is the 0.6M one, whatever its server.
  small_paper = lm.config('lstm_small_fedyogi', 2, 2, 1, 'paper')
  assert small_paper.model.kwargs.preset == 'stackoverflow'
  for n in lm.SMALL_LSTMS:
    assert _num_params(lm.config(n, 2, 2, 1, '4m')) == sizes[
        'lstm_small_fedadam']


def test_cells_from_two_processes_are_all_kept(tmp_path):
  """One process per core shares a cells file: each re-reads it under the
  lock before writing, so neither overwrites the other's finished runs."""
  import json
  import multiprocessing
  lm = _load()
  path = str(tmp_path / 'cells.json')
  settings = dict(rounds=2, size='4m')

  ctx = multiprocessing.get_context('fork')
  procs = [ctx.Process(target=_add_cells, args=(path, settings, tag))
           for tag in ('a', 'b')]
  for p in procs:
    p.start()
  for p in procs:
    p.join()
  cells = lm.read_cells(path, settings)
  assert sorted(cells) == sorted(f'{t}|{i}' for t in 'ab' for i in range(20))
  assert lm.read_cells(path, dict(settings, rounds=3)) == {}  # other run
  with open(path) as f:
    assert json.load(f)['settings'] == settings


def _add_cells(path, settings, tag):
  lm = _load()
  for i in range(20):
    lm.add_cell(path, settings, f'{tag}|{i}', dict(perplexity=float(i)))


def test_each_seed_pretrains_in_its_own_directory(tmp_path, monkeypatch):
  """A pretrained arm's seeds do not share one pretraining workdir (the
  second seed's config would be refused as another run's), and the grid
  points of one seed share one, with one config."""
  import types
  lm = _load()
  pretrained, inits = [], []
  monkeypatch.setattr(lm.pretrain_lib, 'pretrain', lambda c, d: (
      pretrained.append((c.seed, d, c.to_json())) or
      dict(steps=1, test_loss=1.0)))

  def fake_train(c, wd):
    inits.append(c.init_checkpoint)
    return dict(num_params=1, final_metrics=dict(
        upload_bits=8, download_bits=8, test_perplexity=2.0,
        test_accuracy=0.5, train_loss=0.7))
  monkeypatch.setattr(lm.train_lib, 'train_and_evaluate', fake_train)
  args = types.SimpleNamespace(rounds=2, clients=2, steps=1, size='4m')
  for seed in (0, 1):
    lm.run_cell('tf_pre_partial_q4', args, str(tmp_path), seed, 0.3)
  assert [s for s, _, _ in pretrained] == [0, 1]
  assert len({d for _, d, _ in pretrained}) == 2
  assert inits == [d for _, d, _ in pretrained]
  # The server-lr grid shares a seed's pretraining: one directory and one
  # config (no server lr in it that a grid point could change).
  lm.run_cell('tf_pre_partial_q4', args, str(tmp_path), 0, 1.0)
  assert pretrained[2][1:] == pretrained[0][1:]
  assert inits[2] == inits[0]


def test_claims_judge_pretrained_arms_apart(tmp_path):
  """The 10x-less-upload claim and the best Transformer against the 0.6M
  LSTM, from the rows; an arm pretrained on extra modules is its own
  claim."""
  import json
  import types
  lm = _load()

  def row(ppl, up):
    return dict(num_params=1, server_lr=0.003, spec='s', seconds=1.0,
                upload_bytes_per_client_round=up, perplexity=ppl,
                perplexity_sd=1.0, accuracy=0.2, seeds=[0, 1, 2])
  rows = dict(lstm_fedadam=row(80.0, 14e6), lstm_small_fedadam=row(75.0, 2e6),
              tf_q4=row(90.0, 2e6), tf_partial_per_round_q4=row(69.0, 1e6),
              tf_partial_q4=row(96.0, 1e6), tf_pre_partial_q4=row(45.0, 1e6))
  out = str(tmp_path / 'lm.json')
  lm.write_results(types.SimpleNamespace(out=out, size='4m'), dict(size='4m'),
                   rows, str(tmp_path / 'lm'))
  with open(out) as f:
    claims = json.load(f)['claims']
  assert claims['tf_10x_less_upload_at_lstm_perplexity'] == [
      'tf_partial_per_round_q4', 'tf_pre_partial_q4']
  assert claims['best_tf_vs_small_lstm'] == dict(
      variant='tf_partial_per_round_q4', ratio=69.0 / 75.0)
  assert claims['best_pretrained_tf_vs_small_lstm'] == dict(
      variant='tf_pre_partial_q4', ratio=45.0 / 75.0)
  assert claims['best_same_size_lstm'] == 'lstm_fedadam'
  assert claims['best_small_lstm'] == 'lstm_small_fedadam'
  # A better small LSTM under another server optimizer is the bar for the
  # "below the small LSTM" claim; a diverged one (NaN) never is.
  rows.update(lstm_small_fedyogi=row(60.0, 2e6),
              lstm_small_fedavg=row(float('nan'), 2e6))
  lm.write_results(types.SimpleNamespace(out=out, size='4m'), dict(size='4m'),
                   rows, str(tmp_path / 'lm'))
  with open(out) as f:
    claims = json.load(f)['claims']
  assert claims['best_small_lstm'] == 'lstm_small_fedyogi'
  assert claims['best_tf_vs_small_lstm'] == dict(
      variant='tf_partial_per_round_q4', ratio=69.0 / 60.0)

  # A better-tuned LSTM under another server optimizer raises the bar.
  rows['lstm_fedyogi'] = row(68.0, 14e6)
  lm.write_results(types.SimpleNamespace(out=out, size='4m'), dict(size='4m'),
                   rows, str(tmp_path / 'lm'))
  with open(out) as f:
    claims = json.load(f)['claims']
  assert claims['best_same_size_lstm'] == 'lstm_fedyogi'
  assert claims['tf_10x_less_upload_at_lstm_perplexity'] == [
      'tf_pre_partial_q4']

  # A diverged LSTM (NaN) is never the bar.
  rows['lstm_fedavg'] = row(float('nan'), 14e6)
  lm.write_results(types.SimpleNamespace(out=out, size='4m'), dict(size='4m'),
                   rows, str(tmp_path / 'lm'))
  with open(out) as f:
    claims = json.load(f)['claims']
  assert claims['best_same_size_lstm'] == 'lstm_fedyogi'
