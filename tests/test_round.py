"""The vectorised round against its slow twin, and padding exactness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_eff import core
from tests import helpers


def _run(round_kwargs, params, cohort, chunk_size, rng=None):
  rng = jax.random.key(7) if rng is None else rng
  fns = core.build_round(**round_kwargs, chunk_size=chunk_size, donate=False)
  return fns.round_step(fns.init(params), cohort, rng)


def _reference(round_kwargs, params, cohort, rng=None):
  rng = jax.random.key(7) if rng is None else rng
  ref = core.build_reference_round(**round_kwargs)
  init = core.build_round(**round_kwargs, donate=False).init(params)
  return ref(init, cohort, rng)


@pytest.mark.parametrize('server', ['fedavg', 'fedadam'])
def test_vectorised_round_matches_reference_loop(server):
  kw, params = helpers.tiny_setup(server=server, server_lr=0.05
                                  if server == 'fedadam' else 1.0)
  cohort = helpers.tiny_cohort()  # 7 ragged clients: padded steps/examples
  ref_state, ref_m = _reference(kw, params, cohort)
  for c in (1, 3, 7):  # 3 leaves 2 padded client slots
    state, m = _run(kw, params, cohort, c)
    assert helpers.max_abs_diff(state.params, ref_state.params) < 1e-5, c
    assert helpers.max_abs_diff(state.opt_state, ref_state.opt_state) < 1e-5
    assert abs(float(m.train_loss) - ref_m['train_loss']) < 1e-5
    assert abs(float(m.train_accuracy) - ref_m['train_accuracy']) < 1e-6
    assert int(state.round) == 1
  # Training actually changed the model.
  assert helpers.max_abs_diff(ref_state.params, params) > 1e-3


def test_multi_round_reference_with_fedprox_and_momentum_client():
  import optax
  kw, params = helpers.tiny_setup(server='fedavgm', server_lr=0.5,
                                  prox_mu=0.3,
                                  server_kwargs={'momentum': 0.9})
  kw['client_optimizer'] = optax.sgd(0.05, momentum=0.9)
  data = helpers.ragged_clients()
  fns = core.build_round(**kw, chunk_size=2, donate=False)
  ref = core.build_reference_round(**kw)
  s_vec = s_ref = fns.init(params)
  for r in range(3):
    cohort = helpers.tiny_cohort(data, round_num=r)
    s_vec, _ = fns.round_step(s_vec, cohort, jax.random.key(r))
    s_ref, _ = ref(s_ref, cohort, jax.random.key(r))
  assert helpers.max_abs_diff(s_vec.params, s_ref.params) < 1e-5


def test_fedprox_term_changes_the_update():
  kw0, params = helpers.tiny_setup()
  kw1, _ = helpers.tiny_setup(prox_mu=10.0)
  cohort = helpers.tiny_cohort()
  s0, _ = _run(kw0, params, cohort, 1)
  s1, _ = _run(kw1, params, cohort, 1)
  # A strong proximal term keeps clients (and so the server) nearer the start.
  d0 = helpers.max_abs_diff(s0.params, params)
  d1 = helpers.max_abs_diff(s1.params, params)
  assert d1 < d0


def test_padded_examples_and_steps_change_nothing():
  kw, params = helpers.tiny_setup(model='mlp', model_kwargs={'hidden': (8,)})
  data = helpers.ragged_clients(sizes=(5, 9))
  small = helpers.tiny_cohort(data, steps=3, batch=4)     # capacity 12
  big = helpers.tiny_cohort(data, steps=6, batch=4)       # capacity 24
  # Same examples in the same order; `big` only adds fully padded steps.
  np.testing.assert_array_equal(big.mask[:, :3], small.mask)
  s_small, m_small = _run(kw, params, small, 1)
  s_big, m_big = _run(kw, params, big, 1)
  assert helpers.max_abs_diff(s_small.params, s_big.params) == 0.0
  assert float(m_small.train_loss) == pytest.approx(float(m_big.train_loss))
  # A padded example's content is irrelevant: fill the padding with garbage.
  noisy = small._replace(batches={
      'x': np.where(small.mask[..., None, None, None] > 0,
                    small.batches['x'], 1e3).astype(np.float32),
      'y': np.where(small.mask > 0, small.batches['y'], 4).astype(np.int32)})
  s_noisy, _ = _run(kw, params, noisy, 1)
  assert helpers.max_abs_diff(s_noisy.params, s_small.params) == 0.0


def test_padded_step_keeps_optimizer_state():
  """With client momentum, a padded step must not advance the momentum."""
  import optax
  kw, params = helpers.tiny_setup(model='logreg')
  kw['client_optimizer'] = optax.sgd(0.1, momentum=0.9)
  client_update = core.build_round(**kw).client_update
  data = helpers.ragged_clients(sizes=(4,))
  c1 = helpers.tiny_cohort(data, steps=1, batch=4)
  c3 = helpers.tiny_cohort(data, steps=3, batch=4)  # 2 padded steps after
  args = lambda c: (params, {k: v[0] for k, v in c.batches.items()},
                    c.mask[0], {k: v[0] for k, v in c.ctx.items()},
                    jax.random.key(0), jnp.int32(0))
  o1, o3 = client_update(*args(c1)), client_update(*args(c3))
  # (one step runs as it is, three in a loop: compiled apart, an ulp
  # apart; a momentum advanced by the padded steps moves it by ~1e-2)
  assert helpers.max_abs_diff(o1.delta, o3.delta) < 1e-6


def test_empty_client_slots_contribute_nothing():
  kw, params = helpers.tiny_setup()
  data = helpers.ragged_clients(sizes=(6, 8, 10))
  full = helpers.tiny_cohort(data)
  s_a, _ = _run(kw, params, full, 2)  # 3 clients, C=2: one padded slot
  s_b, _ = _run(kw, params, full, 3)
  assert helpers.max_abs_diff(s_a.params, s_b.params) < 1e-6


def test_chunk_size_invariance_many_clients():
  kw, params = helpers.tiny_setup(model='mlp', model_kwargs={'hidden': (8,)})
  data = helpers.ragged_clients(sizes=tuple(range(1, 24)))
  cohort = helpers.tiny_cohort(data, steps=2, batch=4)
  results = [_run(kw, params, cohort, c)[0].params for c in (1, 4, 5, 23)]
  for r in results[1:]:
    assert helpers.max_abs_diff(results[0], r) < 1e-6


def test_non_finite_client_is_dropped_and_counted():
  kw, params = helpers.tiny_setup(model='logreg')
  data = helpers.ragged_clients(sizes=(6, 8, 10))
  cohort = helpers.tiny_cohort(data)
  x = cohort.batches['x'].copy()
  x[1, 0, 0] = np.inf  # client 1's first example is corrupt
  bad = cohort._replace(batches={**cohort.batches, 'x': x})
  state, m = _run(kw, params, bad, 1)
  assert float(m.num_dropped) == 1.0
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(state.params))
  # Equal to a round without that client.
  without = cohort._replace(weight=cohort.weight * np.array([1, 0, 1],
                                                            np.float32))
  s_wo, _ = _run(kw, params, without, 1)
  assert helpers.max_abs_diff(state.params, s_wo.params) < 1e-6
  _, ref_m = _reference(kw, params, bad)
  assert ref_m['num_dropped'] == 1


def test_per_client_keys_differ_and_do_not_depend_on_chunk():
  keys = core.round.client_keys(jax.random.key(0), 8)
  data = jax.random.key_data(keys)
  assert len({tuple(np.asarray(d).ravel()) for d in data}) == 8
  # Dropout makes the key matter: the CNN with dropout under C=1 and C=all.
  kw, params = helpers.tiny_setup(model='cnn')
  cohort = helpers.tiny_cohort()
  a, _ = _run(kw, params, cohort, 1, jax.random.key(3))
  b, _ = _run(kw, params, cohort, 7, jax.random.key(3))
  c, _ = _run(kw, params, cohort, 7, jax.random.key(4))
  assert helpers.max_abs_diff(a.params, b.params) < 1e-6
  assert helpers.max_abs_diff(a.params, c.params) > 1e-4


def test_rounds_compile_once():
  """Later rounds (new cohorts, new keys, new state) reuse the first
  round's program: the round never recompiles (counted with JAX's own
  backend-compile events)."""
  compiles = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == '/jax/core/compile/backend_compile_duration':
      compiles.append(event)
  kw, params = helpers.tiny_setup(server='fedadam', server_lr=0.01)
  fns = core.build_round(**kw, chunk_size=3)
  state = fns.init(params)
  data = helpers.ragged_clients()
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    per_round = []
    for r in range(4):
      cohort = helpers.tiny_cohort(data, round_num=r)
      before = len(compiles)
      state, m = fns.round_step(state, cohort, jax.random.key(r))
      jax.block_until_ready(state.params)
      per_round.append(len(compiles) - before)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert per_round[0] >= 1 and per_round[1:] == [0, 0, 0], per_round
