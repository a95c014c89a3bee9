"""The round: one jit-compiled function over a whole cohort.

Vocabulary follows fedjax's `fed_avg.py` (McMahan et al. 2017, "Communication
-Efficient Learning of Deep Networks from Decentralized Data"): each client
starts from the server model, runs `S` local optimizer steps, and reports its
delta `Δ_k = x_server - x_client` (a pseudo-gradient: the server *subtracts*
it). The server averages the deltas weighted by `w_k`, per parameter over the
clients that trained it, and feeds the mean to an optax server optimizer
(`server_optimizers.py`: FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, ...).

Execution model (DESIGN.md, "One round, as data"):

  round_step(state, cohort, rng):
    for each chunk of C clients (lax.scan over K/C chunks):
      vmap over the chunk of client_update:      (per-client keys)
        plan, view, mask from the technique
        lax.scan over S local steps (padded steps change nothing)
        encode -> decode -> merge                  (what travels, scattered)
      acc += Σ_c w_c Δ_c ;  cov += Σ_c w_c cov_c
    Δ = acc / cov (where cov > 0) ; server optimizer step on covered params

Memory is O(C x model): the cohort never materialises K models. Results do
not depend on C (up to float summation order): every client's randomness is
`fold_in(rng, client position)`, and padded client slots weigh 0.

`reference.py` is the slow twin (a Python loop over clients and steps) that
the tests hold this to.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_eff.core import technique as technique_lib
from fedjax_eff.core.task import Task

PyTree = Any


class ServerState(NamedTuple):
  params: PyTree
  opt_state: PyTree
  round: jax.Array  # int32 scalar: rounds completed so far


class ClientOutput(NamedTuple):
  """One client's contribution, already scattered to server shapes."""
  delta: PyTree         # Δ = x_server - x_client, zero where not trained
  coverage: PyTree      # per parameter: 1 where this client trained it
  loss_sum: jax.Array   # Σ loss over real examples of all local steps
  correct_sum: jax.Array
  num_examples: jax.Array  # real example-steps seen in local training
  upload_bits: jax.Array
  download_bits: jax.Array


class RoundMetrics(NamedTuple):
  train_loss: jax.Array
  train_accuracy: jax.Array
  num_clients: jax.Array          # clients in the cohort
  num_dropped: jax.Array          # non-finite updates left out
  upload_bits: jax.Array          # mean per participating client
  download_bits: jax.Array


def client_keys(rng: jax.Array, num: int) -> jax.Array:
  """Per-client keys: `fold_in(rng, position)`, independent of chunking."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(num))


def split_client_key(key: jax.Array):
  """(plan, train, encode) keys of one client."""
  return tuple(jax.random.split(key, 3))


def masked_params(params: PyTree, mask: PyTree) -> PyTree:
  """Frozen entries (mask 0) pass through `stop_gradient`."""
  return jax.tree.map(
      lambda p, m: jnp.where(m > 0, p, jax.lax.stop_gradient(p)), params, mask)


def tree_all_finite(tree: PyTree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(tree)]))


def make_loss_fn(model: nn.Module, task: Task, prox_mu: float = 0.0):
  """loss(params, batch, mask_b, rng, anchor, fwd) -> (mean loss, stats).

  The mean is over the real examples of the batch (`mask_b`); FedProx adds
  `μ/2 ||x - x_server||²` (Li et al. 2020) with `anchor` the server model.
  """
  def loss_fn(params, batch, mask_b, rng, anchor, fwd):
    out = model.apply({'params': params}, task.inputs(batch), train=True,
                      rngs={'dropout': rng}, **fwd)
    per_example = task.loss(out, batch)
    n = jnp.sum(mask_b)
    loss_sum = jnp.sum(per_example * mask_b)
    loss = loss_sum / jnp.maximum(n, 1.0)
    if prox_mu:
      sq = sum(jnp.sum(jnp.square(a - b)) for a, b in zip(
          jax.tree.leaves(params), jax.tree.leaves(anchor)))
      loss = loss + 0.5 * prox_mu * sq
    correct = jnp.sum(task.correct(out, batch) * mask_b)
    return loss, (loss_sum, correct, n)
  return loss_fn


def build_client_update(model: nn.Module, task: Task,
                        technique: technique_lib.Technique,
                        client_optimizer: optax.GradientTransformation,
                        prox_mu: float = 0.0) -> Callable[..., ClientOutput]:
  """The local update one device runs (single client, no client axis).

  Args to the returned function:
    server_params: the server model.
    batches: feature -> `[S, B, ...]`.
    mask: `[S, B]` real-example mask.
    ctx: this client's context (dict of arrays without the client axis).
    key: this client's PRNG key.
    round_num: int32 scalar.
  """
  tech = technique_lib.chain(technique)
  loss_fn = make_loss_fn(model, task, prox_mu)
  grad_fn = jax.grad(loss_fn, has_aux=True)

  def client_update(server_params, batches, mask, ctx, key, round_num):
    plan_key, train_key, encode_key = split_client_key(key)
    plan = tech.plan(plan_key, round_num, ctx)
    start = tech.view(server_params, plan)
    trainable = tech.trainable(start, plan)
    fwd = tech.forward(plan)

    def step(carry, xs):
      params, opt_state, stats = carry
      batch, mask_b, s = xs
      grads, (loss_sum, correct, n) = grad_fn(
          masked_params(params, trainable), batch, mask_b,
          jax.random.fold_in(train_key, s), start, fwd)
      grads = jax.tree.map(lambda g, m: g * m, grads, trainable)
      updates, new_opt_state = client_optimizer.update(grads, opt_state,
                                                       params)
      updates = jax.tree.map(lambda u, m: u * m, updates, trainable)
      new_params = optax.apply_updates(params, updates)
      real = n > 0  # a fully padded step changes nothing
      params = jax.tree.map(lambda a, b: jnp.where(real, a, b), new_params,
                            params)
      opt_state = jax.tree.map(lambda a, b: jnp.where(real, a, b),
                               new_opt_state, opt_state)
      stats = (stats[0] + loss_sum, stats[1] + correct, stats[2] + n)
      return (params, opt_state, stats), None

    steps = mask.shape[0]
    zero = jnp.zeros((), jnp.float32)
    (final, _, stats), _ = jax.lax.scan(
        step, (start, client_optimizer.init(start), (zero, zero, zero)),
        (batches, mask, jnp.arange(steps)))
    delta = jax.tree.map(lambda a, b, m: (a - b) * m, start, final, trainable)
    msg, up_bits = tech.encode(delta, trainable, plan, encode_key)
    delta = tech.decode(msg, plan)
    delta, coverage = tech.merge(server_params, delta, trainable, plan)
    return ClientOutput(delta, coverage, stats[0], stats[1], stats[2],
                        jnp.asarray(up_bits, jnp.float32),
                        jnp.asarray(tech.download(start, plan), jnp.float32))

  return client_update


def server_update(server_optimizer: optax.GradientTransformation,
                  state: ServerState, delta_sum: PyTree, coverage: PyTree
                  ) -> ServerState:
  """Per-parameter mean delta over covering clients, then the optimizer.

  A parameter with zero coverage gets a zero pseudo-gradient and no update,
  so it keeps its value.
  """
  covered = jax.tree.map(lambda c: c > 0, coverage)
  mean_delta = jax.tree.map(
      lambda d, c, k: jnp.where(k, d / jnp.where(k, c, 1.0), 0.0),
      delta_sum, coverage, covered)
  updates, opt_state = server_optimizer.update(mean_delta, state.opt_state,
                                               state.params)
  updates = jax.tree.map(lambda u, k: jnp.where(k, u, 0.0), updates, covered)
  return ServerState(optax.apply_updates(state.params, updates), opt_state,
                     state.round + 1)


def default_chunk_size(num_clients: int, backend: str | None = None) -> int:
  """C per backend: 1 on CPU (measured fastest, DESIGN.md), wide elsewhere."""
  backend = backend or jax.default_backend()
  return 1 if backend == 'cpu' else min(num_clients, 128)


class RoundFns(NamedTuple):
  init: Callable[[PyTree], ServerState]
  round_step: Callable[..., tuple[ServerState, RoundMetrics]]
  client_update: Callable[..., ClientOutput]


def build_round(model: nn.Module, task: Task,
                technique: technique_lib.Technique,
                client_optimizer: optax.GradientTransformation,
                server_optimizer: optax.GradientTransformation, *,
                chunk_size: int | None = None, prox_mu: float = 0.0,
                donate: bool = True, jit: bool = True) -> RoundFns:
  """Builds `init(params)` and the jitted `round_step(state, cohort, rng)`.

  `cohort` is a `data.Cohort` (numpy or jax arrays) with `K` clients;
  `chunk_size` C (None: per-backend default) splits them into `ceil(K/C)`
  chunks scanned sequentially, each a vmap over C clients.
  """
  client_update = build_client_update(model, task, technique,
                                      client_optimizer, prox_mu)

  def init(params):
    return ServerState(params, server_optimizer.init(params),
                       jnp.zeros((), jnp.int32))

  def round_step(state: ServerState, cohort, rng):
    k = cohort.mask.shape[0]
    c = min(chunk_size or default_chunk_size(k), k)
    num_chunks = -(-k // c)
    pad = num_chunks * c - k

    def chunked(x):
      x = jnp.asarray(x)
      x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
      return x.reshape((num_chunks, c) + x.shape[1:])

    present = jnp.arange(num_chunks * c) < k
    xs = jax.tree.map(chunked, (dict(cohort.batches), cohort.mask,
                                cohort.weight, dict(cohort.ctx)))
    keys = client_keys(rng, num_chunks * c)
    keys = keys.reshape((num_chunks, c) + keys.shape[1:])  # raw uint32 keys too
    present = present.reshape((num_chunks, c))
    vmapped = jax.vmap(client_update, in_axes=(None, 0, 0, 0, 0, None))

    def chunk_body(acc, chunk):
      (batches, mask, weight, ctx), key, pres = chunk
      out = vmapped(state.params, batches, mask, ctx, key, state.round)
      finite = jax.vmap(tree_all_finite)((out.delta, out.loss_sum))
      w = jnp.where(finite, weight, 0.0)

      def wsum(tree):
        return jax.tree.map(
            lambda x: jnp.einsum('c,c...->...', w,
                                 jnp.where(finite.reshape((-1,) + (1,) * (
                                     x.ndim - 1)), x, 0.0)), tree)
      ok = finite & pres
      sums = dict(
          loss=jnp.sum(jnp.where(ok, out.loss_sum, 0.0)),
          correct=jnp.sum(jnp.where(ok, out.correct_sum, 0.0)),
          examples=jnp.sum(jnp.where(ok, out.num_examples, 0.0)),
          dropped=jnp.sum((~finite) & pres & (weight > 0)).astype(jnp.float32),
          up=jnp.sum(jnp.where(pres, out.upload_bits, 0.0)),
          down=jnp.sum(jnp.where(pres, out.download_bits, 0.0)))
      acc = (jax.tree.map(jnp.add, acc[0], wsum(out.delta)),
             jax.tree.map(jnp.add, acc[1], wsum(out.coverage)),
             jax.tree.map(jnp.add, acc[2], sums))
      return acc, None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    zero_sums = {n: jnp.zeros((), jnp.float32)
                 for n in ('loss', 'correct', 'examples', 'dropped', 'up',
                           'down')}
    (delta_sum, coverage, sums), _ = jax.lax.scan(
        chunk_body, (zeros, zeros, zero_sums), (xs, keys, present))
    new_state = server_update(server_optimizer, state, delta_sum, coverage)
    n = jnp.maximum(sums['examples'], 1.0)
    metrics = RoundMetrics(
        train_loss=sums['loss'] / n, train_accuracy=sums['correct'] / n,
        num_clients=jnp.asarray(k, jnp.float32), num_dropped=sums['dropped'],
        upload_bits=sums['up'] / k, download_bits=sums['down'] / k)
    return new_state, metrics

  if jit:
    round_step = jax.jit(round_step, donate_argnums=(0,) if donate else ())
  return RoundFns(init, round_step, client_update)
