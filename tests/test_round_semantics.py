"""Round semantics that depend on neither backend nor dtype: float64
rounds, per-parameter coverage in the server optimizer, and choices drawn
per chunk only at a chunk width the user names."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_eff import core
from fedjax_eff.core import round as round_lib
from tests import helpers

pytestmark = pytest.mark.usefixtures('fast_compiles')


def test_float64_round_runs_in_the_parameters_dtype():
  with jax.enable_x64(True):
    kw, params = helpers.tiny_setup(model='mlp',
                                    model_kwargs=dict(hidden=(8,)))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    cohort = helpers.tiny_cohort()
    cohort = cohort._replace(batches={
        'x': cohort.batches['x'].astype(np.float64),
        'y': cohort.batches['y']})
    fns, state, metrics, ref_state, _ = helpers.round_vs_reference(
        kw, params, cohort, jax.random.key(0), chunk_size=3)
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(state.params))
    assert metrics.train_loss.dtype == jnp.float64
    # Float64 agreement far below float32's resolution.
    assert helpers.max_abs_diff(state.params, ref_state.params) < 1e-12


def test_server_optimizer_sees_uncovered_parameters_not_at_all():
  kw, params = helpers.tiny_setup(model='mlp', server='fedadam',
                                  server_lr=0.1,
                                  model_kwargs=dict(hidden=(8,)))
  opt = kw['server_optimizer']
  state = round_lib.ServerState(params, opt.init(params),
                                jnp.zeros((), jnp.int32))
  ones = jax.tree.map(jnp.ones_like, params)
  # Round 1: everything covered; round 2: only the head.
  state = round_lib.server_update(opt, state, ones, ones)
  cov = {k: jax.tree.map(jnp.ones_like if k == 'head' else jnp.zeros_like, v)
         for k, v in params.items()}
  before = state
  state = round_lib.server_update(opt, state, ones, cov)
  for name in params:
    for moment in ('m', 'v'):
      a = jax.tree.leaves(getattr(before.opt_state[0], moment)[name])
      b = jax.tree.leaves(getattr(state.opt_state[0], moment)[name])
      same = all(np.array_equal(x, y) for x, y in zip(a, b))
      assert same == (name != 'head'), (name, moment)
  # Uncovered parameters kept their values; the head moved.
  assert helpers.max_abs_diff(before.params['dense0'],
                              state.params['dense0']) == 0
  assert helpers.max_abs_diff(before.params['head'],
                              state.params['head']) > 0


def test_per_chunk_choices_need_a_chunk_width():
  chunky = core.Technique(
      name='chunky', chunk_plan=lambda rng, r: jax.random.bernoulli(rng),
      plan=lambda rng, r, ctx: ctx['chunk'])
  kw, params = helpers.tiny_setup(model='mlp', technique=chunky,
                                  model_kwargs=dict(hidden=(8,)))
  fns = core.build_round(**kw, donate=False)
  with pytest.raises(ValueError, match='chunk_size'):
    fns.round_step(fns.init(params), helpers.tiny_cohort(),
                   jax.random.key(0))
  fns = core.build_round(**kw, chunk_size=2, donate=False)
  fns.round_step(fns.init(params), helpers.tiny_cohort(), jax.random.key(0))


def test_the_experiment_refuses_the_backend_chunk_width_for_chunk_draws():
  from fedjax_eff.experiment.build import check_chunk_width
  chunky = core.Technique(
      name='chunky', chunk_plan=lambda rng, r: jax.random.bernoulli(rng),
      plan=lambda rng, r, ctx: ctx['chunk'])
  with pytest.raises(ValueError, match='config.chunk_size'):
    check_chunk_width(chunky, 3, 1)
  check_chunk_width(core.identity(), 3, 1)


def test_accuracy_hits_are_argmax_hits_ties_and_bad_labels_included():
  """`task.argmax_hits` (two max reductions, the form XLA:CPU vectorizes)
  counts exactly `argmax(logits) == label`: on logits full of ties (where
  argmax takes the first maximum), labels out of range, bfloat16, and the
  tasks' accuracy sums."""
  rng = np.random.default_rng(0)
  for shape, v, dtype in (((64,), 7, np.float32), ((4, 5), 3, np.float32),
                          ((3, 2), 1, np.float32), ((40,), 5, jnp.bfloat16)):
    x = rng.integers(0, 3, shape + (v,)).astype(np.float32)
    y = rng.integers(-1, v + 1, shape)
    got = core.task.argmax_hits(jnp.asarray(x, dtype), jnp.asarray(y))
    np.testing.assert_array_equal(np.asarray(got), np.argmax(x, -1) == y)
  x = rng.normal(size=(6, 5, 11)).astype(np.float32)
  y = rng.integers(0, 11, (6, 5))
  lm = core.next_token()
  hits = (np.argmax(x, -1) == y) & (y != 0) & (y != 2) & (y != 3)
  np.testing.assert_allclose(lm.correct(jnp.asarray(x), {'y': y}),
                             hits.sum(-1))
  np.testing.assert_allclose(
      core.classification().correct(jnp.asarray(x[:, 0]), {'y': y[:, 0]}),
      np.argmax(x[:, 0], -1) == y[:, 0])
