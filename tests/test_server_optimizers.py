"""FedOpt server optimizers against hand-written NumPy of Reddi et al. 2020."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_eff import core


def _numpy_fedopt(kind, x, deltas, lr, b1, b2, eps, v0):
  """Algorithm 2 of Reddi et al. with Δ_t = -(mean delta) (client - server).

  Our deltas are x_server - x_client, so the paper's Δ_t = -delta and
  x_{t+1} = x_t + η m_t / (√v_t + τ).
  """
  m = np.zeros_like(x)
  v = np.full_like(x, v0)
  for delta in deltas:
    d = -delta  # the paper's Δ_t
    m = b1 * m + (1 - b1) * d
    if kind == 'adam':
      v = b2 * v + (1 - b2) * d * d
    elif kind == 'yogi':
      v = v - (1 - b2) * d * d * np.sign(v - d * d)
    else:
      v = v + d * d
    x = x + lr * m / (np.sqrt(v) + eps)
  return x


@pytest.mark.parametrize('kind', ['adam', 'yogi', 'adagrad'])
def test_fedopt_matches_numpy_formulas(kind):
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(5, 3))
  deltas = [rng.normal(size=(5, 3)) * s for s in (1.0, 0.1, 2.0, 0.01)]
  b1 = 0.0 if kind == 'adagrad' else 0.9
  opt = core.make_optimizer('fed' + kind, 0.03, eps=1e-3,
                            **({} if kind == 'adagrad' else {'b2': 0.99}))
  params = {'w': jnp.asarray(x0, jnp.float32)}
  state = opt.init(params)
  for d in deltas:
    updates, state = opt.update({'w': jnp.asarray(d, jnp.float32)}, state,
                                params)
    params = optax.apply_updates(params, updates)
  expected = _numpy_fedopt(kind, x0, deltas, 0.03, b1, 0.99, 1e-3, 1e-6)
  np.testing.assert_allclose(params['w'], expected, rtol=1e-5, atol=1e-6)


def test_fedadam_has_no_bias_correction():
  # After one step from zero moments, bias-corrected Adam would move by ~lr
  # per coordinate; Reddi's FedAdam moves by lr * 0.1 g / (sqrt(0.01 g²) + τ).
  opt = core.make_optimizer('fedadam', 1.0, b1=0.9, b2=0.99, eps=1e-3,
                            initial_accumulator=0.0)
  g = {'w': jnp.asarray([2.0])}
  updates, _ = opt.update(g, opt.init(g), g)
  expected = -0.1 * 2.0 / (np.sqrt(0.01 * 4.0) + 1e-3)
  np.testing.assert_allclose(updates['w'], [expected], rtol=1e-6)


def test_fedavg_and_fedavgm():
  x = {'w': jnp.asarray([1.0, 2.0])}
  d = {'w': jnp.asarray([0.5, -1.0])}
  opt = core.make_optimizer('fedavg', 1.0)
  u, _ = opt.update(d, opt.init(x), x)
  np.testing.assert_allclose(optax.apply_updates(x, u)['w'], [0.5, 3.0])
  opt = core.make_optimizer('fedavgm', 0.5, momentum=0.9)
  s = opt.init(x)
  u1, s = opt.update(d, s, x)
  u2, s = opt.update(d, s, x)
  np.testing.assert_allclose(u2['w'], -0.5 * (0.9 * 1 + 1) * d['w'] / 1.0,
                             rtol=1e-6)


def test_any_optax_optimizer_by_name_and_clear_errors():
  opt = core.make_optimizer('adafactor', 0.1)
  x = {'w': jnp.ones((4, 4))}
  opt.update(x, opt.init(x), x)
  with pytest.raises(ValueError, match='nonsense'):
    core.make_optimizer('nonsense', 0.1)
  with pytest.raises(ValueError, match='rejected'):
    core.make_optimizer('sgd', 0.1, not_an_arg=3)


def test_uncovered_parameter_keeps_value_under_momentum():
  """server_update: zero coverage -> no update even with adaptive state."""
  opt = core.make_optimizer('fedadam', 0.1)
  params = {'a': jnp.ones(3), 'b': jnp.ones(2)}
  state = core.ServerState(params, opt.init(params), jnp.int32(0))
  delta = {'a': jnp.full(3, 0.5), 'b': jnp.zeros(2)}
  cov = {'a': jnp.ones(3), 'b': jnp.zeros(2)}
  state = core.round.server_update(opt, state, delta, cov)
  state = core.round.server_update(opt, state, jax.tree.map(jnp.zeros_like,
                                                            delta),
                                   jax.tree.map(jnp.zeros_like, cov))
  np.testing.assert_array_equal(state.params['b'], np.ones(2))
  np.testing.assert_array_equal(state.params['a'][0], state.params['a'][1])
