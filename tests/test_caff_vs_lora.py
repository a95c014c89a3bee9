"""The helpers of benchmarks/caff_vs_lora.py: how budgets and arms are
picked from measured costs (fake costs here: nothing is compiled or
trained) and how two arms are compared."""

from typing import NamedTuple

import pytest

from tests import helpers


def _load():
  return helpers.load_benchmark('caff_vs_lora')


bench = _load()


class Cost(NamedTuple):
  peak_bytes: float
  flops_per_round: float = 1.0
  upload_bits: float = 8.0


# Peaks of last n = 0..4 and of LoRA ranks, shaped like the measured ones.
LAST = {n: Cost(1000 + 800 * n, 100 + 50 * n) for n in range(5)}
LORA = {1: Cost(3100, 200), 4: Cost(3200, 210), 8: Cost(3300, 220)}


def test_largest_fitting_takes_the_largest_size_that_fits():
  budget = bench.budget_of(LORA[4])
  assert bench.largest_fitting(LORA, LORA.get, budget) == 4
  assert bench.largest_fitting(LORA, LORA.get,
                               bench.budget_of(LORA[8])) == 8
  assert bench.largest_fitting(LORA, LORA.get,
                               bench.last_n_lib.Budget(3000, 1e9)) is None
  # Not assumed monotone: every size is checked.
  odd = {1: Cost(50), 2: Cost(500), 3: Cost(60)}
  assert bench.largest_fitting(odd, odd.get,
                               bench.last_n_lib.Budget(100)) == 3


def test_flops_count_in_the_budget():
  tight_flops = bench.last_n_lib.Budget(memory_bytes=1e9,
                                        flops_per_round=205)
  assert bench.largest_fitting(LORA, LORA.get, tight_flops) == 1


def test_last_n_at_a_lora_budget_is_the_largest_that_fits():
  n, _ = bench.last_n_lib.choose_n([bench.budget_of(LORA[4])], 4, LAST.get)
  assert n == [2]  # 2600 B fits 3200 B; 3400 B does not


def test_tight_budget_sits_below_n_star_and_below_every_lora():
  b = bench.tight_budget(LAST, 2, LORA[1])
  assert LAST[1].peak_bytes < b.memory_bytes < LAST[2].peak_bytes
  assert bench.largest_fitting(LORA, LORA.get, b) is None
  n, _ = bench.last_n_lib.choose_n([b], 4, LAST.get)
  assert n == [1]


def test_tight_budget_falls_below_the_cheapest_lora():
  # Here last-2's peak is above LoRA r1's: the midpoint of last-1 and
  # last-2 would fit LoRA, so the budget drops below LoRA r1.
  last = {**LAST, 2: Cost(3500, 150)}
  b = bench.tight_budget(last, 2, LORA[1])
  assert last[1].peak_bytes < b.memory_bytes < LORA[1].peak_bytes
  assert bench.largest_fitting(LORA, LORA.get, b) is None


def test_tight_budget_needs_a_layer_to_train():
  with pytest.raises(ValueError):
    bench.tight_budget(LAST, 0, LORA[1])


def _result(accs):
  import numpy as np  # pylint: disable=g-import-not-at-top
  return dict(accuracy_per_seed=accs, accuracy_mean=float(np.mean(accs)),
              accuracy_sd=float(np.std(accs, ddof=1)) if len(accs) > 1
              else None)


def test_compare():
  a = _result([0.90, 0.91, 0.92])
  assert bench.compare(a, _result([0.80, 0.81, 0.82])) == 'wins'
  assert bench.compare(_result([0.80, 0.81, 0.82]), a) == 'loses'
  assert bench.compare(a, _result([0.89, 0.92, 0.90])) == 'ties'
  assert bench.compare(a, None) == 'unopposed'
  assert bench.compare(_result([0.9]), _result([0.8])).startswith(
      'inconclusive')


def test_mixed_module_arm_trains_the_head_only_where_no_module_fits():
  arm = bench.module_arm('lora', 4, (True, False, False))
  assert arm.tiers == pytest.approx((1 / 3,) * 3)
  assert dict(arm.model_kw) == {'lora_rank': 4}
  n = [dict(e) for e in arm.entries if dict(e)['name'] == 'last_n'][0]['n']
  assert n == (0, bench.ARCH['num_layers'], bench.ARCH['num_layers'])


def test_grid_is_extended_once_beyond_the_edge_where_the_best_lies():
  def tried(accs):
    return {lr: {'heldout_accuracy': a} for lr, a in accs.items()}

  ran = []

  def run(acc):
    def f(lr):
      ran.append(lr)
      return {'heldout_accuracy': acc}
    return f

  # Best inside the grid: nothing more is run.
  assert bench.extend_grid(tried({3e-3: .7, 1e-2: .8, 3e-2: .6}),
                           run(.9)) == 1e-2
  assert ran == []
  # Best at the low edge: one step down (1e-3); kept when better.
  t = tried({3e-3: .8, 1e-2: .7, 3e-2: .6})
  assert bench.extend_grid(t, run(.9)) == pytest.approx(1e-3)
  assert ran == [pytest.approx(1e-3)] and len(t) == 4
  # Best at the high edge: one step up (0.1), not kept when worse, and
  # only once even though 3e-2 is still the best at the new grid's edge.
  ran.clear()
  assert bench.extend_grid(tried({3e-3: .6, 1e-2: .7, 3e-2: .8}),
                           run(.5)) == 3e-2
  assert ran == [pytest.approx(0.1)]
  # Extended up to twice: 3e-2 -> 0.1 -> 0.3 while the edge keeps winning,
  # and no further than asked.
  ran.clear()
  t = tried({3e-3: .6, 1e-2: .7, 3e-2: .8})
  assert bench.extend_grid(
      t, lambda lr: ran.append(lr) or {'heldout_accuracy': 1 + lr}, 2) == \
      pytest.approx(0.3)
  assert ran == [pytest.approx(0.1), pytest.approx(0.3)]
  # It stops once the best is inside the grid.
  ran.clear()
  assert bench.extend_grid(tried({3e-3: .6, 1e-2: .7, 3e-2: .8}),
                           run(.5), 3) == 3e-2
  assert ran == [pytest.approx(0.1)]
  # One rate: nothing to extend.
  ran.clear()
  assert bench.extend_grid(tried({1e-2: .5}), run(.9)) == 1e-2
  assert ran == []


def _arm(name, accs, flops=1e8):
  return dict(_result(accs), arm=name, flops_per_round=flops)


def test_judge_says_whether_last_n_beats_lora():
  results = {
      'tight': {'last_n': _arm('last_1', [.84, .85, .83]),
                'lora': {'fits': False}, 'adapter': {'fits': False}},
      'lora_r4': {'last_n': _arm('last_2', [.86, .87, .85]),
                  'lora': _arm('lora_r4', [.86, .85, .87]),
                  'adapter': _arm('adapter_d16', [.80, .81, .82])},
      'unconstrained': {'head': _arm('head', [.73, .74, .72])}}
  verdict, summary = bench.judge(results, ['tight', 'lora_r4'])
  assert summary.startswith('The claim does not hold here')
  assert 'ties at lora_r4' in summary and 'unopposed at tight' in summary
  assert 'vs head only' in verdict['tight']
  assert 'wins' in verdict['tight']
  results['lora_r4']['lora'] = _arm('lora_r4', [.80, .79, .81])
  assert bench.judge(results, ['tight', 'lora_r4'])[1].startswith(
      'The claim holds here')
  results['lora_r4']['lora'] = _arm('lora_r4', [.80])
  assert 'cannot be judged' in bench.judge(results, ['tight', 'lora_r4'])[1]


def test_an_arm_not_run_is_said_and_left_out_of_the_claim():
  results = {
      'lora_r4': {'last_n': _arm('last_2', [.86, .87, .85]),
                  'lora': _arm('lora_r4', [.80, .79, .81]),
                  'adapter': {'not_run': True, 'planned': 'adapter_d64'}},
      'lora_r8': {'last_n': _arm('last_2', [.86, .87, .85]),
                  'lora': {'not_run': True, 'planned': 'lora_r8'},
                  'adapter': {'not_run': True, 'planned': 'adapter_d64'}},
      'mixed': {'last_n': {'not_run': True, 'planned': 'last_n1_2_2'},
                'lora': _arm('lora_r4_mixed', [.7, .71, .72]),
                'adapter': {'fits': False}}}
  verdict, summary = bench.judge(results, ['lora_r4', 'lora_r8', 'mixed'])
  assert summary.startswith('The claim holds here')  # only lora_r4 judged
  assert 'not run at lora_r8' in summary
  assert 'vs lora_r8: not run' in verdict['lora_r8']
  assert verdict['mixed'] == 'last_n1_2_2: not run'
  # Where no module fits and head-only was not run either.
  results['tight'] = {'last_n': _arm('last_1', [.84, .85, .83]),
                      'lora': {'fits': False}, 'adapter': {'fits': False}}
  results['unconstrained'] = {'head': {'not_run': True, 'planned': 'head'}}
  verdict, _ = bench.judge(results, ['tight', 'lora_r4'])
  assert 'head only' not in verdict['tight']


def test_runs_are_cached_by_their_settings_and_resumed(tmp_path,
                                                       monkeypatch):
  """A run's metrics are reused only under the same settings; an arm that
  may not train and is not cached raises NotRun."""
  trained = []

  def fake_train(config, workdir):
    trained.append((config.client.learning_rate, config.seed))
    acc = 0.5 + config.client.learning_rate + 0.01 * config.seed
    return {'final_metrics': {'test_accuracy': acc, 'heldout_accuracy': acc,
                              'name': 'not a number'}}

  monkeypatch.setattr(bench.train_lib, 'train_and_evaluate', fake_train)
  args = bench.argparse.Namespace(
      backbone=bench.make_backbone('vit'), rounds=2, clients_per_round=3,
      pretrain_steps=10, data_dir='', workdir=str(tmp_path), seeds=[0, 1],
      lrs=[0.1, 0.2, 0.3])
  arm = bench.BASELINES['head']
  first = bench.run_arm(args, arm, 'ckpt', print)
  # 0.3 is the best at the edge: the grid grows once, to 1; then seed 1.
  assert first['lr'] == 1.0 and len(trained) == 5
  assert first['accuracy_per_seed'] == pytest.approx([1.5, 1.51])
  assert bench.run_arm(args, arm, 'ckpt', print, may_train=False) == first
  assert len(trained) == 5  # all from the cache
  args.rounds = 3  # other settings: nothing cached applies
  with pytest.raises(bench.NotRun):
    bench.run_arm(args, arm, 'ckpt', print, may_train=False)
  bench.run_arm(args, arm, 'ckpt', print)
  assert len(trained) == 10


def test_text_backbone_and_its_float16_copy(tmp_path):
  """The text arm's backbone: MiniLM's 6 blocks, token-id batches, and the
  float16 copy made for a machine it must be carried to loads as the same
  model to float16 precision."""
  try:
    src = bench.hf.minilm_dir()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  import numpy as np  # pylint: disable=g-import-not-at-top
  b = bench.make_backbone('minilm')
  assert (b.num_layers, b.num_classes, b.model_dir) == (6, 10, src)
  assert b.batch_x.shape == (bench.BATCH, bench.TEXT_SEQ_LEN)
  assert b.batch_x.dtype == np.int32 and b.pretrained_elsewhere
  arm = bench.module_arm('adapter', 8, (True, False), num_layers=6)
  n = [dict(e) for e in arm.entries if dict(e)['name'] == 'last_n'][0]['n']
  assert n == (0, 6)
  out = str(tmp_path / 'f16')
  bench.write_f16(out)
  assert bench.make_backbone('minilm', out).arch == b.arch
  full, half = bench.hf.load_bert(src), bench.hf.load_bert(out)
  for (path, a), (_, h) in zip(
      bench.jax.tree_util.tree_leaves_with_path(full),
      bench.jax.tree_util.tree_leaves_with_path(half)):
    assert h.dtype == np.float32, path
    np.testing.assert_allclose(h, a, rtol=1e-3, atol=1e-4, err_msg=str(path))
  with pytest.raises(ValueError, match='minilm'):
    bench.make_backbone('bert')
