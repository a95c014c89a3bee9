"""The technique hooks the round calls, exercised by small test techniques.

These techniques live in the test on purpose: they prove that a technique
can change what a device trains (trainable), what it sends (encode), and
what the server does (merge/coverage) without touching the round builder,
and that the vectorised round equals the reference loop when plans differ
per client.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_eff import core
from tests import helpers


def freeze_layers(names):
  """Every client freezes the named top-level layers."""
  def trainable(params, plan):
    return {k: jax.tree.map(lambda _: jnp.float32(k not in names), v)
            for k, v in params.items()}
  return core.Technique(name='freeze', trainable=trainable)


def head_on_odd_clients():
  """Per-client dynamic plan: only clients with odd index train the head."""
  def plan(rng, round_num, ctx):
    return ctx['client_index'] % 2
  def trainable(params, plan):
    return {k: jax.tree.map(
        lambda _: plan.astype(jnp.float32) if k == 'head' else jnp.float32(1),
        v) for k, v in params.items()}
  return core.Technique(name='head_odd', plan=plan, trainable=trainable)


def test_identity_technique_bits_count_every_parameter():
  kw, params = helpers.tiny_setup(model='logreg')
  fns = core.build_round(**kw, chunk_size=1, donate=False)
  _, m = fns.round_step(fns.init(params), helpers.tiny_cohort(),
                        jax.random.key(0))
  n = sum(x.size for x in jax.tree.leaves(params))
  assert float(m.upload_bits) == pytest.approx(32 * n, rel=1e-6)
  assert float(m.download_bits) == pytest.approx(32 * n, rel=1e-6)


def test_frozen_layer_is_bit_identical_and_not_uploaded():
  kw, params = helpers.tiny_setup(
      model='mlp', model_kwargs={'hidden': (8, 8)},
      technique=freeze_layers({'dense0'}), server='fedadam', server_lr=0.1)
  fns = core.build_round(**kw, chunk_size=3, donate=False)
  state = fns.init(params)
  for r in range(2):
    state, m = fns.round_step(state, helpers.tiny_cohort(round_num=r),
                              jax.random.key(r))
  for a, b in zip(jax.tree.leaves(state.params['dense0']),
                  jax.tree.leaves(params['dense0'])):
    np.testing.assert_array_equal(a, b)
  assert helpers.max_abs_diff(state.params['head'], params['head']) > 1e-4
  frozen = sum(x.size for x in jax.tree.leaves(params['dense0']))
  total = sum(x.size for x in jax.tree.leaves(params))
  assert float(m.upload_bits) == pytest.approx(32 * (total - frozen),
                                               rel=1e-6)


def test_per_client_plans_average_each_leaf_over_its_trainers():
  kw, params = helpers.tiny_setup(model='mlp', model_kwargs={'hidden': (8,)},
                                  technique=head_on_odd_clients())
  cohort = helpers.tiny_cohort()
  fns = core.build_round(**kw, chunk_size=2, donate=False)
  state, _ = fns.round_step(fns.init(params), cohort, jax.random.key(1))
  ref_state, _ = core.build_reference_round(**kw)(fns.init(params), cohort,
                                                  jax.random.key(1))
  assert helpers.max_abs_diff(state.params, ref_state.params) < 1e-5

  # By hand: the head's server delta is the weighted mean over odd clients.
  outs = [fns.client_update(params, {k: v[i] for k, v in
                                     cohort.batches.items()},
                            cohort.mask[i],
                            {k: v[i] for k, v in cohort.ctx.items()},
                            jax.random.fold_in(jax.random.key(1), i),
                            jnp.int32(0)) for i in range(7)]
  odd = [i for i in range(7) if i % 2]
  w = cohort.weight
  expected = sum(w[i] * np.asarray(outs[i].delta['head']['kernel'])
                 for i in odd) / sum(w[i] for i in odd)
  np.testing.assert_allclose(
      params['head']['kernel'] - state.params['head']['kernel'], expected,
      atol=1e-6)
  for i in range(7):
    if i % 2 == 0:
      assert float(jnp.abs(outs[i].delta['head']['kernel']).max()) == 0.0


def test_chain_composes_masks_and_keeps_identity_semantics():
  t = core.chain(freeze_layers({'dense0'}), freeze_layers({'head'}))
  params = {'dense0': {'w': jnp.ones(2)}, 'head': {'w': jnp.ones(3)},
            'other': {'w': jnp.ones(4)}}
  plan = t.plan(jax.random.key(0), 0, {})
  mask = t.trainable(t.view(params, plan), plan)
  assert float(mask['dense0']['w']) == 0 and float(mask['head']['w']) == 0
  assert float(mask['other']['w']) == 1
  msg, bits = core.technique.upload(t, params, mask, plan,
                                    jax.random.key(1))
  assert float(bits) == 32 * 4
  delta, cov = t.merge(params, core.technique.receive(t, msg, plan), mask,
                       plan)
  np.testing.assert_array_equal(cov['other']['w'], np.ones(4))
  np.testing.assert_array_equal(cov['head']['w'], np.zeros(3))
