"""Asynchronous buffered aggregation (FedBuff; Nguyen et al. 2022,
"Federated learning with buffered asynchronous aggregation"): its two
programs.

FedBuff's server never waits for a cohort: clients train from whatever
model version is current when they start, and the server steps as soon
as M updates have arrived, each weighted down by its staleness τ (server
steps since its client started):

  x ← x - η_g · ServerOpt( Σ_i w_i s(τ_i) Δ_i / Σ_i w_i ),  s(τ) = 1/√(1+τ)

over the M buffered updates i (w_i: the client's weight, `pack`'s). With
M = K, every client starting from the current version (τ = 0) and s = 1
this is FedAvg's round.

`train(params, version, batches, mask, ctx, keys)`: the clients that start
from one model version, trained together in one program (a `lax.map` over
P slots, absent slots without examples skip their steps); returns their
`ClientOutput`s stacked on a leading axis, each delta at server shape.
`write(store, rows, outputs)`: the outputs into a store of `capacity` rows
(rows out of range: dropped). `step(state, store, rows, weight,
cov_weight)`: the server step on M rows of the store (a non-finite update
left out), `round_lib.guarded_server_update`'s rules. The event queue,
the clock and the buffer's bookkeeping are the host's
(`experiment/fedbuff.py`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from fedjax_eff.core import round as round_lib
from fedjax_eff.core import technique as technique_lib
from fedjax_eff.core.task import Task

PyTree = Any


class Store(NamedTuple):
  """Trained clients' outputs, one row each (`capacity` rows)."""
  delta: PyTree
  coverage: PyTree
  sums: jax.Array  # [capacity, 4]: loss, correct, examples, scored


class BufferedFns(NamedTuple):
  train: Any
  write: Any
  step: Any
  empty_store: Any


def staleness_weight(tau, kind: str = 'sqrt'):
  """s(τ): 1/√(1+τ) (FedBuff's choice, 'sqrt') or 1 ('none')."""
  if kind == 'sqrt':
    return 1.0 / jnp.sqrt(1.0 + jnp.asarray(tau, jnp.float32))
  if kind == 'none':
    return jnp.ones_like(jnp.asarray(tau, jnp.float32))
  raise ValueError(f"staleness={kind!r} is not one of 'sqrt', 'none'.")


def build_buffered(model: nn.Module, task: Task,
                   technique: technique_lib.Technique,
                   client_optimizer: optax.GradientTransformation,
                   server_optimizer: optax.GradientTransformation, *,
                   prox_mu: float = 0.0) -> BufferedFns:
  """FedBuff's programs for a technique without state, stages or tiers."""
  tech = technique_lib.chain(technique)
  if technique_lib.stateful(tech) or tech.stage or tech.specialize:
    raise ValueError(
        f'{tech.name!r}: buffered asynchronous aggregation runs techniques '
        'without state, stages or device tiers (each update is applied '
        'alone, whenever it arrives).')
  client_update = round_lib.build_client_update(model, task, tech,
                                                client_optimizer, prox_mu)

  @jax.jit
  def train(params, version, batches, mask, ctx, keys):
    def one(args):
      b, m, c, k = args
      return client_update(params, b, m, c, k, version)
    return jax.lax.map(one, (batches, mask, ctx, keys))

  def empty_store(params, capacity: int) -> Store:
    rows = lambda p: jnp.zeros((capacity,) + p.shape, p.dtype)
    return Store(jax.tree.map(rows, params), jax.tree.map(rows, params),
                 jnp.zeros((capacity, 4), jnp.float32))

  @jax.jit
  def write(store: Store, rows, out: round_lib.ClientOutput) -> Store:
    put = lambda s, x: s.at[rows].set(x.astype(s.dtype), mode='drop')
    sums = jnp.stack([out.loss_sum, out.correct_sum, out.num_examples,
                      out.num_scored], axis=1)
    return Store(jax.tree.map(put, store.delta, out.delta),
                 jax.tree.map(put, store.coverage, out.coverage),
                 put(store.sums, sums))

  @jax.jit
  def step(state: round_lib.ServerState, store: Store, rows, weight,
           cov_weight):
    delta = jax.tree.map(lambda s: s[rows], store.delta)
    coverage = jax.tree.map(lambda s: s[rows], store.coverage)
    sums = store.sums[rows]
    finite = round_lib.rows_finite((delta, sums[:, 0]))
    w = jnp.where(finite, weight, 0.0)
    cw = jnp.where(finite, cov_weight, 0.0)
    total = lambda v, t: jax.tree.map(lambda x: jnp.einsum(
        'm,m...->...', v, jnp.where(finite.reshape(
            (-1,) + (1,) * (x.ndim - 1)), x, 0.0)), t)
    new, skipped = round_lib.guarded_server_update(
        server_optimizer, state, total(w, delta), total(cw, coverage))
    ok = finite & (cov_weight > 0)
    kept = jnp.sum(jnp.where(ok[:, None], sums, 0.0), axis=0)
    return new, skipped, kept, jnp.sum(~finite & (cov_weight > 0))

  return BufferedFns(train, write, step, empty_store)


__all__ = ['BufferedFns', 'Store', 'build_buffered', 'staleness_weight']
