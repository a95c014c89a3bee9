"""Local epochs as users define them (issue 18, item 1).

`client.epochs` E and `client.max_examples` M: a client with n examples
trains on m = min(n, M) of them, E times, in E x ceil(m / B) steps (each
epoch a fresh order, its last batch partial), weight m; the round's S is
the largest client's step count and the rest is padding.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from fedjax_eff.data import cohort as cohort_lib
from fedjax_eff.experiment import build, train_and_evaluate
from tests import helpers
from tests.test_experiment import tiny_config

SIZES = (3, 7, 20, 40, 1, 12, 9)
B, E, M = 4, 2, 16


def _data():
  data = helpers.ragged_clients(SIZES)
  # Example j of client i is recognisable by its first pixel: 1000 i + j + 1.
  for i, cid in enumerate(data.client_ids):
    x = data.client(i)['x']
    x[:, 0, 0, 0] = 1000 * i + np.arange(len(x)) + 1
  return data


def test_epoch_steps_is_the_largest_clients_epochs():
  assert cohort_lib.epoch_steps(np.array(SIZES), B, E, M) == E * 4
  assert cohort_lib.epoch_steps(np.array(SIZES), B, E) == E * 10
  assert cohort_lib.epoch_steps(np.array(SIZES), 16, 1, 1000) == 3


def test_each_client_runs_its_own_epochs():
  data = _data()
  ids = np.arange(len(SIZES))
  steps = cohort_lib.epoch_steps(data.client_sizes, B, E, M)
  kw = dict(steps=steps, batch_size=B, seed=3, round_num=5, epochs=E,
            max_examples=M)
  cohort = cohort_lib.pack(data, ids, **kw)
  for slot, n in enumerate(SIZES):
    m = min(n, M)
    per_epoch = -(-m // B)
    real = cohort.mask[slot].sum(axis=1)
    # Steps: E ceil(m / B) with examples, the rest padding.
    assert (real[:E * per_epoch] > 0).all() and (real[E * per_epoch:] == 0
                                                  ).all()
    assert real.sum() == E * m
    assert cohort.weight[slot] == m
    tags = cohort.batches['x'][slot, ..., 0, 0, 0]
    epochs = [tags[e * per_epoch:(e + 1) * per_epoch][
        cohort.mask[slot, e * per_epoch:(e + 1) * per_epoch] > 0]
              for e in range(E)]
    # Every epoch sees the same m distinct examples once, each its own
    # order; a client with n > M trains on m of them.
    assert len(set(epochs[0])) == m
    for ep in epochs:
      assert sorted(ep) == sorted(epochs[0])
    assert set(epochs[0]) <= set(1000 * slot + np.arange(n) + 1)
    # What its device runs, and is charged for (`device_metrics`).
    assert cohort.steps_run[slot] == E * per_epoch
  # The device-resident twin selects the very same rows.
  resident = cohort_lib.ResidentData.of(data)
  indexed = cohort_lib.pack_index(resident, ids, **kw)
  gathered = resident.examples['x'][indexed.batches[cohort_lib.ROWS]]
  np.testing.assert_array_equal(gathered, cohort.batches['x'])
  np.testing.assert_array_equal(indexed.mask, cohort.mask)
  np.testing.assert_array_equal(indexed.weight, cohort.weight)


def test_round_with_epochs_equals_the_reference_loop():
  data = helpers.ragged_clients(SIZES)
  steps = cohort_lib.epoch_steps(data.client_sizes, B, E, M)
  cohort = cohort_lib.pack(data, np.arange(len(SIZES)), steps=steps,
                           batch_size=B, seed=0, round_num=0, epochs=E,
                           max_examples=M)
  kw, params = helpers.tiny_setup()
  helpers.round_vs_reference(kw, params, cohort, jax.random.key(0))


def test_epochs_from_the_config(tmp_path):
  # Clients hold 32 to 93 examples: 4 to 8 steps per epoch under M = 60.
  c = tiny_config(num_rounds=2, **{'client.epochs': 2,
                                   'client.max_examples': 60})
  exp = build.Experiment(c)
  sizes = exp.data.train.client_sizes
  assert exp.local_steps == 2 * -(-min(int(sizes.max()), 60) // 8)
  summary = train_and_evaluate(c, str(tmp_path / 'run'))
  assert summary['rounds'] == 2
  line = json.loads(open(tmp_path / 'run' / 'metrics.jsonl').readline())
  assert np.isfinite(line['train_loss'])
  # Each device is charged its own steps: one step's FLOPs x its E
  # ceil(m / B) steps, not the cohort's S (those of its largest client).
  cohort = exp.cohort(0).cohort
  assert line['device_local_steps'] == pytest.approx(cohort.steps_run.mean())
  assert 0 < line['device_local_steps'] < exp.local_steps
  per_round_at_s = summary['device_cost'][0]['device_flops_per_round']
  assert line['device_flops_per_round'] == pytest.approx(
      per_round_at_s * cohort.steps_run.mean() / exp.local_steps, rel=1e-6)
  with pytest.raises(ValueError, match='config.client.epochs must be >= 0'):
    build.Experiment(tiny_config(**{'client.epochs': -1}))
  with pytest.raises(TypeError, match='epochs'):  # ConfigDict keeps it int
    tiny_config(**{'client.epochs': 1.5})
