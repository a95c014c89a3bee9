"""Client-level DP (privacy/dp_fedavg.py) with numbers: the noise's std
against the formula, every client's share bounded by the clip, the
vectorised round against the reference loop, adaptive clipping against a
known quantile, and the Poisson and cyclic samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_eff import core
from fedjax_eff.core import codecs
from fedjax_eff.data import cohort as cohort_lib
from fedjax_eff.privacy import dp_fedavg as dp_lib
from tests import helpers

pytestmark = pytest.mark.usefixtures('fast_compiles')


def _setup(client_lr=0.1, server_lr=1.0):
  return helpers.tiny_setup(model='mlp', client_lr=client_lr,
                            server_lr=server_lr,
                            model_kwargs=dict(hidden=(8,)))


def _cohort(data, **kw):
  return helpers.tiny_cohort(data, weighting='uniform', **kw)


def _build(kw, technique, data, chunk_size=1):
  return core.build_round(**dict(kw, technique=technique),
                          chunk_size=chunk_size, donate=False,
                          population=data.num_clients)


def _norm(tree):
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree.leaves(tree))))


def test_without_noise_and_clip_it_is_uniform_fedavg():
  data = helpers.ragged_clients()
  cohort = _cohort(data)
  kw, params = _setup()
  plain = core.build_round(**kw, chunk_size=1, donate=False)
  want, _ = plain.round_step(plain.init(params), cohort, jax.random.key(1))
  dp = _build(kw, dp_lib.dp_fedavg(1e9, 0.0, cohort.num_clients), data)
  got, _ = dp.round_step(dp.init(params), cohort, jax.random.key(1))
  assert helpers.max_abs_diff(want.params, got.params) < 1e-6


def test_noise_std_matches_the_formula_at_a_zero_update():
  """Client lr 0: every update is 0, so the server's step is the noise
  alone: std z C / K per parameter (server lr 1, FedAvg)."""
  data = helpers.ragged_clients()
  cohort = _cohort(data)
  kw, params = _setup(client_lr=0.0)
  z, clip, k = 1.5, 0.3, 5.0
  fns = _build(kw, dp_lib.dp_fedavg(clip, z, k, seed=3), data)
  state = fns.init(params)
  steps = []
  for r in range(6):
    before = state.params
    state, _ = fns.round_step(state, cohort, jax.random.key(r))
    steps.append(np.concatenate([np.ravel(np.asarray(a) - np.asarray(b))
                                 for a, b in zip(jax.tree.leaves(before),
                                                 jax.tree.leaves(
                                                     state.params))]))
  steps = np.stack(steps)  # [rounds, d]
  assert steps.size > 1500
  want = z * clip / k
  assert abs(np.std(steps) / want - 1) < 0.06
  assert abs(np.mean(steps)) < 4 * want / np.sqrt(steps.size)
  # Fresh noise every round: rounds are uncorrelated.
  assert abs(np.corrcoef(steps[0], steps[1])[0, 1]) < 0.1


def test_every_client_share_is_bounded_by_the_clip():
  data = helpers.ragged_clients()
  cohort = _cohort(data)
  kw, params = _setup(client_lr=0.5)
  clip = 0.05
  plain = core.build_round(**kw, chunk_size=1, donate=False)
  dp = _build(kw, dp_lib.dp_fedavg(clip, 0.0, 1.0), data)
  state = dp.init(params)
  for i in range(cohort.num_clients):
    args = ({f: jnp.asarray(v[i]) for f, v in cohort.batches.items()},
            jnp.asarray(cohort.mask[i]),
            {k: jnp.asarray(v[i]) for k, v in cohort.ctx.items()},
            jax.random.key(i), state.round)
    raw = plain.client_update(params, *args)
    ctx = dict(args[2], server_state=state.technique, client_state=())
    out = dp.client_update(params, args[0], args[1], ctx, *args[3:])
    n_raw, n_out = _norm(raw.delta), _norm(out.delta)
    assert n_out <= clip * (1 + 1e-5)
    # Clipping scales the update: its direction is kept.
    np.testing.assert_allclose(n_out, min(n_raw, clip), rtol=1e-5)
    if n_raw > 0:
      for a, b in zip(jax.tree.leaves(raw.delta), jax.tree.leaves(out.delta)):
        np.testing.assert_allclose(np.asarray(b) * n_raw / n_out,
                                   np.asarray(a), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('mechanism', ['gaussian', 'banded'])
def test_round_matches_the_reference_loop(mechanism):
  """Clipping, noise and adaptive clipping: the vectorised round (chunks
  of 3) equals the per-client reference loop, round after round."""
  data = helpers.ragged_clients()
  cohort = _cohort(data)
  kw, params = _setup()
  tech = dp_lib.dp_fedavg(0.2, 0.8, 7.0, target_quantile=0.5,
                          count_noise_multiplier=0.3, mechanism=mechanism,
                          num_rounds=4, bands=2, sensitivity=1.3, seed=1)
  fns = _build(kw, tech, data, chunk_size=3)
  ref = core.build_reference_round(**dict(kw, technique=tech), chunk_size=3)
  a = b = fns.init(params)
  for r in range(3):
    a, _ = fns.round_step(a, cohort, jax.random.key(r))
    b, _ = ref(b, cohort, jax.random.key(r))
    assert helpers.max_abs_diff(a.params, b.params) < 2e-6
    np.testing.assert_allclose(float(a.technique.clip),
                               float(b.technique.clip), rtol=1e-6)


def test_banded_noise_is_correlated_by_the_strategy():
  """DP-FTRL's noise at a zero update: round t's noise is z s (C^-1 ζ)_t
  (jax-privacy's banded strategy), so consecutive rounds correlate as
  C^-1 (C^-1)^T says, and bands=1 is independent noise."""
  from jax_privacy.matrix_factorization import banded
  n, bands = 6, 3
  inv = np.linalg.inv(np.asarray(
      banded.ColumnNormalizedBanded.default(n, bands).materialize()))
  cov = inv @ inv.T
  d = 20000
  tech = dp_lib.dp_fedavg(1.0, 1.0, 1.0, mechanism='banded', num_rounds=n,
                          bands=bands, seed=0)
  params = {'w': jnp.zeros((d,))}
  state = tech.init(params).server
  zero = {'w': jnp.zeros((d,))}
  cov_zero = {'w': jnp.ones((d,))}
  noises = []
  for _ in range(n):
    out, _, state = tech.aggregate(state, zero, cov_zero, {})
    noises.append(np.asarray(out['w']))
  emp = np.cov(np.stack(noises))
  np.testing.assert_allclose(emp, cov, atol=0.05)


def test_adaptive_clipping_converges_to_the_target_quantile():
  """Andrew et al. 2021: with norms from a known distribution (uniform on
  [0, 4]) and little count noise, C settles at the γ quantile (4 γ)."""
  k = 200
  for gamma in (0.3, 0.7):
    tech = dp_lib.dp_fedavg(0.5, 1.0, float(k), target_quantile=gamma,
                            clip_learning_rate=0.2,
                            count_noise_multiplier=1.0, seed=0)
    state = tech.init({'w': jnp.zeros(3)}).server
    rng = np.random.default_rng(0)
    update = jax.jit(lambda s, f: tech.server_update(s, f, {}))
    clips = []
    for _ in range(400):
      norms = rng.uniform(0, 4, size=k)
      count = jnp.float32(np.sum(norms <= float(state.clip)) - k / 2)
      state = update(state, count)
      clips.append(float(state.clip))
    assert abs(np.mean(clips[-100:]) - 4 * gamma) < 0.1 * 4 * gamma


def test_the_clipped_count_is_the_feedback():
  """A client reports 1[‖Δ‖ <= C] - 1/2 as its feedback (32 bits up)."""
  tech = dp_lib.dp_fedavg(1.0, 1.0, 1.0, target_quantile=0.5)
  delta = {'a': jnp.full((4,), 0.4), 'b': jnp.full((2,), 0.1)}  # ‖Δ‖ 0.81
  for clip, want in ((1.0, 0.5), (0.5, -0.5)):
    _, fb = tech.finish(delta, delta, jnp.float32(clip), 1)
    assert float(fb) == want


def test_clip_wires_leaves_frozen_leaves_and_reads_all_sent_values():
  msg = codecs.to_wire({'a': jnp.array([3.0, 0.0]), 'b': jnp.array([4.0]),
                        'f': jnp.array([100.0])},
                       {'a': True, 'b': True, 'f': False})
  out = dp_lib.clip_wires(msg, jnp.float32(1.0))
  np.testing.assert_allclose(np.asarray(out['a'].values), [0.6, 0.0])
  np.testing.assert_allclose(np.asarray(out['b'].values), [0.8])
  assert not out['f'].sent


def test_poisson_sampler_draws_q_n_on_average_within_its_slots():
  s = cohort_lib.PoissonSampler(1000, 20, seed=0)
  sizes = [len(s.sample(r)) for r in range(400)]
  assert abs(np.mean(sizes) - 20) < 4 * np.sqrt(20 * 0.98 / 400)
  assert np.var(sizes) == pytest.approx(20 * 0.98, rel=0.25)
  assert max(sizes) <= s.slots < 1000
  assert s.sampling_probability == 0.02
  # Every client equally likely: each joins about q of the rounds.
  counts = np.bincount(np.concatenate([s.sample(r) for r in range(400)]),
                       minlength=1000)
  assert abs(counts.mean() / 400 - 0.02) < 0.002


def test_absent_slots_change_nothing():
  """A Poisson cohort's empty slots (weight 0, no example) are not
  aggregated: the round equals the round of the present clients alone."""
  data = helpers.ragged_clients()
  kw, params = _setup()
  tech = dp_lib.dp_fedavg(0.3, 0.0, 4.0, target_quantile=0.5,
                          count_noise_multiplier=0.0)
  fns = _build(kw, tech, data, chunk_size=2)
  present = np.array([1, 3, 4])
  alone = cohort_lib.pack(data, present, steps=3, batch_size=4, seed=0,
                          round_num=0, weighting='uniform')
  padded = cohort_lib.pad_absent(cohort_lib.pack(
      data, cohort_lib.padded_ids(present, 6), steps=3, batch_size=4,
      seed=0, round_num=0, weighting='uniform'), 3)
  a, _ = fns.round_step(fns.init(params), alone, jax.random.key(0))
  b, _ = fns.round_step(fns.init(params), padded, jax.random.key(0))
  assert helpers.max_abs_diff(a.params, b.params) < 1e-6
  np.testing.assert_allclose(float(a.technique.clip),
                             float(b.technique.clip), rtol=1e-6)


def test_cyclic_sampler_takes_each_client_once_per_cycle():
  s = cohort_lib.CyclicSampler(103, 10, seed=4)
  assert s.blocks == 10
  cycle = np.concatenate([s.sample(r) for r in range(10)])
  assert len(set(cycle.tolist())) == 100  # 3 left over never train
  for r in range(10):
    np.testing.assert_array_equal(s.sample(r), s.sample(r + 10))
