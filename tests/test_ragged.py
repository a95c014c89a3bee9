"""Work proportional to real examples (issue 18, item 2).

A step past a chunk's longest client holds no example: the round skips it
(`lax.cond` on an unbatched step count), and with chunks wider than one
client the host orders each tier's clients by step count, so that a chunk
holds clients of similar counts. Results equal the padded computation (the
reference loop) and do not depend on C.
"""

from __future__ import annotations

import itertools
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


def _least_computed(steps, c):
  """min over every split of `steps` (padded with 0-step slots to whole
  chunks of `c`) of sum_chunks c x (the chunk's longest): brute force."""
  items = sorted(list(steps) + [0] * (-len(steps) % c))

  def best(rest):
    if not rest:
      return 0
    first, others = rest[0], rest[1:]
    out = None
    for idx in itertools.combinations(range(len(others)), c - 1):
      chunk = [first] + [others[i] for i in idx]
      left = [x for i, x in enumerate(others) if i not in idx]
      cost = c * max(chunk) + best(left)
      out = cost if out is None else min(out, cost)
    return out
  return best(items)


@pytest.mark.parametrize('k,c', [(7, 2), (8, 3), (9, 4)])
def test_chunks_by_steps_compute_the_least_of_any_layout(k, c):
  """With one client per chunk lane, ordering by steps is optimal: no
  other assignment of clients to chunks computes fewer steps (so
  `benchmarks/ragged.py`'s useful fraction at C > 1 is this design's
  ceiling for the sizes it samples)."""
  rng = np.random.default_rng(k * 10 + c)
  for _ in range(20):
    steps = rng.integers(1, 30, size=k)
    layout = placement.chunk_layout(k, c, steps=steps)
    slots = np.where(layout.order < k, steps[np.minimum(layout.order, k - 1)],
                     0).reshape(-1, c)
    ran = c * slots.max(axis=1)[layout.chunk_tier == 0].sum()
    assert ran == _least_computed(steps, c)


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
