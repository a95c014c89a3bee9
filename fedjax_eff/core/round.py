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
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_eff.core import codecs
from fedjax_eff.core import placement as placement_lib
from fedjax_eff.core import technique as technique_lib
from fedjax_eff.core.placement import (CLIENTS_AXIS, REPLICAS_AXIS, ROWS,
                                       ChunkLayout,
                                       chunk_key,
                                       chunk_layout, client_keys,
                                       default_chunk_size, replicate)
from fedjax_eff.core.task import Sums, Task, batch_sums

PyTree = Any


class ServerState(NamedTuple):
  params: PyTree
  opt_state: PyTree
  round: jax.Array  # int32 scalar: rounds completed so far
  technique: PyTree = ()  # the technique's server-side state
  clients: PyTree = ()    # client-state store: one client state per client
                          # of the population (leading axis N)
  # Hyperparameters that are values, not program constants (replicas of
  # one program with their own: `replica_hparams`): 'client_learning_rate'
  # (the client optimizer built with `optax.inject_hyperparams`),
  # 'prox_mu'. () = the program's constants.
  hparams: PyTree = ()


class ClientOutput(NamedTuple):
  """One client's contribution, already scattered to server shapes."""
  delta: PyTree         # Δ = x_server - x_client, zero where not trained
  coverage: PyTree      # per parameter: 1 where this client trained it
  loss_sum: jax.Array   # Σ loss over real examples of all local steps
  correct_sum: jax.Array
  num_examples: jax.Array  # loss units seen (example-steps; LM: tokens)
  num_scored: jax.Array    # accuracy units seen (= num_examples unless
                           # the task's `units` differ, e.g. LM tokens)
  upload_bits: jax.Array
  download_bits: jax.Array
  client_state: PyTree = ()  # this client's new persistent state
  feedback: PyTree = ()      # summed over aggregated clients for the server
  variant: Any = ()          # int32: its program variant (Technique.variant)


class RoundMetrics(NamedTuple):
  train_loss: jax.Array
  train_accuracy: jax.Array
  num_clients: jax.Array          # clients in the cohort
  num_dropped: jax.Array          # non-finite updates left out
  upload_bits: jax.Array          # mean per client of the cohort
  download_bits: jax.Array
  server_step_skipped: jax.Array  # 1.0: the server step was non-finite
  client_upload_bits: jax.Array   # [K] per client, in cohort order
  client_download_bits: jax.Array
  # A host-side client-state store (build_round(client_store='host')):
  # each client's new state [K, ...] and whether to write it back [K].
  client_states: Any = ()
  client_state_written: Any = ()
  # [K] int32: each client's program variant (`Technique.variant`, e.g. the
  # layers depth dropout skipped), when a program of the round has them.
  client_variant: Any = ()


# The cohort-level sums a round accumulates over its chunks.
SUM_NAMES = ('loss', 'correct', 'examples', 'scored', 'dropped')


def over_clients(client_update: Callable[..., ClientOutput], c: int):
  """`client_update` over a chunk of `c` clients (`placement.map_clients`):
  `ctx['server_state']` (a technique's server state, the same for every
  client) is broadcast, everything else per client."""
  def run(params, batches, mask, ctx, keys, round_num, chunk):
    ctx = dict(ctx)
    shared = {k: ctx.pop(k) for k in ('server_state', 'hparams') if k in ctx}
    num_steps = last_real_step(mask)  # the chunk's longest client, unbatched

    def update(params, batches, mask, ctx, key, round_num, chunk,
               shared, num_steps):
      return client_update(params, batches, mask, dict(ctx, **shared), key,
                           round_num, chunk, num_steps)
    return placement_lib.map_clients(
        update, c, (None, 0, 0, 0, 0, None, None, None, None))(
            params, batches, mask, ctx, keys, round_num, chunk, shared,
            num_steps)
  return run


def weighted_sum(w: jax.Array, finite: jax.Array | None,
                 tree: PyTree) -> PyTree:
  """Σ_c w_c x_c over a chunk's clients, a non-finite client's x as 0
  (`finite` None: every x as it is)."""
  keep = lambda x, f: x if finite is None else jnp.where(f, x, 0.0)
  if w.shape[0] == 1:  # a multiply: XLA:CPU runs a 1-long dot slowly
    return jax.tree.map(
        lambda x: w[0] * keep(x[0], None if finite is None else finite[0]),
        tree)
  # A dot: on CPU 2x faster than multiply-and-sum at C = 2 (CNN).
  return jax.tree.map(
      lambda x: jnp.einsum('c,c...->...', w, keep(x, None if finite is None
                                                  else finite.reshape(
                                                      (-1,) + (1,) * (
                                                          x.ndim - 1)))),
      tree)


def split_client_key(key: jax.Array):
  """(plan, train, encode) keys of one client."""
  return tuple(jax.random.split(key, 3))


def tree_all_finite(tree: PyTree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(tree)]))


def rows_finite(tree: PyTree) -> jax.Array:
  """Per leading-axis row: every entry of every leaf finite.

  One sum per leaf, NaN or ±inf as soon as an entry is. XLA fuses the
  sum with the computation of `x`, where `all(isfinite(x))` (the
  reference loop's check) cost a pass of its own over every client's
  update: 0.07 ms per client for a 200k-parameter MLP on CPU, a quarter of
  one local step. The sum also overflows for entries near float32's
  largest value; such an update would overflow the server's weighted sum
  as well, and is left out with the non-finite ones.
  """
  top = [jnp.sum(x.reshape(x.shape[0], -1), axis=1)
         for x in jax.tree.leaves(tree)]
  return jnp.isfinite(sum(top))


def make_loss_fn(model: nn.Module, task: Task, prox_mu: float = 0.0):
  """loss(params, batch, mask_b, rng, anchor, fwd) -> (mean loss, Sums).

  `task.augment` (if any) transforms the batch first (e.g. two views for
  contrastive learning); the task's loss sees the example mask as
  `batch['_mask']`, so losses coupling examples can ignore padding. The
  mean is over the loss units of the real examples (`mask_b`): examples,
  or target tokens for a language model. FedProx adds `μ/2 ||x -
  x_server||²` (Li et al. 2020) with `anchor` the server model.
  """
  def loss_fn(params, batch, mask_b, rng, anchor, fwd, mu=None):
    # `mu`: a traced μ (a replica's hyperparameter) instead of `prox_mu`.
    dropout_rng, augment_rng = jax.random.split(rng)
    if task.augment is not None:
      batch = task.augment(batch, augment_rng)
    out = model.apply({'params': params}, task.inputs(batch), train=True,
                      rngs={'dropout': dropout_rng}, **fwd)
    sums = batch_sums(task, out, batch, mask_b)
    loss = sums.loss / jnp.maximum(sums.loss_units, 1.0)
    mu = prox_mu if mu is None else mu
    if mu is not None and (not isinstance(mu, (int, float)) or mu):
      sq = sum(jnp.sum(jnp.square(a - b)) for a, b in zip(
          jax.tree.leaves(params), jax.tree.leaves(anchor)))
      loss = loss + 0.5 * mu * sq
    return loss, sums
  return loss_fn


class TrainableSplit(NamedTuple):
  """Params split by a trainable mask into what autodiff sees and constants.

  `train` lists the leaves that are not statically frozen (differentiated,
  optimised, uploaded), `masks` their mask leaves (`True` or a dynamic
  array). Statically frozen leaves stay in `leaves` and are closed over, so
  neither their gradients nor their optimizer state exist.
  """
  treedef: Any
  leaves: list
  index: list      # positions of the trainable leaves in `leaves`
  masks: list

  @classmethod
  def of(cls, params, mask):
    leaves, treedef = jax.tree.flatten(params)
    masks = treedef.flatten_up_to(mask)
    index = [i for i, m in enumerate(masks) if not technique_lib.is_frozen(m)]
    return cls(treedef, leaves, index, [masks[i] for i in index])

  @property
  def train(self) -> list:
    return [self.leaves[i] for i in self.index]

  def full(self, train: list) -> PyTree:
    leaves = list(self.leaves)
    for i, x in zip(self.index, train):
      leaves[i] = x
    return self.treedef.unflatten(leaves)

  def apply_mask(self, xs: list) -> list:
    return [x if m is True else x * m for x, m in zip(xs, self.masks)]

  def stop_frozen(self, xs: list) -> list:
    """`stop_gradient` on the dynamically frozen entries."""
    return [x if m is True else jnp.where(m > 0, x, jax.lax.stop_gradient(x))
            for x, m in zip(xs, self.masks)]


def last_real_step(mask: jax.Array) -> jax.Array:
  """int32: 1 + the index of the last step of `mask` (`[..., S, B]`) with
  an example anywhere in the leading axes (0 if none): the steps a client,
  or a chunk of clients, must run."""
  real = jnp.any(mask.reshape((-1,) + mask.shape[-2:]) > 0, axis=(0, 2))
  idx = jnp.arange(1, real.shape[0] + 1, dtype=jnp.int32)
  return jnp.max(jnp.where(real, idx, 0))


def loss_dtype(params: PyTree):
  """The dtype the round accumulates losses in: the parameters' (float64
  under `jax_enable_x64` with float64 parameters), at least float32."""
  leaves = [x for x in jax.tree.leaves(params)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  if not leaves:
    return jnp.float32
  return jnp.promote_types(jnp.result_type(*leaves), jnp.float32)


class DeviceOutput(NamedTuple):
  """What one device's program produces (`build_device_update`).

  message: the encoded upload, a wire tree (`core.codecs`; `codecs.pack`
    gives its bytes). The only thing a device must send for the server to
    aggregate it.
  feedback: what a stateful technique sends up beside the message, in fp32
    (`Technique.finish`, e.g. SCAFFOLD's change of control variate); ().
  client_state: the device's new persistent state (`Technique.finish`, e.g.
    its error-feedback residual); it stays on the device; ().
  sums: Σ loss / correct / units over the real examples of all local steps:
    the round's training metrics.
  """
  message: PyTree
  feedback: PyTree
  client_state: PyTree
  sums: Sums


def with_hparams(opt_state, hparams: dict):
  """A client optimizer state (`optax.inject_hyperparams`) with this
  replica's learning rate (`ServerState.hparams['client_learning_rate']`)."""
  lr = hparams.get('client_learning_rate')
  if lr is None:
    return opt_state
  if 'learning_rate' not in getattr(opt_state, 'hyperparams', {}):
    raise ValueError('A per-replica client learning rate needs the client '
                     'optimizer built with optax.inject_hyperparams.')
  old = opt_state.hyperparams['learning_rate']
  return opt_state._replace(hyperparams=dict(
      opt_state.hyperparams, learning_rate=jnp.asarray(lr, old.dtype)))


def local_step_fn(loss_fn, split: TrainableSplit, start: PyTree, fwd: dict,
                  hparams: dict, client_optimizer: optax.GradientTransformation,
                  correct: Callable[[PyTree], PyTree] | None = None):
  """One local step of a device: `step((train, opt_state, stats), batch,
  mask_b, rng) -> (train, opt_state, stats)`, `client_optimizer` on the
  trainable leaves (`split`) of `start`; `correct(grads)` (e.g.
  SCAFFOLD's control variates) before the optimizer; a fully padded step
  changes nothing; `stats` adds the step's `Sums`."""
  def train_loss(train, batch, mask_b, rng):
    return loss_fn(split.full(split.stop_frozen(train)), batch, mask_b, rng,
                   start, fwd, hparams.get('prox_mu'))
  grad_fn = jax.grad(train_loss, has_aux=True)

  def step(carry, batch, mask_b, rng):
    train, opt_state, stats = carry
    grads, sums = grad_fn(train, batch, mask_b, rng)
    if correct is not None:
      corrected = jax.tree.leaves(correct(split.full(grads)))
      grads = [corrected[i] for i in split.index]
    updates, new_opt_state = client_optimizer.update(
        split.apply_mask(grads), opt_state, train)
    new_train = optax.apply_updates(train, split.apply_mask(updates))
    real = jnp.sum(mask_b) > 0  # a fully padded step changes nothing
    train, opt_state = jax.tree.map(
        lambda a, b: jnp.where(real, a, b), (new_train, new_opt_state),
        (train, opt_state))
    return train, opt_state, jax.tree.map(jnp.add, stats, sums)
  return step


def build_device_update(model: nn.Module, task: Task,
                        technique: technique_lib.Technique,
                        client_optimizer: optax.GradientTransformation,
                        prox_mu: float = 0.0) -> Callable[..., DeviceOutput]:
  """The program one device runs: it trains the model it downloaded and
  encodes its upload. Nothing at server shape enters or leaves it.

  Args to the returned function:
    view: the downloaded model, `technique.view(server_params, plan)`
      (a sub-model for federated dropout, the whole model for last-n).
    batches: feature -> `[S, B, ...]`.
    mask: `[S, B]` real-example mask.
    plan: this client's plan (`technique.plan`: what the server tells the
      device, or what both derive from a shared seed; a stateful
      technique's plan carries the client's state).
    train_key, encode_key: the device's keys for local training
      (dropout, augmentation) and for its encoder (stochastic rounding).
    num_steps: int32 scalar, the steps to run; the rest are skipped (they
      must hold no example). Default: up to this client's last step with
      an example. The round passes its chunk's largest, unbatched, so that
      under `vmap` the skip is real.

  Returns a `DeviceOutput`. Local training: S steps of `client_optimizer`
  on the trainable part of the view (statically frozen leaves have neither
  gradients nor optimizer state; a fully padded step changes nothing);
  `Δ = view - trained` (masked), `msg = encode(to_wire(Δ))`.
  """
  tech = technique_lib.chain(technique)
  loss_fn = make_loss_fn(model, task, prox_mu)

  def device_update(view, batches, mask, plan, train_key, encode_key,
                    num_steps=None, hparams=None):
    start = view
    trainable = tech.trainable(start, plan)
    split = TrainableSplit.of(start, trainable)
    fwd = tech.forward(plan)
    hparams = hparams or {}

    step = local_step_fn(
        loss_fn, split, start, fwd, hparams, client_optimizer,
        None if tech.correct is None else (
            lambda grads: tech.correct(grads, plan)))

    def local_step(carry, xs):
      batch, mask_b, s = xs
      return step(carry, batch, mask_b, jax.random.fold_in(train_key, s))

    steps = mask.shape[0]
    if num_steps is None:  # the last step with an example, + 1
      num_steps = last_real_step(mask)
    zero = jnp.zeros((), loss_dtype(start))
    train0 = split.train
    carry = (train0, with_hparams(client_optimizer.init(train0), hparams),
             Sums(zero, zero, zero, zero))
    if steps == 1:  # one step, run as it is (a padded one changes nothing)
      final, _, stats = local_step(
          carry, (jax.tree.map(lambda x: x[0], batches), mask[0],
                  jnp.zeros((), jnp.int32)))
    else:
      # Steps from `num_steps` on hold no example (of this client or, in a
      # chunk, of any of its clients): not computed. An unbatched trip
      # count, so under `vmap` the loop really stops there (a `while`, no
      # per-step `cond` copying the carry).
      at = lambda x, s: jnp.asarray(x)[s]
      def body(s, carry):
        return local_step(carry, (jax.tree.map(lambda x: at(x, s), batches),
                                  at(mask, s), s))
      final, _, stats = jax.lax.fori_loop(0, num_steps, body, carry)
    moved = split.apply_mask([a - b for a, b in zip(train0, final)])
    delta = TrainableSplit.of(
        jax.tree.map(jnp.zeros_like, start), trainable).full(moved)
    msg = technique_lib.encode_upload(tech, delta, trainable, plan,
                                      encode_key)
    client_state = feedback = ()
    if tech.finish is not None:  # the device reads back what it sent
      sent = technique_lib.receive(tech, msg, plan)
      real_steps = jnp.sum((jnp.sum(mask, axis=1) > 0).astype(zero.dtype))
      client_state, feedback = tech.finish(delta, sent, plan, real_steps)
    return DeviceOutput(msg, feedback, client_state, stats)

  return device_update


class LaneOutput(NamedTuple):
  """A cohort's sums from `build_lane_update`: Σ_k w_k Δ_k and Σ_k w_k
  cov_k at server shape, the training `Sums` over every client, and each
  client's upload and download bits `[K]`."""
  delta: PyTree
  coverage: PyTree
  sums: Sums
  upload_bits: jax.Array
  download_bits: jax.Array


def build_lane_update(model: nn.Module, task: Task,
                      technique: technique_lib.Technique,
                      client_optimizer: optax.GradientTransformation,
                      prox_mu: float = 0.0) -> Callable[..., LaneOutput]:
  """The whole cohort on `L` lanes, each running several clients back to
  back (`placement.lane_schedule`), for a technique that is the same for
  every client (`technique.same_for_every_client`).

  Issue 18: with one client per lane, a chunk of C lanes runs as long as
  its longest client and the others' lanes idle (sorted chunks reach a
  useful fraction of 0.75-0.83 at C = 8 on heavy-tailed cohorts, and no
  one-client-per-lane layout does better). A lane here trains client k for
  its s_k steps, adds w_k Δ_k = w_k (x_server - x_k) to the lane's sum at
  k's last step, resets the model and the optimizer state to the server's
  and goes on with its next client; every lane stops at the longest lane
  (Σ_k s_k / (L x length) of the steps are real: 0.99 on those cohorts).
  Each client sees exactly what `build_client_update` gives it (its own
  key `fold_in(train_key_k, step)`, its batches, the same optimizer from
  its initial state), so the sums equal the chunked round's up to float
  summation order.

  What is per client in the chunked round is per lane step here: a
  `cond` on the lane's client boundary (unbatched at L = 1, so the
  flush and reset run only at boundaries; under the lane `vmap` a select
  of both, three passes over the trainable parameters per step). A
  technique that encodes, merges, keeps state or draws per-client plans
  needs each client's own upload: it runs chunked (`build_round`).

  Args to the returned function:
    server_params: the server model.
    batches: feature -> `[K, S, B, ...]`, or `{ROWS: [K, S, B]}` row
      indices into `examples` (device-resident data).
    mask: `[K, S, B]`; weight: `[K]`; keys: `[K]` client keys
      (`fold_in(rng, position)`, as the chunked round).
    schedule: a `placement.LaneSchedule` (arrays `[L, T]`, `length`).
    round_num: int32 scalar; hparams: a replica's hyperparameters or {}.
    examples: feature -> `[N, ...]` for row indices, else {}.
  """
  tech = technique_lib.chain(technique)
  if not technique_lib.same_for_every_client(tech):
    raise ValueError(
        f'{tech.name!r} cannot run clients back to back in lanes: its '
        'clients draw plans, encode their uploads, merge, keep state or '
        'correct gradients, so each needs its own upload; use the chunked '
        'round (lanes=False).')
  loss_fn = make_loss_fn(model, task, prox_mu)

  def lane_update(server_params, batches, mask, weight, keys, schedule,
                  round_num, hparams=None, examples=None) -> LaneOutput:
    hparams = hparams or {}
    plan = tech.plan(keys[0], round_num, {})  # the same for every client
    start = tech.view(server_params, plan)
    trainable = tech.trainable(start, plan)
    split = TrainableSplit.of(start, trainable)
    step = local_step_fn(loss_fn, split, start, tech.forward(plan), hparams,
                         client_optimizer)
    train0 = split.train
    opt0 = with_hparams(client_optimizer.init(train0), hparams)
    train_keys = jax.vmap(lambda key: split_client_key(key)[1])(keys)
    k = mask.shape[0]
    zero = jnp.zeros((), loss_dtype(start))

    def batch_of(c, s):
      if ROWS in batches:
        return {f: jnp.take(x, batches[ROWS][c, s], axis=0, mode='clip')
                for f, x in examples.items()}
      return {f: x[c, s] for f, x in batches.items()}

    def lane(client, steps, last, length):
      def body(t, carry):
        train, opt_state, stats, acc = carry
        c = jnp.minimum(client[t], k - 1)  # (K: past the lane's end)
        s = steps[t]
        mask_b = jnp.where(client[t] < k, mask[c, s], 0)
        train, opt_state, stats = step(
            (train, opt_state, stats), batch_of(c, s), mask_b,
            jax.random.fold_in(train_keys[c], s))

        def flush(train, opt_state, acc):  # client c is done
          moved = split.apply_mask([a - b for a, b in zip(train0, train)])
          return train0, opt0, [a + weight[c].astype(d.dtype) * d
                                for a, d in zip(acc, moved)]
        train, opt_state, acc = jax.lax.cond(
            last[t], flush, lambda *xs: xs, train, opt_state, acc)
        return train, opt_state, stats, acc

      init = (train0, opt0, Sums(zero, zero, zero, zero),
              [jnp.zeros_like(x) for x in train0])
      _, _, stats, acc = jax.lax.fori_loop(0, length, body, init)
      return stats, acc

    lanes = schedule.client.shape[0]
    if lanes == 1:  # unbatched: the flush's cond really skips
      stats, acc = lane(schedule.client[0], schedule.step[0],
                        schedule.last[0], schedule.length)
    else:
      stats, acc = jax.vmap(lane, in_axes=(0, 0, 0, None))(
          schedule.client, schedule.step, schedule.last, schedule.length)
      stats = jax.tree.map(lambda x: jnp.sum(x, 0), stats)
      acc = [jnp.sum(a, 0) for a in acc]
    zeros = jax.tree.map(jnp.zeros_like, start)
    summed = TrainableSplit.of(zeros, trainable).full(acc)
    # What one client's upload is and what the server reads of it: the
    # same for every client (an identity codec, the default merge).
    msg = technique_lib.encode_upload(tech, zeros, trainable, plan, keys[0])
    _, coverage = tech.merge(server_params, technique_lib.receive(
        tech, msg, plan), trainable, plan)
    coverage = jax.tree.map(
        lambda c, m: jnp.asarray(m, c.dtype) if isinstance(
            m, (bool, np.bool_)) else c, coverage, trainable)
    delta, _ = tech.merge(server_params, summed, trainable, plan)
    total_w = jnp.sum(weight)
    per_client = lambda bits: jnp.full((k,), bits, jnp.float32)
    return LaneOutput(
        delta, jax.tree.map(lambda c: total_w.astype(c.dtype) * c, coverage),
        stats, per_client(codecs.message_bits(msg)),
        per_client(technique_lib.download_bits(tech, start, plan)))

  return lane_update


def build_client_update(model: nn.Module, task: Task,
                        technique: technique_lib.Technique,
                        client_optimizer: optax.GradientTransformation,
                        prox_mu: float = 0.0, compact_coverage: bool = False
                        ) -> Callable[..., ClientOutput]:
  """One client of the round, server side and device side (no client axis):
  the plan and the view the server sends, the device's program
  (`build_device_update`), then what the server reads of the upload (decode,
  scatter to server shape, coverage, bits).

  `compact_coverage`: where the coverage is the trainable mask
  (`technique.coverage_is_mask`) and a leaf's mask is static, that leaf's
  coverage is the scalar 0 or 1 (the round sums one weight for it, not a
  model-size array per client, and broadcasts the sum).

  Args to the returned function:
    server_params: the server model.
    batches: feature -> `[S, B, ...]`.
    mask: `[S, B]` real-example mask.
    ctx: this client's context (dict of arrays without the client axis).
    key: this client's PRNG key.
    round_num: int32 scalar.
    chunk: the chunk plan shared by this client's chunk (unbatched), or None.
    num_steps: the steps to run (`build_device_update`), or None.
  """
  tech = technique_lib.chain(technique)
  device_update = build_device_update(model, task, tech, client_optimizer,
                                      prox_mu)
  compact = compact_coverage and technique_lib.coverage_is_mask(tech)

  def client_update(server_params, batches, mask, ctx, key, round_num,
                    chunk=None, num_steps=None):
    plan_key, train_key, encode_key = split_client_key(key)
    ctx = dict(ctx)
    hparams = ctx.get('hparams')  # (the plan reads technique knobs in it)
    if chunk is not None:
      ctx = dict(ctx, chunk=chunk)
    plan = tech.plan(plan_key, round_num, ctx)
    start = tech.view(server_params, plan)
    out = device_update(start, batches, mask, plan, train_key, encode_key,
                        num_steps, hparams)
    up_bits = codecs.message_bits(out.message)
    if tech.finish is not None:
      up_bits = up_bits + technique_lib.feedback_bits(out.feedback)
    sent = technique_lib.receive(tech, out.message, plan)
    trainable = tech.trainable(start, plan)
    delta, coverage = tech.merge(server_params, sent, trainable, plan)
    if compact:  # a static mask's coverage: one number per leaf
      coverage = jax.tree.map(
          lambda c, m: jnp.asarray(m, c.dtype) if isinstance(
              m, (bool, np.bool_)) else c, coverage, trainable)
    stats = out.sums
    return ClientOutput(delta, coverage, stats.loss, stats.correct,
                        stats.loss_units, stats.scored_units,
                        jnp.asarray(up_bits, jnp.float32),
                        jnp.asarray(technique_lib.download_bits(
                            tech, start, plan), jnp.float32),
                        out.client_state, out.feedback,
                        tech.variant(plan) if tech.variant else ())

  return client_update


def server_update(server_optimizer: optax.GradientTransformation,
                  state: ServerState, delta_sum: PyTree, coverage: PyTree
                  ) -> ServerState:
  """Per-parameter mean delta over covering clients, then the optimizer.

  A parameter with zero coverage gets a zero pseudo-gradient and no update,
  so it keeps its value. A step whose new parameters are not all finite
  (an overflowing server learning rate, say) is skipped whole: params and
  optimizer state stay as they were, only the round advances
  (`guarded_server_update` says whether it was skipped).
  """
  return guarded_server_update(server_optimizer, state, delta_sum,
                               coverage)[0]


def covered_state(server_optimizer: optax.GradientTransformation,
                  new: PyTree, old: PyTree, covered: PyTree) -> PyTree:
  """The server optimizer's new state where a client trained the entry,
  its old state elsewhere.

  A parameter no client trained this round (a layer only one device tier
  trains, a per-client subset) gets a zero pseudo-gradient; fed to FedAdam
  or FedYogi as such it would decay the parameter's moments (m <- b1 m,
  v <- b2 v) although nothing was observed. Per-parameter coverage keeps
  them as they were: the optimizer sees an uncovered entry not at all.
  State that is not per parameter (Adam's step count, a schedule's
  counter) advances every round, so bias correction counts server rounds,
  not rounds in which the entry was trained.
  """
  if not jax.tree.leaves(new):
    return new
  select = optax.tree_map_params(
      server_optimizer, lambda x, k: jnp.broadcast_to(k, jnp.shape(x)), new,
      covered, transform_non_params=lambda x: True)
  return jax.tree.map(lambda k, a, b: a if k is True else jnp.where(k, a, b),
                      select, new, old)


def guarded_server_update(server_optimizer: optax.GradientTransformation,
                          state: ServerState, delta_sum: PyTree,
                          coverage: PyTree) -> tuple[ServerState, jax.Array]:
  """`server_update`, and a bool: True when the step was non-finite and
  skipped."""
  covered = jax.tree.map(lambda c: c > 0, coverage)
  mean_delta = jax.tree.map(
      lambda d, c, k: jnp.where(k, d / jnp.where(k, c, 1.0), 0.0),
      delta_sum, coverage, covered)
  updates, opt_state = server_optimizer.update(mean_delta, state.opt_state,
                                               state.params)
  opt_state = covered_state(server_optimizer, opt_state, state.opt_state,
                            covered)
  updates = jax.tree.map(lambda u, k: jnp.where(k, u, 0.0), updates, covered)
  params = optax.apply_updates(state.params, updates)
  # The new params only: a NaN or inf anywhere in the step (mean delta,
  # optimizer state, a rate) reaches them. (Checking the optimizer state
  # as well changed XLA:CPU's fusion of the step enough to move host- and
  # device-placed rounds apart by an ulp.)
  ok = tree_all_finite(params)
  keep = lambda new, old: jax.tree.map(
      lambda a, b: jnp.where(ok, a, b), new, old)
  return state._replace(params=keep(params, state.params),
                        opt_state=keep(opt_state, state.opt_state),
                        round=state.round + 1), ~ok


class RoundFns(NamedTuple):
  init: Callable[[PyTree], ServerState]
  round_step: Callable[..., tuple[ServerState, RoundMetrics]]
  client_update: Callable[..., ClientOutput]
  client_update_for: Callable[..., Callable[..., ClientOutput]]
  technique: technique_lib.Technique
  local_part: Callable[..., np.ndarray] | None = None
  # R replicas of the round in one program (`build_round`'s replica_step).
  replica_step: Callable[..., tuple[ServerState, RoundMetrics]] | None = None
  # A host-side client-state store for client_store='host'.
  host_store: Callable[[PyTree], 'HostClientStore'] | None = None
  # Peak bytes of replica_step's compiled program (same arguments).
  replica_peak_bytes: Callable[..., int | None] | None = None


class HostClientStore(NamedTuple):
  """Every client's persistent state in host memory (numpy, leading axis
  N), for rounds built with `client_store='host'`: `rows(ids)` goes into
  the cohort's `ctx['client_state']`, `write(ids, metrics)` takes the
  round's new rows back. Checkpoint `states` beside the server state."""
  states: PyTree

  @property
  def nbytes(self) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(self.states)))

  def rows(self, ids) -> PyTree:
    ids = np.asarray(ids)
    return jax.tree.map(lambda s: s[ids], self.states)

  def write(self, ids, metrics: 'RoundMetrics') -> None:
    ids = np.asarray(ids)
    written = np.asarray(metrics.client_state_written, bool)
    def put(s, new):
      s[ids[written]] = np.asarray(new)[written]
    jax.tree.map(put, self.states, metrics.client_states)


def build_round(model: nn.Module, task: Task,
                technique: technique_lib.Technique,
                client_optimizer: optax.GradientTransformation,
                server_optimizer: optax.GradientTransformation, *,
                chunk_size: int | None = None, prox_mu: float = 0.0,
                num_tiers: int = 1, donate: bool = True,
                jit: bool = True, mesh: jax.sharding.Mesh | None = None,
                vmap_replicas: bool | None = None,
                population: int | None = None,
                client_state_limit_bytes: int = 4 << 30,
                client_store: str = 'device',
                lanes: bool = False) -> RoundFns:
  """Builds `init(params)` and `round_step(state, cohort, rng, round_num)`.

  `cohort` is a `data.Cohort` (numpy or jax arrays) with `K` clients, or a
  `data.IndexedCohort` of row indices into `examples`, the
  `ResidentData.examples` already on the device (`round_step(...,
  examples=...)`), gathered chunk by chunk inside the program. `chunk_size`
  C (None: per-backend default) splits the cohort into chunks scanned
  sequentially, each a vmap over C clients. `round_num` (a host int; read
  from `state.round` if omitted and the technique has stages) picks the
  technique's stage, one compiled program per stage. If the technique
  specialises per device tier, `cohort.ctx['tier']` (ints in
  `[0, num_tiers)`) routes each client to its tier's program.

  `mesh`: a `jax.sharding.Mesh` with a `'clients'` axis (any other axes are
  left to XLA). The chunks are split into one contiguous block per device
  along that axis (`shard_map`); each device scans its block and the
  weighted sums meet in a `psum`, so the server sees the same sums as on
  one device, up to float summation order. With `jax.distributed` the mesh
  spans processes: every process passes the same cohort, or each packs
  only the clients of its own slots (`local_part`, `part_of=`).

  `population` N: the number of training clients, for a technique with
  per-client state (error feedback, SCAFFOLD): the client-state store
  holds N client states on the device, indexed by `ctx['client_index']`;
  it lives in `ServerState.clients`, so it is checkpointed and donated
  with the server state. Its memory is N x one client's state;
  `client_state_limit_bytes` refuses a store larger than that. With
  `client_store='host'` (data packed on the host) the store stays in host
  memory instead (`HostClientStore`): the cohort brings its clients' rows
  as `ctx['client_state']` and the round returns their new rows in
  `RoundMetrics.client_states` (written back where
  `client_state_written`); only K rows cross, and N x state never sits on
  the device.

  `lanes`: run the cohort on C lanes, each training several clients back
  to back (`build_lane_update`, `placement.lane_schedule`), instead of
  chunks of C clients each running to its chunk's longest: on cohorts of
  uneven step counts nearly every computed step is real. For a technique
  that is the same for every client (`technique.same_for_every_client`),
  on one device, without per-client state; results equal the chunked
  round's up to float summation order. A round that meets a non-finite
  update reruns guarded and chunked.
  """
  if client_store not in ('device', 'host'):
    raise ValueError(f"client_store={client_store!r}: 'device' or 'host'.")
  host_store = client_store == 'host'
  tech = technique_lib.chain(technique)
  stateful = technique_lib.stateful(tech)
  tiered = tech.specialize is not None
  place = placement_lib.Placement(chunk_size, num_tiers, tiered, mesh)

  @functools.lru_cache(maxsize=None)
  def program(stage, tier):
    return tech.specialize(stage, tier) if tiered else tech

  if lanes and ((tiered and num_tiers > 1) or stateful or mesh is not None
                or not technique_lib.same_for_every_client(program(
                    tech.stage(0) if tech.stage else None, 0))):
    raise ValueError(
        f'lanes=True runs clients back to back, which needs a technique '
        f'that is the same for every client (no plans, encoders, merges, '
        f'state, corrections or device tiers) on one device; {tech.name!r}'
        f'{" on a mesh" if mesh is not None else ""} is not: use lanes=False.')

  @functools.lru_cache(maxsize=None)
  def lane_update_for(stage=None):
    return build_lane_update(model, task, program(stage, 0),
                             client_optimizer, prox_mu)

  @functools.lru_cache(maxsize=None)
  def client_update_for(stage=None, tier=0, compact_coverage=False):
    return build_client_update(model, task, program(stage, tier),
                               client_optimizer, prox_mu, compact_coverage)

  def init(params):
    if not stateful:
      return ServerState(params, server_optimizer.init(params),
                         jnp.zeros((), jnp.int32))
    ts = technique_lib.init_state(tech, params)
    if jax.tree.leaves(ts.client):
      check_state_shapes(params)
    return ServerState(params, server_optimizer.init(params),
                       jnp.zeros((), jnp.int32), ts.server,
                       () if host_store else store_of(ts.client))

  def check_state_shapes(params):
    """Per-client state is kept in the server's coordinates; a technique
    whose clients train a model of other shapes (federated dropout's
    narrower sub-models) cannot be combined with it."""
    shapes = lambda t: [tuple(x.shape) for x in jax.tree.leaves(t)]
    stages = {tech.stage(0)} if tech.stage else {None}
    for stage in stages:
      for tier in range(num_tiers if tiered else 1):
        view = technique_lib.view_shapes(
            program(stage, tier), params,
            {'client_index': jnp.int32(0), 'tier': jnp.int32(tier)})
        if shapes(view) != shapes(params):
          raise ValueError(
              f'{tech.name!r}: a technique with per-client or server state '
              '(error feedback, SCAFFOLD) keeps it in the server model\'s '
              'shapes, but clients here train a model of other shapes '
              '(e.g. federated dropout\'s sub-models); use one or the '
              'other.')

  def store_of(one_client, xp=jnp):
    """N copies of one client's initial state (`xp`: jnp on the device,
    np on the host), refused past `client_state_limit_bytes`."""
    leaves = jax.tree.leaves(one_client)
    if not leaves:
      return jax.tree.map(lambda x: x, one_client)
    if population is None:
      raise ValueError(f'Technique {tech.name!r} keeps per-client state: '
                       'build_round needs population= (the number of '
                       'training clients).')
    nbytes = population * sum(x.size * x.dtype.itemsize for x in leaves)
    if nbytes > client_state_limit_bytes:
      mb = lambda b: f'{b / 2**20:,.1f} MiB'
      raise ValueError(
          f'The client-state store of {tech.name!r} needs {mb(nbytes)} '
          f'({population} clients x {nbytes // population:,} bytes), over '
          f'the limit of {mb(client_state_limit_bytes)} '
          '(client_state_limit_bytes; config.client_state_limit_gib).')
    return jax.tree.map(lambda x: xp.broadcast_to(
        xp.asarray(x), (population,) + x.shape).copy(), one_client)

  def has_variants(stage):
    """Does a program of this stage report per-client variants?"""
    return any(program(stage, t).variant is not None
               for t in range(num_tiers if tiered else 1))

  def contribution(stage, tier, guard, shared, chunk, rows):
    """One chunk of C clients of one tier: their weighted sums, their bits
    and their new client states (`placement.Contribution`).

    `guard`: a non-finite client's update is left out of the sums (a
    select that waits for a reduction over its update: a second pass over
    every client's update). Unguarded, the sums take every update as it
    is, with no per-client check at all: a non-finite update makes its
    chunk's weighted sum non-finite (0 x NaN is NaN too), which the round
    sees once in the cohort's sum; it then keeps its old state and
    `round_step` runs it again guarded (`round_program`)."""
    state, examples = shared
    (batches, mask, weight, ctx), keys, pres = chunk
    if ROWS in batches:  # device-resident data: gather this chunk's rows
      # (padded slots point at ResidentData's all-zero row: selected out)
      batches = {f: jnp.take(x, batches[ROWS], axis=0, mode='clip')
                 for f, x in examples.items()}
    t = program(stage, tier)
    cp = t.chunk_plan(chunk_key(keys[0]), state.round) if t.chunk_plan else None
    if jax.tree.leaves(state.hparams):  # a replica's own hyperparameters
      ctx = dict(ctx, hparams=state.hparams)
    if stateful:  # (a host store's rows came with the cohort's ctx)
      if not jax.tree.leaves(state.clients):  # no client state: its
        rows = state.clients                  # (empty) structure
      ctx = dict(ctx, server_state=state.technique,
                 **({} if host_store else dict(client_state=rows)))
    # (one program per chunk: its coverage sums may be scalars where its
    # masks are static; tiers' programs must agree in shapes)
    out = over_clients(client_update_for(stage, tier, not tiered),
                       mask.shape[0])(
        state.params, batches, mask, ctx, keys, state.round, cp)
    finite = (rows_finite((out.delta, out.loss_sum)) if guard
              else jnp.ones(pres.shape, bool))
    ok = finite & pres
    # Unguarded, the weights do not wait for `finite` (all rows are finite
    # whenever these sums are kept: then w is the guarded w).
    w = jnp.where(ok if guard else pres, weight, 0.0)
    dtype = loss_dtype(state.params)
    sums = dict(
        loss=jnp.sum(jnp.where(ok, out.loss_sum, 0.0)),
        correct=jnp.sum(jnp.where(ok, out.correct_sum, 0.0)),
        examples=jnp.sum(jnp.where(ok, out.num_examples, 0.0)),
        scored=jnp.sum(jnp.where(ok, out.num_scored, 0.0)),
        dropped=jnp.sum((~finite) & pres & (weight > 0)).astype(dtype))
    kept = finite if guard else None
    bits = (jnp.where(pres, out.upload_bits, 0.0),
            jnp.where(pres, out.download_bits, 0.0))
    if has_variants(stage):  # (last of the per-slot outputs)
      bits += (jnp.zeros(pres.shape, jnp.int32) if t.variant is None
               else jnp.where(pres, out.variant, 0),)
    if not stateful:
      return placement_lib.Contribution(
          (weighted_sum(w, kept, out.delta),
           weighted_sum(w, kept, out.coverage), sums), bits)
    # Feedback: an unweighted sum over the aggregated clients. Client
    # states: written back for the aggregated clients only (a dropped or
    # padded slot, or a client of weight 0, keeps its client's state).
    ok = (ok if guard else pres) & (weight > 0)
    sums['aggregated'] = jnp.sum(ok).astype(dtype)
    feedback = jax.tree.map(lambda x: jnp.sum(jnp.where(
        ok.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0), axis=0), out.feedback)
    total = (weighted_sum(w, kept, out.delta),
             weighted_sum(w, kept, out.coverage), sums, feedback)
    if host_store:  # the new rows go back to the host with the bits
      return placement_lib.Contribution(total, bits + (out.client_state, ok))
    return placement_lib.Contribution(total, bits, out.client_state, ok)

  def lane_sums(state, examples, cohort, schedule, rng, stage):
    """The round's sums with the clients back to back on lanes
    (`build_lane_update`): (delta_sum, coverage, sums), upload and
    download bits `[K]`."""
    k = cohort.mask.shape[0]
    hparams = state.hparams if jax.tree.leaves(state.hparams) else {}
    out = lane_update_for(stage)(
        state.params, dict(cohort.batches), cohort.mask, cohort.weight,
        client_keys(rng, k), schedule, state.round, hparams, examples)
    dtype = loss_dtype(state.params)
    sums = dict(loss=out.sums.loss, correct=out.sums.correct,
                examples=out.sums.loss_units, scored=out.sums.scored_units,
                dropped=jnp.zeros((), dtype))
    return (out.delta, out.coverage, sums), out.upload_bits, out.download_bits

  def round_program(state: ServerState, examples, cohort, order, chunk_tier,
                    rng, stage, num_clients=None, guard=True, schedule=None):
    """One round (McMahan et al. 2017, Alg. 1; Reddi et al. 2021, Alg. 2):
    broadcast the server state, every client trains and uploads, the
    server averages per parameter over the clients that trained it and
    steps its optimizer.

    `guard=False` (`round_step`'s first try): the sums take every client's
    update unguarded (`contribution`), and a round with any non-finite
    client keeps the old state; returns (state, metrics, that flag), and
    the round runs again guarded. One pass over each update instead of
    two (with the step loop's change, the MLP round went from 0.61 to 0.84
    of the centralized floor on CPU, 0.88 with the training loop's
    prefetch: benchmarks/RESULTS.md, "Item 4 again").

    `schedule` (a `placement.LaneSchedule`; unguarded only): the clients
    run back to back on lanes (`build_lane_update`) instead of in chunks;
    a non-finite sum then sends the round to its guarded, chunked rerun."""
    if schedule is not None:
      total, up, down = lane_sums(state, examples, cohort, schedule, rng,
                                  stage)
      delta_sum, coverage, sums = total
      k = cohort.mask.shape[0]
    else:
      clients = place.to_slots(cohort, order, chunk_tier, rng, num_clients)
      k = clients.num_clients
      programs = [functools.partial(contribution, stage, t, guard)
                  for t in range(num_tiers if tiered else 1)]
      # Chunks of padding only exist with tiers, or to fill mesh blocks.
      dispatch = tiered or order.shape[0] - k >= (
          order.shape[0] // chunk_tier.shape[0])
      total, per_slot, store = place.sum_over_clients(
          programs, (state, examples), clients, state.clients, dispatch)
      delta_sum, coverage, sums = total[:3]
      per_client = lambda x: place.per_client(x, clients)
      up, down = per_client(per_slot[0]), per_client(per_slot[1])
    # (a compact coverage sum, one number for a static mask: at full shape,
    # materialized, so the server's division stays a division and rounds
    # as it did per element)
    # Unguarded: one check of the cohort's sums (a non-finite update or
    # loss of any slot reaches them) instead of one per client.
    redo = None if guard else ~tree_all_finite((delta_sum, sums['loss']))
    coverage = jax.lax.optimization_barrier(jax.tree.map(
        lambda c, p: jnp.broadcast_to(c, p.shape), coverage, state.params))
    read = state
    if tech.aggregate is not None:  # e.g. DP noise, a modular sum
      delta_sum, coverage, technique_state = tech.aggregate(
          state.technique, delta_sum, coverage,
          dict(round=state.round, clients=sums['aggregated']))
      read = state._replace(technique=technique_state)
    new_state, skipped = guarded_server_update(server_optimizer, state,
                                               delta_sum, coverage)
    if stateful:
      new_state = technique_server_update(read, new_state, total[3], sums,
                                          store, skipped)
    host_rows = ()
    if host_store and stateful:  # written back unless the step was skipped
      host_rows = (jax.tree.map(per_client, per_slot[2]),
                   per_client(per_slot[3]) & ~skipped)
    variants = {}
    if has_variants(stage):
      variants = dict(client_variant=per_client(per_slot[-1]))
    if not guard:  # a non-finite client reached the sums: keep the old
      # state (the round runs again guarded)
      new_state = jax.tree.map(lambda n, o: jnp.where(redo, o, n),
                               new_state, state)
    metrics = RoundMetrics(
        # NaN (null in metrics.jsonl) when no example counted: every
        # client dropped, not a loss of 0.
        train_loss=jnp.where(sums['examples'] > 0, sums['loss'] / jnp.maximum(
            sums['examples'], 1.0), jnp.nan),
        train_accuracy=sums['correct'] / jnp.maximum(sums['scored'], 1.0),
        num_clients=jnp.asarray(k, jnp.float32),
        num_dropped=sums['dropped'], upload_bits=jnp.mean(up),
        download_bits=jnp.mean(down),
        server_step_skipped=skipped.astype(jnp.float32),
        client_upload_bits=up, client_download_bits=down,
        **(dict(zip(('client_states', 'client_state_written'), host_rows))
           if host_rows else {}), **variants)
    return (new_state, metrics) if guard else (new_state, metrics, redo)

  def technique_server_update(state, new_state, feedback, sums, store,
                              skipped):
    """The technique's server state from its clients' feedback, and the
    client-state store; a skipped server step keeps both as they were
    (`state`: after `aggregate`, so noise once drawn is never drawn
    again)."""
    technique_state = tech.server_update(
        state.technique, feedback,
        dict(clients=sums['aggregated'], population=population)
    ) if tech.server_update else state.technique
    keep = lambda new, old: jax.tree.map(
        lambda a, b: jnp.where(skipped, b, a), new, old)
    return new_state._replace(technique=keep(technique_state, state.technique),
                              clients=keep(store, state.clients))

  def host_store_for(params) -> 'HostClientStore':
    """A host-side client-state store for `client_store='host'`."""
    if not stateful:
      return HostClientStore(())
    one = technique_lib.init_state(tech, params).client
    return HostClientStore(store_of(one, np))

  one_round = round_program  # (the name is rebound to its jit below)

  if vmap_replicas is None:  # per backend, like the chunk width
    vmap_replicas = jax.default_backend() != 'cpu'

  def replica_program(states, examples, cohorts, order, chunk_tier, rngs,
                      stage):
    """`round_program` over a leading replica axis of the state, the
    cohort and the key; `examples` (device-resident data) shared. Replicas
    are a vmap (`vmap_replicas`, the default on accelerators) or a
    `lax.map`, one replica after another inside the program (the default
    on CPU, where the vmap measured 0.63-0.98x the speed of separate runs:
    benchmarks/replicas.py)."""
    one = lambda s, c, r: one_round(s, examples, c, order, chunk_tier, r,
                                    stage=stage)
    if vmap_replicas:
      # On a mesh with a 'replicas' axis beside 'clients', the replica
      # axis is that mesh axis (each device block of clients runs its
      # replicas' share).
      axis = (REPLICAS_AXIS if mesh is not None
              and REPLICAS_AXIS in mesh.axis_names else None)
      return jax.vmap(one, spmd_axis_name=axis)(states, cohorts, rngs)
    return jax.lax.map(lambda args: one(*args), (states, cohorts, rngs))

  if jit:
    replica_program = jax.jit(replica_program, static_argnames=('stage',),
                              donate_argnums=(0,) if donate else ())
    round_program = jax.jit(round_program,
                            static_argnames=('stage', 'num_clients',
                                             'guard'),
                            donate_argnums=(0,) if donate else ())

  def stage_of(round_num) -> Any:
    return tech.stage(int(round_num)) if tech.stage is not None else None

  def check_chunk_semantics(stage):
    """A technique drawing one choice per chunk (depth dropout's 'chunk'
    mode) means different things at different chunk widths: the width
    must be the user's, not the backend's default."""
    if chunk_size is None and any(
        program(stage, t).chunk_plan is not None
        for t in range(num_tiers if tiered else 1)):
      raise ValueError(
          f'{tech.name!r} draws one choice per chunk of clients, so its '
          'results depend on the chunk width: set chunk_size (the number '
          'of clients sharing a draw) instead of the per-backend default.')

  def check_rows(cohort, examples):
    if cohort.indexed and examples is None:
      raise ValueError('A cohort of row indices (pack_index) needs '
                       'examples=: the ResidentData.examples they point '
                       'into.')

  def round_step(state: ServerState, cohort, rng, round_num=None,
                 examples=None, part_of=None):
    """The host side of a round: the cohort's layout, then the program."""
    stage = stage_of(state.round if round_num is None else round_num)
    check_rows(cohort, examples)
    check_chunk_semantics(stage)
    if part_of is not None:  # this process's slots only (local_part)
      k, tiers = part_of
      layout = place.layout(k, tiers)
      cohort = place.assemble_part(cohort, layout)
    else:
      k = cohort.num_clients
      tiers = cohort.ctx.get('tier') if tiered else None
      layout = place.layout(k, tiers, placement_lib.client_steps(
          cohort.mask))
    run = functools.partial(
        round_program, examples={} if examples is None else examples,
        cohort=cohort, order=layout.order, chunk_tier=layout.chunk_tier,
        rng=rng, stage=stage, num_clients=None if part_of is None else k)
    state = place.broadcast(state)
    if isinstance(state.round, jax.core.Tracer):  # (inside a jit: guarded)
      return run(state)
    # Unguarded first (one pass over each update); a round that met a
    # non-finite client kept its old state and runs again guarded.
    schedule = None
    if lanes and part_of is None:
      schedule = placement_lib.lane_schedule(
          placement_lib.client_steps(cohort.mask),
          placement_lib.chunk_width(chunk_size, k), cohort.mask.shape[1])
    new_state, metrics, redo = run(state, guard=False, schedule=schedule)
    if bool(redo):
      return run(new_state)
    return new_state, metrics

  def replica_step(states: ServerState, cohorts, rngs, round_num=None,
                   examples=None, memory: bool = False):
    """R independent runs of the same config in one program: `states`,
    `cohorts` (each replica its own draw of K clients) and `rngs` carry a
    leading axis of R replicas (`stack_replicas`); returns the R new
    states and metrics, each replica as `round_step` would give it (up to
    float summation order). All replicas run round `round_num` (one stage:
    a staged technique's program of that round) and share `examples`. One
    program per client: no device tiers; one device or a mesh with a
    'replicas' axis."""
    if (tiered and num_tiers > 1) or (
        mesh is not None and REPLICAS_AXIS not in mesh.axis_names):
      raise ValueError('replica_step runs one program per client (no device '
                       "tiers), on one device or a mesh with a 'replicas' "
                       'axis.')
    check_rows(cohorts, examples)
    stage = stage_of(np.asarray(states.round).reshape(-1)[0]
                     if round_num is None else round_num)
    layout = place.layout(cohorts.mask.shape[1], None)
    args = (states, {} if examples is None else examples, cohorts,
            layout.order, layout.chunk_tier, rngs)
    if memory:  # what the compiled program holds at its peak, in bytes
      m = replica_program.lower(*args, stage=stage).compile(
      ).memory_analysis()
      return (int(m.argument_size_in_bytes + m.output_size_in_bytes
                  + m.temp_size_in_bytes - m.alias_size_in_bytes)
              if m is not None else None)
    return replica_program(*args, stage=stage)

  def replica_peak_bytes(states, cohorts, rngs, round_num=None,
                         examples=None):
    """Peak bytes of `replica_step`'s compiled program for these R
    replicas (arguments + outputs + temporaries - donated), or None."""
    return replica_step(states, cohorts, rngs, round_num, examples,
                        memory=True)

  first_stage = tech.stage(0) if tech.stage else None
  return RoundFns(init, round_step, client_update_for(first_stage, 0),
                  client_update_for, tech, place.local_part, replica_step,
                  host_store_for, replica_peak_bytes)


def stack_replicas(trees: Sequence[PyTree]) -> PyTree:
  """R pytrees of one structure (states, cohorts, keys) -> one pytree
  with a leading replica axis, for `RoundFns.replica_step`."""
  return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]),
                      *trees)


def unstack_replicas(tree: PyTree, num: int) -> list[PyTree]:
  """The inverse of `stack_replicas`."""
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(num)]
