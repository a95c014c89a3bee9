"""Techniques with state: error feedback and SCAFFOLD against hand-written
per-client loops, and the client-state store across rounds and chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_eff import core
from fedjax_eff.core import codecs
from fedjax_eff.data import pack
from fedjax_eff.techniques import compression
from fedjax_eff.techniques.scaffold import scaffold
from tests import helpers

pytestmark = pytest.mark.usefixtures('fast_compiles')

CLIENT_LR = 0.1
STEPS, BATCH = 3, 4
# The clients of each round (indices into the 7 clients of ragged_clients):
# overlapping, so a client's state carries from one round to another.
COHORTS = ([0, 2, 3, 5], [1, 2, 4, 5], [0, 3, 5, 6])


def _setup(technique):
  kw, params = helpers.tiny_setup(model='mlp', client_lr=CLIENT_LR,
                                  technique=technique,
                                  model_kwargs=dict(hidden=(8,)))
  return kw, params


def _cohort(data, r):
  return pack(data, np.asarray(COHORTS[r]), steps=STEPS, batch_size=BATCH,
              seed=0, round_num=r)


def _local_sgd(kw, x, cohort, i, grad_shift=None):
  """Client i's local SGD from `x` (a hand-written loop over its real
  steps); `grad_shift` is added to every gradient. -> (Δ = x - y, K)."""
  loss_fn = core.round.make_loss_fn(kw['model'], kw['task'])
  grad = jax.jit(jax.grad(lambda p, b, m: loss_fn(
      p, b, m, jax.random.key(0), p, {})[0]))
  y, k = x, 0
  for s in range(STEPS):
    m = np.asarray(cohort.mask[i, s])
    if m.sum() == 0:
      continue
    g = grad(y, {f: v[i, s] for f, v in cohort.batches.items()}, m)
    if grad_shift is not None:
      g = jax.tree.map(lambda a, b: a + b, g, grad_shift)
    y = jax.tree.map(lambda p, d: p - CLIENT_LR * d, y, g)
    k += 1
  return jax.tree.map(jnp.subtract, x, y), k


def _weighted_mean(trees, weights):
  total = sum(weights)
  return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs))
                      / total, *trees)


def _run(kw, params, technique, data, chunk_size):
  fns = core.build_round(**dict(kw, technique=technique),
                         chunk_size=chunk_size, donate=False,
                         population=data.num_clients)
  state = fns.init(params)
  for r in range(len(COHORTS)):
    state, _ = fns.round_step(state, _cohort(data, r), jax.random.key(r))
  return state


def test_scaffold_matches_hand_written_loop():
  data = helpers.ragged_clients()
  n = data.num_clients
  kw, params = _setup(scaffold(CLIENT_LR))
  # Hand-written SCAFFOLD (Karimireddy et al. 2020, Alg. 1, option II)
  # with FedAvg's server step (server lr 1: x <- x - weighted mean Δ).
  zeros = jax.tree.map(jnp.zeros_like, params)
  x, c, ci = params, zeros, [zeros] * n
  for r in range(len(COHORTS)):
    cohort = _cohort(data, r)
    deltas, weights, dc_sum = [], [], zeros
    for i, cid in enumerate(COHORTS[r]):
      shift = jax.tree.map(lambda a, b: a - b, c, ci[cid])  # c - c_i
      delta, k = _local_sgd(kw, x, cohort, i, shift)
      new = jax.tree.map(lambda a, b, d: a - b + d / (k * CLIENT_LR),
                         ci[cid], c, delta)
      dc_sum = jax.tree.map(lambda s, a, b: s + a - b, dc_sum, new, ci[cid])
      ci[cid] = new
      deltas.append(delta)
      weights.append(float(cohort.weight[i]))
    x = jax.tree.map(jnp.subtract, x, _weighted_mean(deltas, weights))
    c = jax.tree.map(lambda a, s: a + s / n, c, dc_sum)
  for chunk in (1, 3):
    state = _run(kw, params, scaffold(CLIENT_LR), data, chunk)
    assert helpers.max_abs_diff(state.params, x) < 1e-5
    assert helpers.max_abs_diff(state.technique, c) < 1e-5
    for cid in range(n):
      row = jax.tree.map(lambda s, cid=cid: s[cid], state.clients)
      assert helpers.max_abs_diff(row, ci[cid]) < 1e-4, cid
  # SCAFFOLD moved the model somewhere FedAvg does not.
  fedavg = _run(kw, params, core.identity(), data, 1)
  assert helpers.max_abs_diff(fedavg.params, x) > 1e-3
  # Clients never sampled keep a zero control variate.
  never = set(range(n)) - {c for cs in COHORTS for c in cs}
  for cid in never:
    assert helpers.max_abs_diff(
        jax.tree.map(lambda s, cid=cid: s[cid], state.clients), zeros) == 0


@pytest.mark.parametrize('codec', ['topk', 'quantize', 'topk+quantize'])
def test_error_feedback_matches_hand_written_loop(codec):
  data = helpers.ragged_clients()
  n = data.num_clients
  chain = [codecs.topk_codec(k=3)] if 'topk' in codec else []
  if 'quantize' in codec:
    chain.append(codecs.quantize_codec(2 if codec == 'quantize' else 8))
  codec_fn = codecs.chain_codecs(*chain)
  tech = compression.compress(chain, error_feedback=True)
  kw, params = _setup(tech)
  mask = jax.tree.map(lambda _: True, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  # Hand-written error feedback: e = Δ + r; send C(e); r <- e - D(C(e)).
  x, residual = params, [zeros] * n
  for r in range(len(COHORTS)):
    cohort = _cohort(data, r)
    sent_all, weights = [], []
    for i, cid in enumerate(COHORTS[r]):
      delta, _ = _local_sgd(kw, x, cohort, i)
      e = jax.tree.map(jnp.add, delta, residual[cid])
      key = core.round.split_client_key(
          jax.random.fold_in(jax.random.key(r), i))[2]
      sent = codecs.from_wire(codec_fn.decode(codec_fn.encode(
          codecs.to_wire(e, mask), key)))
      residual[cid] = jax.tree.map(jnp.subtract, e, sent)
      sent_all.append(sent)
      weights.append(float(cohort.weight[i]))
    x = jax.tree.map(jnp.subtract, x, _weighted_mean(sent_all, weights))
  for chunk in (1, 3):
    state = _run(kw, params, tech, data, chunk)
    assert helpers.max_abs_diff(state.params, x) < 1e-5
    for cid in range(n):
      row = jax.tree.map(lambda s, cid=cid: s[cid], state.clients)
      assert helpers.max_abs_diff(row, residual[cid]) < 1e-5, cid
  # The residual is what the top-k dropped: non-zero for sampled clients.
  assert max(float(jnp.max(jnp.abs(l))) for l in
             jax.tree.leaves(residual[COHORTS[0][0]])) > 0
  # Without feedback the model differs.
  plain = _run(kw, params, compression.compress(chain), data, 1)
  assert helpers.max_abs_diff(plain.params, x) > 1e-6


def test_stateful_round_matches_reference_loop():
  data = helpers.ragged_clients()
  tech = core.chain(scaffold(CLIENT_LR), compression.compress(
      [codecs.quantize_codec(4)], error_feedback=True))
  kw, params = _setup(tech)
  fns = core.build_round(**kw, chunk_size=2, donate=False,
                         population=data.num_clients)
  ref = core.build_reference_round(**kw, chunk_size=2)
  state = ref_state = fns.init(params)
  for r in range(2):
    cohort = _cohort(data, r)
    state, m = fns.round_step(state, cohort, jax.random.key(r))
    ref_state, rm = ref(ref_state, cohort, jax.random.key(r))
    np.testing.assert_array_equal(np.asarray(m.client_upload_bits),
                                  rm['client_upload_bits'])
  assert helpers.max_abs_diff(state.params, ref_state.params) < 1e-5
  assert helpers.max_abs_diff(state.technique, ref_state.technique) < 1e-5
  assert helpers.max_abs_diff(state.clients, ref_state.clients) < 1e-4
  # State types and shapes are stable across rounds (no recompilation).
  assert jax.tree.structure(state) == jax.tree.structure(fns.init(params))


def test_client_state_store_needs_population_and_is_bounded():
  kw, params = _setup(scaffold(CLIENT_LR))
  with pytest.raises(ValueError, match='population'):
    core.build_round(**kw).init(params)
  with pytest.raises(ValueError, match='MiB.*client_state_limit'):
    core.build_round(**kw, population=10 ** 6,
                     client_state_limit_bytes=1 << 20).init(params)


def test_stateless_state_has_no_store():
  kw, params = _setup(core.identity())
  state = core.build_round(**kw).init(params)
  assert state.technique == () and state.clients == ()


def test_host_client_store_equals_device_store():
  """The store in host memory (data packed on the host) gives the device
  store's results: the cohort brings its clients' rows, the round
  returns their new rows."""
  data = helpers.ragged_clients()
  tech = core.chain(scaffold(CLIENT_LR), compression.compress(
      [codecs.topk_codec(k=3)], error_feedback=True))
  kw, params = _setup(tech)
  device = _run(kw, params, tech, data, 2)
  fns = core.build_round(**kw, chunk_size=2, donate=False,
                         population=data.num_clients, client_store='host')
  state, store = fns.init(params), fns.host_store(params)
  assert state.clients == () and store.nbytes > 0
  for r in range(len(COHORTS)):
    cohort = _cohort(data, r)
    ids = cohort.ctx['client_index']
    cohort = cohort._replace(ctx=dict(cohort.ctx,
                                      client_state=store.rows(ids)))
    state, metrics = fns.round_step(state, cohort, jax.random.key(r))
    store.write(ids, metrics)
  assert helpers.max_abs_diff(state.params, device.params) < 1e-6
  assert helpers.max_abs_diff(state.technique, device.technique) < 1e-6
  assert helpers.max_abs_diff(store.states, device.clients) < 1e-6


def test_bad_client_state_limit_is_refused_before_training():
  from fedjax_eff.experiment.defaults import base_config
  from fedjax_eff.experiment.validation import validate_config
  for bad in (0.0, -1.0, float('nan')):
    c = base_config()
    c.client_state_limit_gib = bad
    with pytest.raises(ValueError, match='config.client_state_limit_gib'):
      validate_config(c)
