"""Work proportional to real examples (issue 18, item 2).

A step past a chunk's longest client holds no example: the round skips it
(`lax.cond` on an unbatched step count), and with chunks wider than one
client the host orders each tier's clients by step count, so that a chunk
holds clients of similar counts. Results equal the padded computation (the
reference loop) and do not depend on C.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_eff import core
from fedjax_eff.core import placement
from fedjax_eff.data import cohort as cohort_lib
from tests import helpers

SIZES = (3, 7, 20, 40, 1, 12, 9, 2)
B = 4


def _cohort():
  data = helpers.ragged_clients(SIZES)
  steps = cohort_lib.epoch_steps(data.client_sizes, B, 1)
  return cohort_lib.pack(data, np.arange(len(SIZES)), steps=steps,
                         batch_size=B, seed=0, round_num=0, epochs=1)


def test_client_steps_and_layout_by_steps():
  cohort = _cohort()
  steps = placement.client_steps(cohort.mask)
  np.testing.assert_array_equal(steps, [-(-n // B) for n in SIZES])
  # C > 1: most steps first, so a chunk runs to a similar count; C = 1:
  # cohort order (no chunk shares anything).
  order = placement.chunk_layout(len(SIZES), 2, steps=steps).order
  assert list(steps[order]) == sorted(steps, reverse=True)
  np.testing.assert_array_equal(
      placement.chunk_layout(len(SIZES), 1, steps=steps).order,
      np.arange(len(SIZES)))
  # Tiers keep their chunks; within a tier, by steps.
  tiers = np.array([0, 1, 0, 1, 0, 1, 0, 1])
  layout = placement.chunk_layout(len(SIZES), 2, tiers, 2, steps=steps)
  for t, chunk in zip(layout.chunk_tier, layout.order.reshape(-1, 2)):
    real = chunk[chunk < len(SIZES)]
    assert (tiers[real] == t).all()
  t0 = layout.order[:4]
  assert list(steps[t0]) == sorted(steps[tiers == 0], reverse=True)


CALLS = []  # one entry per forward pass of CountingMLP that ran


class CountingMLP(nn.Module):
  """An MLP whose forward pass reports each time it runs (host callback)."""

  @nn.compact
  def __call__(self, x, train=False):
    jax.debug.callback(lambda: CALLS.append(1))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(5)(nn.relu(nn.Dense(8)(x)))


@pytest.mark.parametrize('chunk', [1, 2, 4])
def test_steps_without_examples_are_not_computed(chunk):
  cohort = _cohort()
  steps = placement.client_steps(cohort.mask)
  calls = CALLS
  model = CountingMLP()
  params = model.init(jax.random.key(0), np.zeros((1, 6, 6, 1)))['params']
  kw = helpers.round_kw(model, core.identity(), optax.sgd(0.1))
  fns, state, _, ref_state, _ = helpers.round_vs_reference(
      kw, params, cohort, jax.random.key(1), chunk_size=chunk)
  calls.clear()
  jax.block_until_ready(fns.round_step(fns.init(params), cohort,
                                       jax.random.key(1)))
  padded = len(SIZES) * cohort.mask.shape[1]
  chunks = np.sort(steps)[::-1].reshape(-1, chunk).max(axis=1)
  # One forward per local step computed (a vmapped chunk calls once per
  # step for all its clients): each chunk runs to its longest client.
  assert len(calls) == chunks.sum(), (len(calls), chunks, padded)
  assert len(calls) < padded // chunk


def test_results_do_not_depend_on_the_chunk_width():
  cohort = _cohort()
  kw, params = helpers.tiny_setup()
  out = [core.build_round(**kw, chunk_size=c, donate=False).round_step(
      core.build_round(**kw, chunk_size=c, donate=False).init(params),
      cohort, jax.random.key(2))[0].params for c in (1, 2, 4)]
  for other in out[1:]:
    assert helpers.max_abs_diff(out[0], other) < 1e-5
