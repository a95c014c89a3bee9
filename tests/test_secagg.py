"""Secure aggregation with the distributed discrete Gaussian
(`privacy/secagg.py`): the rotation, the rounding, the modular sum and its
wrap-around, the discrete Gaussian sampler, the bits, a real round against
FedAvg and the reference loop, and the DDG accounting by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_eff import core
from fedjax_eff.core import codecs
from fedjax_eff.core.technique import chain
from fedjax_eff.privacy import secagg
from tests import helpers

pytestmark = pytest.mark.usefixtures('fast_compiles')


def _messages(tech, xs, round_num=3, seed=0):
  """Encode each client's tree `xs[k]` (all trained); returns the decoded
  float trees (what the round sums)."""
  t = chain(tech)
  plan = t.plan(jax.random.key(0), jnp.int32(round_num), {})
  out = []
  for k, x in enumerate(xs):
    mask = jax.tree.map(lambda _: True, x)
    msg = t.encode(codecs.to_wire(x, mask), plan,
                   jax.random.key(100 + k + 1000 * seed))
    out.append(codecs.from_wire(t.decode(msg, plan)))
  return out


def _ring_sum(tech, xs, round_num=3):
  """The server's reading of K clients' messages: their float sum, then
  `aggregate`."""
  t = chain(tech)
  dec = _messages(t, xs, round_num)
  total = jax.tree.map(lambda *v: sum(v), *dec)
  cov = jax.tree.map(lambda v: jnp.full(v.shape, float(len(xs))), total)
  s, c, st = t.aggregate(t.init(xs[0]).server, total, cov,
                         dict(round=jnp.int32(round_num),
                              clients=jnp.float32(len(xs))))
  for a, b in zip(jax.tree.leaves(c), jax.tree.leaves(cov)):
    np.testing.assert_array_equal(a, b)
  assert st == ()
  return s


def _flat(tree):
  return np.concatenate([np.asarray(x, np.float64).reshape(-1)
                         for x in jax.tree.leaves(tree)])


# The rotation.

@pytest.mark.parametrize('n', [1, 7, 100, 1000])
def test_rotation_is_orthogonal_and_keeps_size(n):
  assert sum(secagg.blocks(n)) == n
  signs = secagg.rotation_signs(0, 5, 2, n)
  rot = jax.jit(jax.vmap(secagg.hadamard_rotate, (0, None)))
  x = jax.random.normal(jax.random.key(n), (1, n))
  y = rot(x, signs)[0]
  assert y.shape == (n,)
  np.testing.assert_allclose(float(jnp.linalg.norm(y)),
                             float(jnp.linalg.norm(x)), rtol=1e-5)
  np.testing.assert_allclose(jax.jit(secagg.hadamard_unrotate)(y, signs),
                             x[0], atol=1e-5)
  if n <= 100:  # the matrix itself: R^T R = I
    r = np.asarray(rot(jnp.eye(n), signs)).T
    np.testing.assert_allclose(r.T @ r, np.eye(n), atol=1e-5)
  if n == 100:
    assert secagg.blocks(n) == [64, 32, 4]
    # It mixes: a basis vector spreads over its block (64 entries of 1/8).
    e0 = r[:, 0]
    np.testing.assert_allclose(np.abs(e0[:64]), 1 / 8, rtol=1e-6)
    np.testing.assert_array_equal(e0[64:], 0.0)


def test_rotation_signs_are_public_per_round_and_leaf():
  a = secagg.rotation_signs(0, 1, 0, 64)
  np.testing.assert_array_equal(a, secagg.rotation_signs(0, 1, 0, 64))
  for other in (secagg.rotation_signs(0, 2, 0, 64),
                secagg.rotation_signs(0, 1, 1, 64),
                secagg.rotation_signs(1, 1, 0, 64)):
    assert np.any(np.asarray(a) != np.asarray(other))
  assert set(np.unique(np.asarray(a))) == {-1.0, 1.0}


# Rounding.

def test_stochastic_rounding_is_unbiased_within_one_step():
  x = jnp.array([-2.3, 0.7, 5.5, 1e-3, 3.0, -0.999])
  draws = jax.vmap(lambda k: secagg.stochastic_round(x, k))(
      jax.random.split(jax.random.key(0), 20000))
  draws = np.asarray(draws)
  np.testing.assert_array_equal(draws, np.round(draws))   # integers
  assert np.all(np.abs(draws - np.asarray(x)) < 1.0)      # one step
  assert set(np.unique(draws[:, 4])) == {3.0}             # exact stays
  # The mean: std of a mean of 20000 draws <= 0.5 / 141 = 0.0035.
  np.testing.assert_allclose(draws.mean(0), x, atol=0.015)


def test_conditional_rounding_respects_the_norm_bound():
  # x clipped to c = 1: 0.05 per coordinate, 0.4 grid steps; rounded,
  # ‖z‖² ~ Binomial(400, 0.4): mean 160, std 9.8, past the bound
  # Δ₂² = 64 + 100 + √(2 log(1/0.99)) 18 = 166.6 about one time in four.
  d, c, gamma, beta = 400, 1.0, 8.0, 0.99
  x = {'w': jnp.full((d,), 0.1)}
  bound = secagg.rounded_norm_bound(c, gamma, d, beta)
  assert bound ** 2 == pytest.approx(166.55, abs=0.01)

  def norms(beta):
    t = chain(secagg.secure_aggregation(bits=16, scale=gamma, clip_norm=c,
                                        rotate=False, beta=beta))
    plan = t.plan(jax.random.key(0), jnp.int32(0), {})
    one = lambda k: jnp.linalg.norm(codecs.from_wire(t.decode(t.encode(
        codecs.to_wire(x, {'w': True}), plan, k), plan))['w'])
    return np.asarray(jax.jit(jax.vmap(one))(
        jax.random.split(jax.random.key(1), 64)))
  plain = norms(0.0)
  assert np.mean(plain > bound) > 0.1   # plain rounding exceeds it ...
  assert np.all(norms(beta) <= bound + 1e-4)  # ... conditional never


# The modular sum.

def _clients(k, d, seed=0, spread=1.0):
  rng = np.random.default_rng(seed)
  return [{'a': jnp.asarray(rng.uniform(-spread, spread, (d,)), jnp.float32),
           'b': {'k': jnp.asarray(rng.uniform(-spread, spread, (3, 7)),
                                  jnp.float32)}} for _ in range(k)]


def test_modular_sum_equals_the_sum_within_the_rounding_bound():
  k, gamma = 5, 256.0
  xs = _clients(k, 50)
  plain = _flat(jax.tree.map(lambda *v: sum(v), *xs))
  # Without rotation: every coordinate within K grid steps.
  got = _flat(_ring_sum(secagg.secure_aggregation(
      bits=16, scale=gamma, rotate=False), xs))
  assert np.max(np.abs(got - plain)) < k / gamma
  # With rotation: the error is rotated back, ‖·‖₂ < √d K / γ, and its
  # expectation is 0 with E‖·‖² <= d K / (4γ²).
  d = plain.size
  got = _flat(_ring_sum(secagg.secure_aggregation(
      bits=16, scale=gamma, rotate=True), xs))
  err = np.linalg.norm(got - plain)
  assert err < math.sqrt(d) * k / gamma
  assert err < 1.5 * math.sqrt(d * k / 4) / gamma
  # With clipping: the sum of the clipped updates.
  c = 2.0
  clipped = [jax.tree.map(lambda v, x=x: v * min(1.0, c / float(np.linalg.norm(
      _flat(x)))), x) for x in xs]
  plain = _flat(jax.tree.map(lambda *v: sum(v), *clipped))
  got = _flat(_ring_sum(secagg.secure_aggregation(
      bits=16, scale=gamma, clip_norm=c), xs))
  assert np.linalg.norm(got - plain) < math.sqrt(d) * k / gamma


def test_modular_sum_wraps_exactly_past_half_the_ring():
  # 3 clients send 50 (integers: rounding is exact), the sum 150 is past
  # m/2 = 128 for 8 bits: it reads 150 - 256; -30 x 3 = -90 does not wrap.
  xs = [{'w': jnp.array([50.0, -30.0, 0.0])}] * 3
  got = _ring_sum(secagg.secure_aggregation(bits=8, scale=1.0,
                                            rotate=False), xs)['w']
  np.testing.assert_array_equal(got, [150.0 - 256.0, -90.0, 0.0])
  got = _ring_sum(secagg.secure_aggregation(bits=10, scale=1.0,
                                            rotate=False), xs)['w']
  np.testing.assert_array_equal(got, [150.0, -90.0, 0.0])
  # On a finer grid the wrap is m / γ in update units: 0.5 x 3 x 256.
  xs = [{'w': jnp.array([0.5, -0.25, 0.0])}] * 3
  got = _ring_sum(secagg.secure_aggregation(bits=8, scale=100.0,
                                            rotate=False), xs)['w']
  np.testing.assert_allclose(got, [1.5 - 256 / 100, -0.75, 0.0], atol=1e-6)


def test_too_many_clients_for_exact_float_sums():
  secagg.check_exact(20, 32)
  with pytest.raises(ValueError, match='2\\^24'):
    secagg.check_exact(20, 33)
  t = secagg.secure_aggregation(bits=20, scale=1.0, rotate=False)
  s = {'w': jnp.ones(3)}
  ok, _, _ = t.aggregate((), s, s, dict(round=jnp.int32(0),
                                        clients=jnp.float32(32)))
  bad, _, _ = t.aggregate((), s, s, dict(round=jnp.int32(0),
                                         clients=jnp.float32(33)))
  np.testing.assert_array_equal(ok['w'], 1.0)
  assert np.all(np.isnan(bad['w']))  # the round skips the server step


def test_a_non_finite_update_decodes_to_nan():
  x = {'a': jnp.array([1.0, jnp.nan]), 'b': jnp.ones(3)}
  (dec,) = _messages(secagg.secure_aggregation(bits=12, scale=4.0), [x])
  assert all(np.all(np.isnan(v)) for v in jax.tree.leaves(dec))


# The discrete Gaussian.

def _exact_pmf(sigma, support):
  p = np.exp(-support.astype(np.float64) ** 2 / (2 * sigma ** 2))
  return p / p.sum()


@pytest.mark.parametrize('sigma', [0.5, 3.0, 20.0])
def test_discrete_gaussian_sampler(sigma):
  n = 200_000
  y = np.asarray(jax.jit(lambda k: secagg.discrete_gaussian(
      k, (n,), sigma))(jax.random.key(int(sigma * 10))))
  assert y.dtype == np.int32
  support = np.arange(-int(12 * sigma) - 2, int(12 * sigma) + 3)
  pmf = _exact_pmf(sigma, support)
  var = float(np.sum(pmf * support ** 2.0))  # N_Z's variance: < σ² at 0.5
  if sigma >= 3:
    assert abs(var - sigma ** 2) < 1e-9 * sigma ** 2
  else:
    assert abs(var - 0.2150) < 1e-3
  assert abs(y.mean()) < 5 * math.sqrt(var / n)
  # The sample variance's std is about var x sqrt(2 / n) = 0.3 % of var.
  assert abs(y.var() - var) < 0.02 * var
  # The whole law: total variation to N_Z(0, σ²) within sampling noise.
  counts = np.bincount(y - support[0], minlength=support.size)
  assert counts.sum() == n  # nothing outside 12 σ
  assert 0.5 * np.abs(counts / n - pmf).sum() < 0.02


def test_sum_of_client_noise_has_k_times_the_variance():
  k, n, sigma = 8, 25_000, 3.0
  y = secagg.discrete_gaussian(jax.random.key(7), (k, n), sigma)
  s = np.asarray(y, np.int64).sum(0)
  assert abs(s.var() - k * sigma ** 2) < 0.05 * k * sigma ** 2
  assert abs(s.mean()) < 5 * math.sqrt(k * sigma ** 2 / n)


def test_noise_reaches_the_sum_with_k_sigma_squared():
  # Zero updates: the decoded sum is the clients' noise, variance K σ²/γ².
  k, d, gamma, std = 4, 4096, 16.0, 0.25  # σ = 4 grid steps
  xs = [{'w': jnp.zeros(d)}] * k
  got = np.asarray(_ring_sum(secagg.secure_aggregation(
      bits=16, scale=gamma, noise_stddev=std), xs)['w'])
  np.testing.assert_allclose(got.var(), k * std ** 2, rtol=0.1)


# Bits.

def test_message_bits_are_bits_times_values():
  tech = chain(secagg.secure_aggregation(bits=13, scale=64.0))
  tree = {'a': jnp.ones((5, 3)), 'b': jnp.ones((7,)), 'frozen': jnp.ones(4),
          'dyn': jnp.ones((6,))}
  mask = {'a': True, 'b': True, 'frozen': False,
          'dyn': jnp.array([1.0, 0, 1, 0, 0, 0])}
  plan = tech.plan(jax.random.key(0), jnp.int32(0), {})
  msg = tech.encode(codecs.to_wire(tree, mask), plan, jax.random.key(1))
  # The frozen leaf travels not; a SecAgg vector has one length for every
  # client, so a dynamically masked leaf travels whole.
  assert codecs.message_bits(msg) == 13 * (15 + 7 + 6)
  assert codecs.packed_bytes(msg) == sum(-(-n * 13 // 8) for n in (15, 7, 6))
  assert sum(b.size for b in codecs.pack(msg)) == codecs.packed_bytes(msg)
  dec = tech.decode(msg, plan)
  assert jax.tree.structure(dec, is_leaf=codecs.is_node) == (
      jax.tree.structure(codecs.to_wire(tree, mask), is_leaf=codecs.is_node))
  assert tech.name == 'secagg13'


def test_validation():
  for kw in (dict(bits=0), dict(bits=25), dict(scale=0.0),
             dict(clip_norm=-1.0), dict(noise_stddev=-1.0), dict(beta=1.0),
             dict(beta=0.1)):
    with pytest.raises(ValueError):
      secagg.secure_aggregation(**kw)
  tech = chain(core.identity(), secagg.secure_aggregation())
  q = codecs.quantize_codec(8)
  msg = q.encode(codecs.to_wire({'w': jnp.ones(4)}, {'w': True}),
                 jax.random.key(0))
  with pytest.raises(ValueError, match='grid is the quantization'):
    tech.encode(msg, ((), jnp.int32(0)), jax.random.key(0))


# A real round.

def test_round_equals_fedavg_within_rounding_and_the_reference_loop():
  k, gamma = 7, 2.0 ** 10
  tech = secagg.secure_aggregation(bits=20, scale=gamma, rotate=True)
  secagg.check_exact(20, k)
  kw, params = helpers.tiny_setup(model='mlp',
                                  model_kwargs=dict(hidden=(8,)))
  cohort = helpers.tiny_cohort(weighting='uniform')
  assert cohort.weight.shape == (k,) and np.all(cohort.weight == 1.0)
  fed = core.build_round(**kw, chunk_size=3, donate=False)
  sec = core.build_round(**dict(kw, technique=chain(tech)), chunk_size=3,
                         donate=False)
  ref = core.build_reference_round(**dict(kw, technique=chain(tech)),
                                   chunk_size=3)
  d = sum(x.size for x in jax.tree.leaves(params))
  rng = jax.random.key(1)

  def check(cohort, aggregated):
    plain, m_plain = fed.round_step(fed.init(params), cohort, rng)
    state, metrics = sec.round_step(sec.init(params), cohort, rng)
    # The mean of the K rounded vectors: within 1/γ per rotated
    # coordinate, √d/γ in L2; its rms is <= √(d/(4K))/γ.
    err = np.linalg.norm(_flat(state.params) - _flat(plain.params))
    assert 0 < err < math.sqrt(d) / gamma
    assert err < 2 * math.sqrt(d / (4 * aggregated)) / gamma
    assert float(metrics.server_step_skipped) == 0.0
    np.testing.assert_array_equal(metrics.num_dropped, m_plain.num_dropped)
    np.testing.assert_array_equal(
        metrics.client_upload_bits, np.full(k, 20.0 * d))
    # The reference loop: the same keys, the same integers, the same sum.
    ref_state, ref_metrics = ref(sec.init(params), cohort, rng)
    assert helpers.max_abs_diff(state.params, ref_state.params) < 1e-6
    np.testing.assert_array_equal(metrics.client_upload_bits,
                                  ref_metrics['client_upload_bits'])
    return metrics

  check(cohort, k)
  # A client whose batch holds an inf: its update is NaN, it is left out
  # of the sum and the others' modular sum decodes.
  bad = cohort._replace(batches=dict(cohort.batches))
  bad.batches['x'] = np.array(cohort.batches['x'])
  bad.batches['x'][2, 0, 0, 0, 0, 0] = np.inf
  assert float(check(bad, k - 1).num_dropped) == 1.0
  # A client of weight 0 (an empty Poisson slot) is not in the sum.
  zero = cohort._replace(weight=np.array(cohort.weight))
  zero.weight[4] = 0.0
  check(zero, k - 1)


# The DDG accounting.

def test_ddg_accounting_by_hand():
  # σ = 0.25 x 64 = 16 grid steps: τ = 10 Σ exp(-2π² 256 k/(k+1)) = 0.
  c, gamma, std, n, d = 1.0, 64.0, 0.25, 10, 100
  assert secagg.ddg_tau(16.0, n) == 0.0
  # Δ₂ = cγ + √d = 74; ρ = 74² / (2 n σ²) = 5476 / 5120.
  assert secagg.rounded_norm_bound(c, gamma, d) == 74.0
  rho = 74.0 ** 2 / (2 * n * 16.0 ** 2)
  assert rho == pytest.approx(1.06953125)
  orders = [2, 8, 32]
  np.testing.assert_allclose(
      secagg.ddg_rdp(orders, clip_norm=c, scale=gamma, noise_stddev=std,
                     clients=n, dim=d), [2 * rho, 8 * rho, 32 * rho])
  event = secagg.ddg_event(clip_norm=c, scale=gamma, noise_stddev=std,
                           clients=n, dim=d)
  assert event.rho == pytest.approx(rho) and event.xi == 0.0
  # ε at δ = 1e-5 over 1 round: between the exact Gaussian mechanism of
  # the same ρ (μ = √(2ρ): Balle & Wang 2018) and ρ + 2√(ρ log(1/δ)).
  delta = 1e-5
  eps = secagg.ddg_epsilon(clip_norm=c, scale=gamma, noise_stddev=std,
                           clients=n, dim=d, rounds=1, delta=delta)
  assert eps < rho + 2 * math.sqrt(rho * math.log(1 / delta))  # 8.09
  mu = math.sqrt(2 * rho)
  phi = lambda t: 0.5 * math.erfc(-t / math.sqrt(2))
  gauss_delta = lambda e: phi(-e / mu + mu / 2) - math.exp(e) * phi(
      -e / mu - mu / 2)
  assert gauss_delta(eps) < delta   # ε is an upper bound ...
  assert gauss_delta(0.8 * eps) > delta  # ... and not a loose one
  # The same through dp-accounting's zCDP event: the same RDP curve here.
  import dp_accounting  # pylint: disable=g-import-not-at-top
  acc = dp_accounting.rdp.RdpAccountant(list(secagg.RDP_ORDERS))
  acc.compose(event, 1)
  assert acc.get_epsilon(delta) == pytest.approx(eps)
  # Rounds compose: 4 rounds of ρ are one round of 4ρ (σ halved).
  four = secagg.ddg_epsilon(clip_norm=c, scale=gamma, noise_stddev=std,
                            clients=n, dim=d, rounds=4, delta=delta)
  assert four == pytest.approx(secagg.ddg_epsilon(
      clip_norm=c, scale=gamma, noise_stddev=std / 2, clients=n, dim=d,
      rounds=1, delta=delta), rel=1e-9)
  assert four > eps
  # Small σ: τ by hand, σ = 1 grid step, n = 3: 10 (e^{-π²} + e^{-4π²/3}).
  tau = secagg.ddg_tau(1.0, 3)
  assert tau == pytest.approx(10 * (math.exp(-math.pi ** 2) +
                                    math.exp(-4 * math.pi ** 2 / 3)))
  assert tau == pytest.approx(5.36e-4, rel=1e-2)
  # Conditional rounding tightens Δ₂: √(c²γ² + d/4 + √(2 log 10)(cγ + 5)).
  assert secagg.rounded_norm_bound(c, gamma, d, beta=0.1) == pytest.approx(
      math.sqrt(64 ** 2 + 25 + math.sqrt(2 * math.log(10)) * (64 + 5)))
  with pytest.raises(ValueError):
    secagg.ddg_epsilon(clip_norm=c, scale=gamma, noise_stddev=0.001,
                       clients=n, dim=d, rounds=1, delta=delta)
