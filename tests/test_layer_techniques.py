"""Layer techniques on a tiny ViT, proved with numbers.

What these tests prove (each assertion can fail):

* Fixed partial training: frozen leaves stay bit-identical to the initial
  params under FedAdam, only the trained layers and the head move, each
  client uploads exactly 32 bits per trained value, and the client optimizer
  is initialised on the trainable leaves only (static masks save state).
* Drawn partial training (per client, per round): the vectorised round
  equals the reference loop; per round, one block moves and the others keep
  their values bit for bit; per client, each block's server delta is the
  weighted mean over exactly the clients that drew it (from the clients'
  own `client_update` outputs: delta and coverage).
* Accounting: on a ViT big enough for XLA's buffer assignment to matter,
  training the last block + head needs less peak memory, fewer FLOPs, fewer
  upload bits and fewer analytic gradient/optimizer/activation bytes than
  training everything.
* Layer-wise training: the schedule's stages; per stage only the active
  block and its head move, with exact upload and download bit counts; the
  vectorised round equals the reference; per-layer heads and a re-initialised
  head behave as documented.
* Depth dropout: gate frequencies; client and chunk modes equal the
  reference; in chunk mode the clients of one chunk share their gates (an
  unbatched `cond` in the program, and a reference that draws per client
  disagrees); p = 0 is exactly no depth dropout.
* Last n / budgets: `choose_n` picks the largest n whose measured cost fits;
  heterogeneous tiers in one round equal the reference, upload tier-exact
  bits, and a block only one tier trains is averaged over that tier only
  (each client's update measured by a round in which it alone has weight);
  `chunk_layout` makes tier-homogeneous chunks.
* The registry builds layer-wise + depth dropout and names bad entries.

XLA:CPU compile time dominates these tests, so the module compiles with
`jax_disable_most_optimizations` (restored, and caches cleared, afterwards;
see conftest's `fast_compiles`; conftest selects XLA:CPU's faster-compiling legacy
emitters for the whole suite) and reuses compiled
round functions through module-level fixtures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedjax_eff import accounting, core, techniques
from fedjax_eff.core import round as round_lib
from fedjax_eff.core import technique as technique_lib
from fedjax_eff.models import get_model
from fedjax_eff.techniques import last_n as last_n_lib
from fedjax_eff.techniques import layerwise as lw
from fedjax_eff.techniques import partial
from tests import helpers

L = 3
VIT = dict(preset='tiny', patch_size=2, num_layers=L)
BLOCKS = tuple(f'block_{i}' for i in range(L))


pytestmark = pytest.mark.usefixtures('fast_compiles')


def _vit(**kwargs):
  """A tiny ViT on 6x6x1 inputs and its params (as `helpers.tiny_setup`,
  but with a jitted init: eager init compiles every initializer op)."""
  m = get_model('vit', 5, **dict(VIT, **kwargs))
  params = jax.jit(m.init)(jax.random.key(0),
                           np.zeros((1, 6, 6, 1), np.float32))['params']
  return m, params


_round_vs_reference = helpers.round_vs_reference
_kw = helpers.round_kw


def _values(params, names) -> int:
  return sum(x.size for n in names for x in jax.tree.leaves(params[n]))


def _num_leaves(params, names) -> int:
  return sum(len(jax.tree.leaves(params[n])) for n in names)


def _assert_same(a, b):
  """Bit-identical trees."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _moved(a, b) -> float:
  return helpers.max_abs_diff(a, b)


def _solo_deltas(fns, state, cohort, rng, **kwargs):
  """Each client's own update, as the server applies it: the round run
  with that client's weight alone (FedAvg, lr 1: `params - new params`).

  Cheaper than compiling `client_update` again: the compiled round is
  reused (same shapes), and it is the clients' training that is shared.
  """
  out = []
  for i in range(cohort.num_clients):
    w = np.where(np.arange(cohort.num_clients) == i, cohort.weight, 0)
    new, _ = fns.round_step(state, cohort._replace(
        weight=w.astype(np.float32)), rng, **kwargs)
    out.append(_delta(state.params, new.params))
  return out


def _delta(old, new):
  return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(
      b, np.float64), old, new)


def _weighted_mean(trees, weight, clients):
  return jax.tree.map(
      lambda *xs: sum(weight[i] * xs[i] for i in clients) / sum(
          weight[i] for i in clients), *trees)


def _covered(delta) -> bool:
  return max(float(np.abs(x).max()) for x in jax.tree.leaves(delta)) > 0


@pytest.fixture(scope='module')
def vit():
  return _vit()


@pytest.fixture(scope='module')
def cohorts():
  return [helpers.tiny_cohort(round_num=r) for r in range(6)]


@pytest.fixture(scope='module')
def schedule():
  return lw.LayerSchedule.make(L, rounds_per_layer=2)


@pytest.fixture(scope='module')
def carry(vit, schedule):
  """Layer-wise training, carried head: one round function, its stages
  compiled once for the layer-wise and the depth-dropout tests."""
  m, _ = vit
  return core.build_round(**_kw(m, lw.layerwise(m, schedule)), chunk_size=3,
                          donate=False)


# 1. Fixed partial training.

def test_fixed_partial_training_freezes_uploads_and_optimizer_state(
    vit, cohorts):
  m, params = vit
  inits = []
  adam = optax.adam(0.05)

  def init(p):  # runs at trace time: how many leaves get optimizer state
    inits.append(len(jax.tree.leaves(p)))
    return adam.init(p)

  tech = partial.partial_training(m, layers=(1,), train_head=True)
  fns = core.build_round(
      **_kw(m, tech, optax.GradientTransformation(init, adam.update),
            server='fedadam', server_lr=0.1), chunk_size=3, donate=False)
  state = fns.init(params)
  for r in range(2):
    state, metrics = fns.round_step(state, cohorts[r], jax.random.key(r))

  for name in ('embed', 'block_0', 'block_2'):
    _assert_same(state.params[name], params[name])
  for name in ('block_1', 'head'):
    assert _moved(state.params[name], params[name]) > 1e-4, name
  bits = 32 * _values(params, ('block_1', 'head'))
  np.testing.assert_array_equal(np.asarray(metrics.client_upload_bits),
                                np.full(7, bits, np.float32))
  assert float(metrics.upload_bits) == bits
  assert inits and set(inits) == {_num_leaves(params, ('block_1', 'head'))}
  assert inits[0] < len(jax.tree.leaves(params))


# 2. Drawn partial training.

def test_partial_training_per_client_equals_reference_and_hand_mean(
    vit, cohorts):
  m, params = vit
  kw = _kw(m, partial.partial_training(m, mode='per_client', num_layers=1))
  cohort, rng = cohorts[0], jax.random.key(2)
  fns, _, _, ref_state, ref = _round_vs_reference(kw, params, cohort, rng)
  one_block = 32 * _values(params, ('block_0', 'head'))
  np.testing.assert_array_equal(ref['client_upload_bits'],
                                np.full(7, one_block))

  # By hand, from each client's own `client_update` output: FedAvg (lr 1)
  # moves each block by the weighted mean of the deltas of the clients that
  # drew it (coverage 1); nobody else's delta counts.
  outs = jax.jit(jax.vmap(fns.client_update,
                          in_axes=(None, 0, 0, 0, 0, None)))(
      params, dict(cohort.batches), cohort.mask, dict(cohort.ctx),
      round_lib.client_keys(rng, 7), jnp.int32(0))
  server_delta = _delta(params, ref_state.params)
  drew = {}
  for name in BLOCKS:
    cov = np.stack([np.asarray(x).reshape(7, -1).max(1) for x in
                    jax.tree.leaves(outs.coverage[name])], 1)
    assert ((cov == 0) | (cov == 1)).all() and (cov == cov[:, :1]).all()
    drew[name] = [i for i in range(7) if cov[i, 0] == 1]
    deltas = [jax.tree.map(lambda x: np.asarray(x[i], np.float64),
                           outs.delta[name]) for i in range(7)]
    for i in set(range(7)) - set(drew[name]):
      assert not _covered(deltas[i])
    if drew[name]:
      mean = _weighted_mean(deltas, cohort.weight, drew[name])
      assert helpers.max_abs_diff(server_delta[name], mean) < 1e-6, name
    else:
      _assert_same(ref_state.params[name], params[name])
  # Each client trained exactly the block its plan drew, and draws differ.
  tech = kw['technique']
  for i in range(7):
    key = round_lib.split_client_key(jax.random.fold_in(rng, i))[0]
    ctx = {k: v[i] for k, v in cohort.ctx.items()}
    b = int(jnp.argmax(tech.plan(key, jnp.int32(0), ctx)))
    assert [n for n in BLOCKS if i in drew[n]] == [f'block_{b}'], i
  assert sum(bool(c) for c in drew.values()) >= 2


def test_partial_training_per_round_equals_reference_one_block_moves(
    vit, cohorts):
  m, params = vit
  kw = _kw(m, partial.partial_training(m, mode='per_round', num_layers=1))
  cohort, rng = cohorts[0], jax.random.key(3)
  _, state, metrics, ref_state, ref = _round_vs_reference(kw, params, cohort,
                                                          rng)
  up = np.asarray(metrics.client_upload_bits)
  np.testing.assert_array_equal(up, np.full(7, 32 * _values(
      params, ('block_0', 'head'))))

  moved = [n for n in BLOCKS if _moved(state.params[n], params[n]) > 0]
  assert len(moved) == 1
  for name in set(BLOCKS) - set(moved) | {'embed'}:
    _assert_same(state.params[name], params[name])
  assert _moved(state.params['head'], params['head']) > 1e-4
  # The moved block is the round's draw: fold_in(key(seed), round).
  expected = int(jnp.argmax(kw['technique'].plan(
      jax.random.key(99), jnp.int32(0), {})))
  assert moved == [f'block_{expected}']


# 3. Accounting.

def test_accounting_fixed_partial_is_cheaper_than_full_training():
  m = get_model('vit', 10, num_layers=4, d_model=128, mlp_dim=256,
                num_heads=2, patch_size=2)
  params = jax.eval_shape(m.init, jax.random.key(0), jax.ShapeDtypeStruct(
      (1, 16, 16, 1), jnp.float32))['params']
  batch = {'x': jax.ShapeDtypeStruct((64, 16, 16, 1), jnp.float32),
           'y': jax.ShapeDtypeStruct((64,), jnp.int32)}
  cost = {name: accounting.client_cost(
      m, core.classification(), tech, optax.adam(1e-3), params, batch,
      local_steps=2)
          for name, tech in (
              ('partial', partial.partial_training(m, layers=(3,))),
              ('identity', core.identity()))}
  for name, c in cost.items():
    print(name, c.as_dict())
  p, f = cost['partial'], cost['identity']
  assert p.peak_bytes < f.peak_bytes
  assert p.flops_per_round < f.flops_per_round
  assert p.upload_bits == 32 * _values(params, ('block_3', 'head'))
  assert f.upload_bits == 32 * sum(x.size for x in jax.tree.leaves(params))
  assert p.analytic.gradient_bytes < f.analytic.gradient_bytes
  assert p.analytic.optimizer_state_bytes < f.analytic.optimizer_state_bytes
  assert p.analytic.activation_bytes < f.analytic.activation_bytes
  assert p.analytic.weights_bytes == f.analytic.weights_bytes


# 4. Layer-wise training.

def test_layer_schedule_stages():
  s = lw.LayerSchedule.make(3, rounds_per_layer=2)
  assert [s.stage(r)[1] for r in range(8)] == [0, 0, 1, 1, 2, 2, 2, 2]
  assert [s.stage(r)[2] for r in range(8)] == [0, 0, 1, 1, 2, 2, 2, 2]
  j = lw.LayerSchedule.make(3, rounds_per_layer=2, final_joint=True)
  assert [j.stage(r) for r in range(6)] == [s.stage(r) for r in range(6)]
  assert all(j.stage(r) == lw.JOINT for r in range(6, 9))
  assert s.stage_start(s.stage(3)) == 2 and j.stage_start(lw.JOINT) == 6


def test_layerwise_trains_active_block_and_head_with_exact_bits(
    vit, cohorts, schedule, carry):
  m, params = vit
  state = carry.init(params)
  states = [state]
  for r in range(6):
    a = schedule.stage(r)[1]
    new, metrics = carry.round_step(state, cohorts[r], jax.random.key(r),
                                    round_num=r)
    trained = {f'block_{a}', 'head'} | ({'embed'} if a == 0 else set())
    for name in params:
      if name in trained:
        assert _moved(new.params[name], state.params[name]) > 1e-5, (r, name)
      else:
        _assert_same(new.params[name], state.params[name])
    up = 32 * _values(params, trained)
    down = 32 * _values(params, {'embed', 'head', *BLOCKS[:a + 1]})
    np.testing.assert_array_equal(np.asarray(metrics.client_upload_bits),
                                  np.full(7, up, np.float32))
    np.testing.assert_array_equal(np.asarray(metrics.client_download_bits),
                                  np.full(7, down, np.float32))
    state = new
    states.append(state)

  # Stage 1 (round 2): the vectorised round equals the reference.
  kw = _kw(m, lw.layerwise(m, schedule))
  ref_state, ref = core.build_reference_round(**kw)(
      states[2], cohorts[2], jax.random.key(2), round_num=2)
  assert helpers.max_abs_diff(states[3].params, ref_state.params) < 1e-5
  np.testing.assert_array_equal(ref['client_upload_bits'], np.full(
      7, 32 * _values(params, ('block_1', 'head'))))


def test_layerwise_per_layer_heads_move_only_the_active_head(
    cohorts, schedule):
  m, params = _vit(per_layer_heads=True)
  heads = tuple(f'head_{i}' for i in range(L))
  fns = core.build_round(**_kw(m, lw.layerwise(m, schedule, 'per_layer')),
                         chunk_size=3, donate=False)
  state = fns.init(params)
  for r in (0, 2, 4):
    a = schedule.stage(r)[1]
    new, metrics = fns.round_step(state, cohorts[r], jax.random.key(r),
                                  round_num=r)
    for name in heads + BLOCKS:
      if name in (f'head_{a}', f'block_{a}'):
        assert _moved(new.params[name], state.params[name]) > 1e-5, name
      else:
        _assert_same(new.params[name], state.params[name])
    up = 32 * _values(params, {f'block_{a}', f'head_{a}'} |
                      ({'embed'} if a == 0 else set()))
    assert float(metrics.upload_bits) == up
    state = new


def test_layerwise_reinit_head_starts_from_the_initial_head(
    vit, cohorts, schedule, carry):
  m, params = vit
  state = carry.init(params)
  for r in range(2):  # stage 0 with the carried head (same as reinit there)
    state, _ = carry.round_step(state, cohorts[r], jax.random.key(r),
                                round_num=r)
  assert int(state.round) == 2
  assert _moved(state.params['head'], params['head']) > 1e-3

  kw = _kw(m, lw.layerwise(m, schedule, 'reinit', init_params=params))
  fns = core.build_round(**kw, chunk_size=3, donate=False)
  new, _ = fns.round_step(state, cohorts[2], jax.random.key(2), round_num=2)
  ref_state, _ = core.build_reference_round(**kw)(
      state, cohorts[2], jax.random.key(2), round_num=2)
  assert helpers.max_abs_diff(new.params, ref_state.params) < 1e-5

  # Clients that do not move (no real examples, weight 1) report exactly
  # where they started: the initial head under 'reinit', the server's head
  # under 'carry'.
  still = cohorts[2]._replace(mask=np.zeros_like(cohorts[2].mask),
                              weight=np.ones_like(cohorts[2].weight))
  reinit, _ = fns.round_step(state, still, jax.random.key(2), round_num=2)
  np.testing.assert_allclose(
      np.concatenate([np.ravel(x) for x in jax.tree.leaves(
          reinit.params['head'])]),
      np.concatenate([np.ravel(x) for x in jax.tree.leaves(params['head'])]),
      atol=1e-6, rtol=0)
  carried, _ = carry.round_step(state, still, jax.random.key(2),
                                round_num=2)
  _assert_same(carried.params, state.params)
  for name in set(params) - {'head'}:
    _assert_same(reinit.params[name], state.params[name])


# 5. Depth dropout.

def test_depth_gates_frequencies():
  keys = jax.random.split(jax.random.key(7), 4000)
  gates = np.asarray(jax.vmap(lambda k: lw.depth_gates(k, 6, 4, 0.3))(keys))
  assert gates.shape == (4000, 6)
  freq = gates.mean(0)
  np.testing.assert_allclose(freq[:4], 0.7, atol=0.03)
  assert gates[:, 4:].all()
  assert np.asarray(lw.depth_gates(keys[0], 6, 4, 0.0)).all()
  assert np.asarray(lw.depth_gates(keys[0], 6, None, 0.3)).all()


def _dropout_kw(m, schedule, p, mode):
  return _kw(m, core.chain(lw.layerwise(m, schedule),
                           lw.depth_dropout(m, schedule, p, mode)))


def _cond_count(fns, stage, params, cohort, chunk):
  cu = fns.client_update_for(stage, 0)
  two = lambda x: np.asarray(x)[:2]
  # As the round calls it: the chunk's step count unbatched.
  jaxpr = jax.make_jaxpr(jax.vmap(
      cu, in_axes=(None, 0, 0, 0, 0, None, None, None)))(
          params, jax.tree.map(two, dict(cohort.batches)), two(cohort.mask),
          jax.tree.map(two, dict(cohort.ctx)),
          round_lib.client_keys(jax.random.key(0), 2), jnp.int32(4), chunk,
          round_lib.last_real_step(two(cohort.mask)))
  return str(jaxpr).count(' cond[')


def test_depth_dropout_client_mode_equals_reference(
    vit, cohorts, schedule, carry):
  m, params = vit
  cohort, rng, r = cohorts[4], jax.random.key(5), 4  # stage: layer 2
  kw = _dropout_kw(m, schedule, 0.5, 'client')
  fns, state, metrics, ref_state, ref = _round_vs_reference(
      kw, params, cohort, rng, round_num=r)
  plain, _ = carry.round_step(carry.init(params), cohort, rng, round_num=r)
  assert helpers.max_abs_diff(state.params, plain.params) > 1e-4
  # Chained after layer-wise, depth dropout leaves the download to it: the
  # stage's prefix of the model, not the whole model.
  for q in (0, 2, 4):
    a = schedule.stage(q)[1]
    t = fns.technique.specialize(fns.technique.stage(q), 0)
    plan = t.plan(jax.random.key(0), jnp.int32(q), {})
    assert technique_lib.download_bits(t, params, plan) == 32 * _values(
        params, {'embed', 'head', *BLOCKS[:a + 1]})
  # Per-client gates are batched under vmap: a select, no `cond` (the
  # round skips steps past the chunk's longest client by its loop's trip
  # count, no `cond` either).
  assert _cond_count(fns, fns.technique.stage(r), params, cohort, None) == 0

  # p = 0: exactly no depth dropout.
  zero = core.build_round(**_dropout_kw(m, schedule, 0.0, 'client'),
                          chunk_size=3, donate=False)
  none, _ = zero.round_step(zero.init(params), cohort, rng, round_num=r)
  _assert_same(none.params, plain.params)


def test_depth_dropout_chunk_mode_equals_reference_and_shares_gates(
    vit, cohorts, schedule):
  m, params = vit
  cohort, rng, r = cohorts[4], jax.random.key(5), 4
  kw = _dropout_kw(m, schedule, 0.5, 'chunk')
  out = {}
  for c in (1, 2):
    fns, state, metrics, ref_state, ref = _round_vs_reference(
        kw, params, cohort, rng, chunk_size=c, round_num=r)
    out[c] = (state, ref_state)
  # C = 2 shares one draw per chunk: a reference drawing per client
  # (C = 1) disagrees with it.
  assert helpers.max_abs_diff(out[2][0].params, out[1][1].params) > 1e-4
  # Unbatched chunk gates reach the model's `lax.cond`: a real skip.
  stage = fns.technique.stage(r)
  t = fns.technique.specialize(stage, 0)
  chunk = t.chunk_plan(jax.random.key(0), jnp.int32(r))
  # (the round skips steps without examples by its loop's trip count)
  assert _cond_count(fns, stage, params, cohort, chunk) >= 1


# 6. Last n layers, budgets and tiers.

@pytest.fixture(scope='module')
def last_n_costs():
  """Measured `client_cost` of last_n for n = 0..2 on a 2-layer tiny ViT
  (the programs `budgeted_last_n` measures)."""
  m = get_model('vit', 5, **dict(VIT, num_layers=2))
  params = jax.eval_shape(m.init, jax.random.key(0), jax.ShapeDtypeStruct(
      (1, 6, 6, 1), jnp.float32))['params']
  batch = {'x': jax.ShapeDtypeStruct((16, 6, 6, 1), jnp.float32),
           'y': jax.ShapeDtypeStruct((16,), jnp.int32)}
  return {n: accounting.client_cost(
      m, core.classification(),
      last_n_lib.last_n(m, n).specialize(None, 0), optax.sgd(0.1), params,
      batch, local_steps=3, analytic=False) for n in range(3)}


def test_choose_n_picks_largest_n_that_fits(last_n_costs):
  table, Budget = last_n_costs, last_n_lib.Budget
  for n, c in table.items():
    print(n, c.as_dict())
  # Costs rise with n on every axis, so a budget between n = 1 and n = 2
  # on any one axis allows n = 1 and not n = 2.
  for a, b in ((0, 1), (1, 2)):
    assert table[a].peak_bytes < table[b].peak_bytes
    assert table[a].flops_per_round < table[b].flops_per_round
    assert table[a].upload_bits < table[b].upload_bits
  mid = lambda f: (f(table[1]) + f(table[2])) / 2
  budgets = [
      Budget(memory_bytes=mid(lambda c: c.peak_bytes)),
      Budget(flops_per_round=mid(lambda c: c.flops_per_round)),
      Budget(upload_bytes=mid(lambda c: c.upload_bits / 8)),
      Budget(),
      Budget(memory_bytes=table[0].peak_bytes),
  ]
  measured = []

  def cost_of_n(n):
    measured.append(n)
    return table[n]
  chosen, got = last_n_lib.choose_n(budgets, 2, cost_of_n)
  assert chosen == [1, 1, 1, 2, 0]
  assert sorted(measured) == [0, 1, 2] and got == table
  for b, n in zip(budgets, chosen):
    assert b.fits(got[n])
    if n < 2:
      assert not b.fits(got[n + 1])
  with pytest.raises(ValueError, match='tier 1'):
    last_n_lib.choose_n([Budget(), Budget(memory_bytes=1)], 2,
                        lambda n: table[n])


def test_chunk_layout_tier_homogeneous():
  tiers = np.array([0, 1, 1, 0, 1, 0, 0])
  layout = round_lib.chunk_layout(7, 2, tiers, 2)
  assert len(layout.chunk_tier) == (7 + 2 * 1) // 2
  chunks = layout.order.reshape(-1, 2)
  for chunk, t in zip(chunks, layout.chunk_tier):
    real = chunk[chunk < 7]
    if t == 2:
      assert real.size == 0
    else:
      assert (tiers[real] == t).all() and real.size > 0
  assert sorted(layout.order[layout.order < 7]) == list(range(7))
  with pytest.raises(ValueError):
    round_lib.chunk_layout(7, 2, np.array([0, 1, 2, 0, 1, 0, 0]), 2)


def test_last_n_tiers_in_one_round(vit, cohorts):
  m, params = vit
  tiers = np.array([0, 1, 1, 0, 1, 0, 0])
  cohort = cohorts[0]._replace(ctx=dict(cohorts[0].ctx, tier=tiers))
  rng = jax.random.key(6)
  kw = _kw(m, last_n_lib.last_n(m, (1, 3)))
  fns, state, metrics, ref_state, ref = _round_vs_reference(
      kw, params, cohort, rng, chunk_size=2, num_tiers=2)
  up = np.asarray(metrics.client_upload_bits)
  np.testing.assert_array_equal(up, ref['client_upload_bits'])
  bits = [32 * _values(params, ('block_2', 'head')),
          32 * sum(x.size for x in jax.tree.leaves(params))]
  np.testing.assert_array_equal(up, np.take(bits, tiers))

  # block_0: only tier-1 clients (n = 3) train it; its server delta is
  # their weighted mean, tier-0 clients do not dilute it. block_2 and the
  # head: every client trains them.
  solo = _solo_deltas(fns, fns.init(params), cohort, rng)
  server_delta = _delta(params, ref_state.params)
  trains_block_0 = [i for i in range(7) if _covered(solo[i]['block_0'])]
  assert trains_block_0 == [1, 2, 4]
  mean = _weighted_mean([d['block_0'] for d in solo], cohort.weight,
                        trains_block_0)
  assert helpers.max_abs_diff(server_delta['block_0'], mean) < 1e-6
  diluted = jax.tree.map(lambda x: x * cohort.weight[trains_block_0].sum()
                         / cohort.weight.sum(), mean)
  assert helpers.max_abs_diff(server_delta['block_0'], diluted) > 1e-4
  for name in ('block_2', 'head'):
    mean = _weighted_mean([d[name] for d in solo], cohort.weight, range(7))
    assert helpers.max_abs_diff(server_delta[name], mean) < 1e-6


# 7. The registry.

def test_registry_builds_layerwise_with_depth_dropout(vit):
  m, params = vit
  ctx = techniques.TechniqueContext(m, params)
  t = techniques.build([ml_collections.ConfigDict(dict(
      name='layerwise', rounds_per_layer=2, depth_dropout=0.5,
      depth_dropout_mode='chunk'))], ctx)
  assert t.stage(0) == (('layer', 0, 0), ('layer', 0, 0))
  assert t.stage(5) == (('layer', 2, 2), ('layer', 2, 2))
  assert t.specialize(t.stage(4), 0).chunk_plan is not None
  with pytest.raises(ValueError, match=r"techniques\[1\].name='layerwize'"):
    techniques.build([dict(name='identity'), dict(name='layerwize')], ctx)
  with pytest.raises(ValueError, match=r'techniques\[0\] \(layerwise\).*'
                     'rounds_per_leyer'):
    techniques.build([dict(name='layerwise', rounds_per_leyer=2)], ctx)
  with pytest.raises(ValueError, match=r'techniques\[0\] \(layerwise\): '
                     'depth_dropout p=1.5'):
    techniques.build([dict(name='layerwise', rounds_per_layer=2,
                           depth_dropout=1.5)], ctx)
  with pytest.raises(ValueError, match="mode='sometimes'"):
    techniques.build([dict(name='layerwise', rounds_per_layer=2,
                           depth_dropout=0.5,
                           depth_dropout_mode='sometimes')], ctx)


def test_backward_order_trains_embedding_with_layer_0_only():
  """A backward schedule starts at the top layer: the embedding stays
  frozen (and backward stops below the active layer) until layer 0."""
  m, params = _vit()
  sched = lw.LayerSchedule.make(L, 1, 'backward')
  t = lw.layerwise(m, sched)
  for r, a in ((0, L - 1), (L - 1, 0)):
    prog = core.chain(t.specialize(sched.stage(r), 0))
    found = technique_lib.trace_plan(prog, params, {'client_index': 0})
    flags = {k: all(jax.tree.leaves(v)) for k, v in found['flags'].items()}
    assert flags['embed'] == (a == 0)
    assert flags[f'block_{a}'] and flags['head']
    assert found['forward'] == dict(depth=a + 1,
                                    stop_below=None if a == 0 else a)


def test_device_programs_of_dynamic_choices_are_static_and_cheaper():
  """What the accounting compiles for drawn choices: a typical device's
  static program (a fixed drawn subset; static depth-dropout gates)."""
  m, params = _vit()
  ctx = {'client_index': 0}
  t = partial.partial_training(m, mode='per_client', num_layers=1)
  found = technique_lib.trace_plan(
      core.chain(technique_lib.device_program(t)), params, ctx)
  trained = {k for k, v in found['flags'].items() if all(jax.tree.leaves(v))}
  assert len(trained & set(BLOCKS)) == 1 and 'head' in trained
  assert not any(jax.tree.leaves(found['flags']['embed']))

  sched = lw.LayerSchedule.make(L, 1)
  stage = sched.stage(L - 1)
  plain = lw.layerwise(m, sched).specialize(stage, 0)
  x = np.zeros((8, 6, 6, 1), np.float32)
  batch = {'x': x, 'y': np.zeros((8,), np.int32)}
  cost = lambda tech: accounting.client_cost(
      m, core.classification(), tech, optax.sgd(0.1), params, batch, 2,
      analytic=False).flops_per_round
  for mode in ('client', 'chunk', 'step'):
    dd = core.chain(plain, lw.depth_dropout(m, sched, 0.5, mode).specialize(
        stage, 0))
    device = technique_lib.device_program(dd)
    assert device.chunk_plan is None  # static: nothing drawn
    # p = 0.5 of the 2 frozen layers: one is skipped on the device.
    assert cost(device) < cost(plain)
