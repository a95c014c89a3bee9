"""Lanes: several clients back to back per lane (issue 18, item 3).

`placement.lane_schedule` puts the cohort's clients, most steps first, onto
L lanes; `build_round(lanes=True)` runs them there, each lane adding w_k Δ_k
at a client's last step and restarting from the server model. The round
must equal the reference loop (each client trains exactly as alone), not
depend on L, compute only the longest lane's steps, and refuse what it
cannot run.
"""

from __future__ import annotations

import flax.linen as nn
import ml_collections
import jax
import numpy as np
import optax
import pytest

from fedjax_eff import core
from fedjax_eff.core import placement
from fedjax_eff.data import FederatedData
from fedjax_eff.data import cohort as cohort_lib
from fedjax_eff.techniques import compression, last_n
from fedjax_eff.core import codecs
from tests import helpers

pytestmark = pytest.mark.usefixtures('fast_compiles')

SIZES = (3, 7, 20, 40, 1, 12, 9, 2)
B = 4


def _cohort(sizes=SIZES, data=None):
  data = data or helpers.ragged_clients(sizes)
  steps = cohort_lib.epoch_steps(data.client_sizes, B, 1)
  return cohort_lib.pack(data, np.arange(data.num_clients), steps=steps,
                         batch_size=B, seed=0, round_num=0, epochs=1)


@pytest.mark.parametrize('lanes', [1, 2, 3, 8])
def test_schedule_runs_every_real_step_once_in_order(lanes):
  steps = np.array([1, 2, 5, 10, 1, 3, 3, 0, 1])
  sch = placement.lane_schedule(steps, lanes, max_steps=10)
  k = len(steps)
  assert sch.client.shape == (lanes, placement.lane_capacity(k, 10, lanes))
  length = int(sch.length)
  # Past each lane's end: no client.
  for lane in range(lanes):
    c = sch.client[lane]
    real = c < k
    assert not real[length:].any()
    # A client's steps are contiguous, 0..s_k - 1, its last one flagged.
    for i in np.unique(c[real]):
      at = np.flatnonzero(c == i)
      np.testing.assert_array_equal(at, np.arange(at[0], at[0] + steps[i]))
      np.testing.assert_array_equal(sch.step[lane, at], np.arange(steps[i]))
      assert sch.last[lane, at].tolist() == [False] * (steps[i] - 1) + [True]
  ran = np.bincount(sch.client[sch.client < k], minlength=k)
  np.testing.assert_array_equal(ran, steps)  # every real step, once
  assert sch.last.sum() == (steps > 0).sum()
  # Graham's bound for longest-first: the mean load plus one client.
  assert length <= steps.sum() / lanes + steps.max()
  assert length >= max(steps.max(), -(-steps.sum() // lanes))


def test_schedule_beats_sorted_chunks_on_a_heavy_tail():
  """On a lognormal cohort (K = 50, S = 63) lanes compute at least 0.95 of
  their steps for real at L = 8, where the best layout with one client per
  lane (sorted chunks: test_ragged) stays below 0.9."""
  rng = np.random.default_rng(0)
  steps = np.clip(np.ceil(rng.lognormal(np.log(100), 1.5, 50) / 16), 1, 63
                  ).astype(int)
  sch = placement.lane_schedule(steps, 8, 63)
  lanes = steps.sum() / (8 * int(sch.length))
  order = np.sort(steps)[::-1]
  chunks = np.append(order, [0] * (-len(order) % 8)).reshape(-1, 8)
  sorted_chunks = steps.sum() / (8 * chunks.max(axis=1).sum())
  assert lanes >= 0.95 > 0.9 > sorted_chunks, (lanes, sorted_chunks)


@pytest.mark.parametrize('chunk', [1, 3])
def test_lanes_equal_the_reference_loop(chunk):
  """Adam (whose state a lane must reset per client) and SGD with FedProx;
  params to the reference loop, per-client bits, the round's loss."""
  cohort = _cohort()
  for client_opt, mu in ((optax.adam(0.01), 0.0), (optax.sgd(0.1), 0.3)):
    kw, params = helpers.tiny_setup(prox_mu=mu)
    kw['client_optimizer'] = client_opt
    fns = core.build_round(**kw, chunk_size=chunk, donate=False, lanes=True)
    state, metrics = fns.round_step(fns.init(params), cohort,
                                    jax.random.key(1))
    ref_state, ref = core.build_reference_round(**kw, chunk_size=chunk)(
        fns.init(params), cohort, jax.random.key(1))
    assert helpers.max_abs_diff(state.params, ref_state.params) < 1e-5
    np.testing.assert_array_equal(np.asarray(metrics.client_upload_bits),
                                  ref['client_upload_bits'])
    np.testing.assert_array_equal(np.asarray(metrics.client_download_bits),
                                  ref['client_download_bits'])
    chunked = core.build_round(**kw, chunk_size=chunk, donate=False)
    _, m = chunked.round_step(chunked.init(params), cohort, jax.random.key(1))
    np.testing.assert_allclose(float(metrics.train_loss), float(m.train_loss),
                               rtol=1e-6)
    assert float(metrics.num_clients) == len(SIZES)
    # Moved: the round is not the identity.
    assert helpers.max_abs_diff(state.params, params) > 1e-3


def test_lanes_with_resident_rows_and_a_static_last_n():
  """Device-resident data (row indices gathered per lane step) and one
  tier's last-n (frozen leaves: no delta, no coverage, fewer bits)."""
  data = helpers.ragged_clients(SIZES)
  cohort = _cohort(data=data)
  resident = cohort_lib.ResidentData.of(data)
  steps = cohort_lib.epoch_steps(data.client_sizes, B, 1)
  indexed = cohort_lib.pack_index(resident, np.arange(len(SIZES)),
                                  steps=steps, batch_size=B, seed=0,
                                  round_num=0, epochs=1)
  kw, params = helpers.tiny_setup()
  kw['technique'] = last_n.last_n(kw['model'], 1)
  fns = core.build_round(**kw, chunk_size=2, donate=False, lanes=True)
  state, metrics = fns.round_step(fns.init(params), indexed,
                                  jax.random.key(3), examples=resident.examples)
  ref_state, ref = core.build_reference_round(**kw, chunk_size=2)(
      fns.init(params), cohort, jax.random.key(3))
  assert helpers.max_abs_diff(state.params, ref_state.params) < 1e-5
  np.testing.assert_array_equal(np.asarray(metrics.client_upload_bits),
                                ref['client_upload_bits'])
  full = core.tree_bits(params)
  assert 0 < float(metrics.client_upload_bits[0]) < full
  # The frozen layers did not move.
  frozen = [k for k in params if k not in
            last_n.last_n_names(kw['model'], 1)]
  assert frozen and all(helpers.max_abs_diff(
      state.params[k], params[k]) == 0 for k in frozen)
  assert helpers.max_abs_diff(state.params, params) > 1e-4


CALLS = []


class CountingMLP(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    jax.debug.callback(lambda: CALLS.append(1))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(5)(nn.relu(nn.Dense(8)(x)))


@pytest.mark.parametrize('chunk', [1, 3])
def test_lanes_compute_only_the_longest_lane(chunk):
  """One forward per lane step (the lanes' vmap calls once for all):
  the longest lane's steps, fewer than sorted chunks compute."""
  cohort = _cohort()
  steps = placement.client_steps(cohort.mask)
  model = CountingMLP()
  params = model.init(jax.random.key(0), np.zeros((1, 6, 6, 1)))['params']
  kw = helpers.round_kw(model, core.identity(), optax.sgd(0.1))
  fns = core.build_round(**kw, chunk_size=chunk, donate=False, lanes=True)
  jax.block_until_ready(fns.round_step(fns.init(params), cohort,
                                       jax.random.key(1)))
  CALLS.clear()
  jax.block_until_ready(fns.round_step(fns.init(params), cohort,
                                       jax.random.key(1)))
  length = int(placement.lane_schedule(steps, chunk, len(steps)).length)
  assert len(CALLS) == length
  order = np.append(np.sort(steps)[::-1], [0] * (-len(steps) % chunk))
  assert length * chunk <= order.reshape(-1, chunk).max(axis=1).sum() * chunk
  if chunk == 1:
    assert length == steps.sum()


def test_a_nan_client_reruns_guarded_and_is_dropped():
  data = helpers.ragged_clients(SIZES)
  bad = {cid: dict(v) for cid, v in
         ((c, data.client(c)) for c in data.client_ids)}
  bad['c02']['x'] = np.full_like(bad['c02']['x'], np.nan)
  cohort = _cohort(data=FederatedData(bad))
  kw, params = helpers.tiny_setup()
  out = {}
  for lanes in (True, False):
    fns = core.build_round(**kw, chunk_size=2, donate=False, lanes=lanes)
    out[lanes] = fns.round_step(fns.init(params), cohort, jax.random.key(1))
  (s1, m1), (s0, m0) = out[True], out[False]
  assert float(m1.num_dropped) == float(m0.num_dropped) == 1
  assert np.isfinite(float(m1.train_loss))
  assert helpers.max_abs_diff(s1.params, s0.params) < 1e-6


def test_what_lanes_cannot_run_is_refused_in_one_line():
  kw, _ = helpers.tiny_setup()
  q4 = compression.compress([codecs.quantize_codec(4)])
  for technique, extra in ((q4, {}),
                           (last_n.last_n(kw['model'], (1, 2)),
                            dict(num_tiers=2))):
    with pytest.raises(ValueError, match='lanes=True runs clients back to'):
      core.build_round(**dict(kw, technique=technique), lanes=True, **extra)


def test_config_lanes_trains_as_the_chunked_run(tmp_path):
  """`config.lanes` through the experiment, with epochs (clients of uneven
  step counts): per-round losses and bits as the chunked run's; a
  technique lanes cannot run is refused before training."""
  from fedjax_eff.experiment import train_and_evaluate
  from fedjax_eff.experiment.metrics import read_metrics
  from tests.test_faults import tiny
  kw = {'num_rounds': 3, 'chunk_size': 2, 'client.epochs': 1,
        'client.max_examples': 200, 'eval_every': 3}
  for lanes in (False, True):
    train_and_evaluate(tiny(lanes=lanes, **kw), str(tmp_path / str(lanes)))
  a, b = (read_metrics(str(tmp_path / str(x))) for x in (False, True))
  assert len(a) == len(b) == 3
  for x, y in zip(a, b):
    np.testing.assert_allclose(y['train_loss'], x['train_loss'], rtol=1e-5)
    assert y['upload_bits'] == x['upload_bits']
    assert y['device_local_steps'] == x['device_local_steps']
  # Uneven clients: fewer steps on average than the cohort's S.
  assert max(r['device_local_steps'] for r in a) < 200 // 8
  q4 = ml_collections.ConfigDict(dict(
      name='compress', codecs=[dict(name='quantize', bits=4)]))
  with pytest.raises(ValueError, match='lanes=True runs clients back to'):
    train_and_evaluate(tiny(lanes=True, techniques=[q4], **kw),
                       str(tmp_path / 'q4'))
