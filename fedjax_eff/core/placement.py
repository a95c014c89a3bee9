"""Where the clients of a round run: placement helpers for `core/round.py`.

In the spirit of DrJAX (Rush et al. 2024, "DrJAX: Scalable and
Differentiable MapReduce Primitives in JAX"), the round is written with
three placement operations and never sees how they are carried out:

  broadcast        the server's values, the same for every client
  map over clients a client's work, one program per device tier
  sum over clients Σ_k of each client's contribution (the weighted sums),
                   each client's own outputs (bits), and its persistent
                   state written back to a client-state store

Carrying them out is this module's business. The host computes a cohort's
`CohortLayout` once per round: which client sits in which slot of which
chunk of `C` clients, each chunk tier-homogeneous, the chunk count fixed
whatever the tier mix (no recompilation), padded to whole blocks per device
of a mesh. Inside the program, `Placement.sum_over_clients` scans the
chunks (memory O(C x model), never K models), vmaps a chunk's clients (or
runs one unbatched at C = 1, faster on XLA:CPU), dispatches a chunk to its
tier's program with `lax.switch` (only that branch runs; chunks of padding
are skipped), and with a mesh splits the chunks into one block per device
(`shard_map`) whose sums meet in a `psum`. With `jax.distributed` the mesh
spans processes, and each process may pack only the clients of its own
slots (`local_part`).

Results do not depend on C or the mesh (up to float summation order):
every client's randomness is `fold_in(rng, cohort position)`, and padded
slots weigh nothing.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
CLIENTS_AXIS = 'clients'
# Replicas of one program (`round.replica_step`), beside the clients.
REPLICAS_AXIS = 'replicas'
# A cohort of row indices into device-resident examples has this one
# "feature" (`data.pack_index`); the round gathers the rows per chunk.
ROWS = '_index'


def default_chunk_size(num_clients: int, backend: str | None = None) -> int:
  """C per backend: 1 on CPU (measured fastest, DESIGN.md), wide elsewhere."""
  backend = backend or jax.default_backend()
  return 1 if backend == 'cpu' else min(num_clients, 128)


def chunk_width(chunk_size: int | None, num_clients: int) -> int:
  """The clients per chunk: `chunk_size` (None or 0: the backend's
  default), at most `num_clients`. The one place the default is applied."""
  return min(chunk_size or default_chunk_size(num_clients), num_clients)


def client_keys(rng: jax.Array, num: int) -> jax.Array:
  """Per-client keys: `fold_in(rng, position)`, independent of chunking."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(num))


def chunk_key(client_key: jax.Array) -> jax.Array:
  """The key of a chunk's shared plan: from its first client's key."""
  return jax.random.fold_in(client_key, 0x6368)


def replicate(mesh: jax.sharding.Mesh, x):
  """`x` with a copy on every device of `mesh` (of every process).

  Kept as is if it already is; otherwise from this process's value, which
  every process must hold alike (`jax.device_put` cannot move an array
  committed to one process's device onto another process's devices).
  """
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(rep, x.ndim):
    return x
  return jax.make_array_from_process_local_data(rep, np.asarray(x))


class ChunkLayout(NamedTuple):
  """Which cohort position sits in each slot of each chunk (host side).

  Without tiers the slots are the cohort in order, padded to whole chunks.
  With tiers, each tier's clients are contiguous and padded to whole chunks,
  so every chunk is tier-homogeneous and runs its tier's program; the number
  of chunks is fixed at `floor((K + T (C - 1)) / C)` whatever the tier mix,
  so the round never recompiles, and surplus chunks (tier `T`) are skipped.
  """
  order: np.ndarray       # [num_chunks * C] cohort position, K for padding
  chunk_tier: np.ndarray  # [num_chunks] tier of each chunk; T (1 without
                          # tiers) = a chunk of padding only, skipped


CohortLayout = ChunkLayout  # the host's plan of a round's slots


def client_steps(mask) -> np.ndarray:
  """`[K]` steps each client must run (host side): 1 + the index of its
  last step with an example, from the cohort's `[K, S, B]` mask; None
  for a traced mask."""
  if isinstance(mask, jax.core.Tracer):  # traced (a jitted round_step):
    return None                          # no host-side order
  real = np.asarray(mask).reshape(mask.shape[0], mask.shape[1], -1).any(-1)
  return np.where(real.any(1), real.shape[1] - np.argmax(real[:, ::-1], 1),
                  0)


def _by_steps(members: np.ndarray, steps, c: int) -> np.ndarray:
  """`members` with the most steps first (stable), so that each chunk of
  `c` holds clients of similar step counts and runs only to its longest
  (`core.round`: steps past a chunk's longest client are skipped)."""
  if steps is None or c == 1:
    return members
  return members[np.argsort(-np.asarray(steps)[members], kind='stable')]


def chunk_layout(num_clients: int, chunk_size: int, tiers=None,
                 num_tiers: int = 1, shards: int = 1,
                 steps=None) -> ChunkLayout:
  """The slots of a round; `shards` rounds the chunk count up to a multiple
  (one block of chunks per device of the mesh), adding skipped chunks.
  With `steps` (`[K]`, `client_steps`) and chunks wider than one client,
  the clients of each tier are ordered by step count (most first)."""
  k, c = num_clients, chunk_size
  if tiers is None:
    n = -(-k // c)
    order = np.full(-(-n // shards) * shards * c, k)
    order[:k] = _by_steps(np.arange(k), steps, c)
    chunk_tier = np.zeros(len(order) // c, np.int32)
    chunk_tier[n:] = 1  # whole chunks of padding: skipped
    return ChunkLayout(order, chunk_tier)
  tiers = np.asarray(tiers).astype(np.int64).reshape(-1)
  if tiers.shape != (k,) or tiers.min(initial=0) < 0 or tiers.max(
      initial=0) >= num_tiers:
    raise ValueError(f'cohort ctx["tier"] must be {k} ints in [0, '
                     f'{num_tiers}); got {tiers!r}.')
  n = (k + num_tiers * (c - 1)) // c
  order, chunk_tier = [], []
  for t in range(num_tiers):
    members = _by_steps(np.flatnonzero(tiers == t), steps, c)
    m = -(-len(members) // c)
    order.append(np.concatenate([members, np.full(m * c - len(members), k)]))
    chunk_tier += [t] * m
  n = -(-n // shards) * shards
  order.append(np.full((n - len(chunk_tier)) * c, k))
  chunk_tier += [num_tiers] * (n - len(chunk_tier))
  return ChunkLayout(np.concatenate(order).astype(np.int32),
                     np.asarray(chunk_tier, np.int32))


class LaneSchedule(NamedTuple):
  """Clients run back to back on `L` lanes (host side; `lane_schedule`).

  `client[l, t]` is the cohort position lane `l` trains at its step `t`
  (K: past the lane's end), `step[l, t]` that client's own local step, and
  `last[l, t]` whether it is that client's last step (the lane then adds
  w_k Δ_k to its sum and restarts from the server model). `length`: the
  longest lane's steps, the steps the round runs (a scalar array, so a
  new cohort does not recompile). Arrays are `[L, T]` with `T` fixed by
  K, S and L alone (`lane_capacity`)."""
  client: np.ndarray
  step: np.ndarray
  last: np.ndarray
  length: np.ndarray


def lane_capacity(num_clients: int, max_steps: int, lanes: int) -> int:
  """Steps a lane may need under `lane_schedule` (Graham's bound for
  longest-first scheduling: the average load plus one client's steps),
  at most every client's steps: K, S and L fix it, so the schedule's
  shape never changes between rounds."""
  k, s = num_clients, max_steps
  return max(1, min(k * s, -(-k * s // lanes) + s))


def lane_schedule(steps, lanes: int, max_steps: int) -> LaneSchedule:
  """Longest-processing-time-first scheduling of the cohort's clients onto
  `lanes` lanes: each client, most steps first, goes to the lane with the
  least work so far (ties: the lowest lane). Its makespan is within 4/3 of
  the best possible (Graham 1969); the lanes compute Σ_k s_k real steps in
  `L x length` slots, the useful fraction `benchmarks/ragged.py` reports
  as `useful_fraction_c8_lanes`. A client of 0 steps runs nowhere.

  `steps`: `[K]` ints (`client_steps`), each at most `max_steps` (S).
  """
  steps = np.asarray(steps, np.int64).reshape(-1)
  k = steps.shape[0]
  cap = lane_capacity(k, max_steps, lanes)
  client = np.full((lanes, cap), k, np.int32)
  step = np.zeros((lanes, cap), np.int32)
  last = np.zeros((lanes, cap), bool)
  load = np.zeros(lanes, np.int64)
  for i in np.argsort(-steps, kind='stable'):
    n = int(steps[i])
    if n == 0:
      continue
    lane = int(np.argmin(load))
    at = int(load[lane])
    client[lane, at:at + n] = i
    step[lane, at:at + n] = np.arange(n)
    last[lane, at + n - 1] = True
    load[lane] += n
  return LaneSchedule(client, step, last,
                      np.asarray(load.max(initial=0), np.int32))


def map_clients(fn: Callable[..., PyTree], c: int,
                in_axes: Sequence[Any]) -> Callable[..., PyTree]:
  """`fn` over a chunk of `c` clients (leading axis of the `in_axes` = 0
  arguments; `None` arguments are broadcast).

  A vmap, except for one client: then the client runs unbatched and its
  outputs get the axis back. XLA:CPU runs the batch-of-one matmuls a vmap
  makes markedly slower than plain ones (measured: a 200k-parameter MLP
  step took 0.53 ms instead of 0.35 ms), and C = 1 is the CPU default.
  """
  if c != 1:
    return jax.vmap(fn, in_axes=tuple(in_axes))

  def one(*args):
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)
    out = fn(*(a if ax is None else first(a) for a, ax in zip(args, in_axes)))
    return jax.tree.map(lambda x: jnp.asarray(x)[None], out)
  return one


class Clients(NamedTuple):
  """A round's clients in their slots (inside the program): every array
  has leading axes `[num_chunks, C]`."""
  data: PyTree        # (batches, mask, weight, ctx) of each slot
  keys: jax.Array     # per-slot PRNG key: fold_in(rng, cohort position)
  present: jax.Array  # bool: a real client (not padding)
  chunk_tier: jax.Array  # [num_chunks] tier program of each chunk
  slot_pos: jax.Array    # [num_chunks * C] cohort position (K: padding)
  num_clients: int       # K (static)


class Contribution(NamedTuple):
  """What one chunk of clients gives the round.

  `total` is summed over chunks (and devices); `per_slot` has a leading
  `[C]` axis, gathered for every slot (bits); `rows` and `write` (`[C]`
  each) are the chunk's clients' new rows of a client-state store, written
  back where `write`."""
  total: PyTree
  per_slot: PyTree
  rows: PyTree = ()
  write: Any = ()


class Placement(NamedTuple):
  """How a round's clients are laid out and run (see the module docstring).
  """
  chunk_size: int | None = None
  num_tiers: int = 1
  tiered: bool = False
  mesh: jax.sharding.Mesh | None = None

  @property
  def shards(self) -> int:
    return self.mesh.shape[CLIENTS_AXIS] if self.mesh is not None else 1

  # Host side.

  def layout(self, num_clients: int, tiers=None, steps=None
             ) -> ChunkLayout:
    """The round's slots, computed once on the host (`steps`: order each
    tier's clients by step count, `chunk_layout`)."""
    c = chunk_width(self.chunk_size, num_clients)
    if self.tiered and tiers is None:
      tiers = np.zeros(num_clients, np.int64)
    return chunk_layout(num_clients, c,
                        np.asarray(tiers) if self.tiered else None,
                        self.num_tiers, self.shards, steps)

  def local_slots(self, layout: ChunkLayout) -> slice:
    """The slots on this process's devices (one contiguous range)."""
    mesh = self.mesh
    if mesh.devices.ndim != 1:
      raise ValueError('A cohort split across processes needs a 1-D mesh '
                       f'(the {CLIENTS_AXIS!r} axis only).')
    mine = [i for i, d in enumerate(mesh.devices.reshape(-1))
            if d.process_index == jax.process_index()]
    if not mine or mine != list(range(mine[0], mine[-1] + 1)):
      raise ValueError('This process\'s devices must be one contiguous run '
                       'of the mesh.')
    block = len(layout.order) // self.shards
    return slice(mine[0] * block, (mine[-1] + 1) * block)

  def local_part(self, num_clients: int, tiers=None) -> np.ndarray:
    """Cohort positions of the slots this process trains, in slot order
    (`num_clients` for a padding slot): pack these clients (padding slots
    may hold any client; they weigh nothing) and pass that cohort to
    `round_step(..., part_of=(num_clients, tiers))`. Each process then
    packs and holds only its part of the cohort."""
    if self.mesh is None:
      raise ValueError('local_part needs build_round(..., mesh=...).')
    layout = self.layout(num_clients, tiers)
    return layout.order[self.local_slots(layout)]

  def assemble_part(self, cohort, layout: ChunkLayout):
    """This process's part of a cohort (`local_part`'s rows) as one global
    array per field, sharded over the mesh's client axis."""
    part = self.local_slots(layout)
    if cohort.mask.shape[0] != part.stop - part.start:
      raise ValueError(f'part_of: the cohort has {cohort.mask.shape[0]} '
                       f'rows; local_part gave {part.stop - part.start}.')
    by_client = jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec(CLIENTS_AXIS))
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            by_client, np.asarray(x), (len(layout.order),) + x.shape[1:]),
        cohort)

  def broadcast(self, tree: PyTree) -> PyTree:
    """Server values onto every device of the mesh (as they are without)."""
    if self.mesh is None:
      return tree
    return jax.tree.map(functools.partial(replicate, self.mesh), tree)

  # Inside the program.

  def to_slots(self, cohort, order, chunk_tier, rng,
               num_clients: int | None = None) -> Clients:
    """`cohort` (cohort order) taken into its slots; or, given
    `num_clients`, already one row per slot of `order` (`local_part`)."""
    k = cohort.mask.shape[0] if num_clients is None else num_clients
    num_chunks = chunk_tier.shape[0]
    c = order.shape[0] // num_chunks
    present = order < k

    def chunked(x):
      x = jnp.asarray(x)
      if num_clients is None:
        x = jnp.take(x, order, axis=0, mode='clip')
      return x.reshape((num_chunks, c) + x.shape[1:])

    batches, mask, weight, ctx = jax.tree.map(
        chunked, (dict(cohort.batches), cohort.mask, cohort.weight,
                  dict(cohort.ctx)))
    weight = jnp.where(present.reshape(num_chunks, c), weight, 0.0)
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(
        jnp.where(present, order, k + jnp.arange(order.shape[0])))
    keys = keys.reshape((num_chunks, c) + keys.shape[1:])
    return Clients((batches, mask, weight, ctx), keys,
                   present.reshape(num_chunks, c), chunk_tier,
                   jnp.where(present, order, k), k)

  def per_client(self, per_slot: jax.Array, clients: Clients) -> jax.Array:
    """`[num_chunks, C, ...]` slot values -> `[K, ...]` in cohort order."""
    rest = per_slot.shape[2:]
    return jnp.zeros((clients.num_clients,) + rest, per_slot.dtype).at[
        clients.slot_pos].set(per_slot.reshape((-1,) + rest), mode='drop')

  def sum_over_clients(self, programs: Sequence[Callable[..., Contribution]],
                       shared: PyTree, clients: Clients, store: PyTree = (),
                       dispatch: bool = True):
    """Σ over chunks of `programs[tier](shared, chunk, rows)`.

    `chunk` is `(data, keys, present)` of one chunk's slots; `rows` the
    chunk's clients' rows of `store` (by `ctx['client_index']`), `()`
    without a store. Returns `(total, per_slot [num_chunks, C, ...],
    store)` with the written rows in `store`. `dispatch=False` (one
    program, no chunk of padding only) calls the program directly: a
    `lax.switch` per chunk costs copies of its operands, measured at
    0.17 ms per chunk for a 200k-parameter MLP.
    """
    has_store = bool(jax.tree.leaves(store))
    population = jax.tree.leaves(store)[0].shape[0] if has_store else 0

    def rows_of(store, chunk):
      if not has_store:
        return ()
      ids = chunk[0][3]['client_index']
      return jax.tree.map(lambda s: jnp.take(s, ids, axis=0, mode='clip'),
                          store)

    def run(shared, store, chunk, tier):
      def call(fn):
        return lambda: fn(shared, chunk, rows_of(store, chunk))
      if not dispatch:
        return call(programs[0])()
      template = jax.eval_shape(call(programs[0]))
      skip = lambda: jax.tree.map(
          lambda x: jnp.zeros(x.shape, x.dtype), template)
      return jax.lax.switch(tier, [call(p) for p in programs] + [skip])

    def scan(shared, store, xs):
      def body(carry, xs_i):
        chunk, tier = xs_i
        out = run(shared, carry[1] if has_store else store, chunk, tier)
        if not has_store:
          return jax.tree.map(jnp.add, carry, out.total), out.per_slot
        acc, st, wrote = carry
        ids = jnp.where(out.write, chunk[0][3]['client_index'], population)
        st = jax.tree.map(lambda s, n: s.at[ids].set(n, mode='drop'), st,
                          out.rows)
        wrote = wrote.at[ids].set(True, mode='drop')
        return (jax.tree.map(jnp.add, acc, out.total), st, wrote), (
            out.per_slot)

      first = jax.tree.map(lambda x: x[0], xs)
      template = jax.eval_shape(lambda: run(shared, store, *first))
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                           template.total)
      init = (zeros if not has_store else
              (zeros, store, jnp.zeros((population,), bool)))
      return jax.lax.scan(body, init, xs)

    xs = ((clients.data, clients.keys, clients.present), clients.chunk_tier)
    if self.mesh is None:
      carry, per_slot = scan(shared, store, xs)
      return (carry[0], per_slot, carry[1]) if has_store else (
          carry, per_slot, store)
    return self._sharded(scan, shared, store, xs, has_store)

  def _sharded(self, scan, shared, store, xs, has_store):
    """`scan` per device block of the mesh, sums met by a psum."""
    mesh = self.mesh

    def block(shared, store, xs):
      carry, per_slot = scan(shared, store, xs)
      per_slot = jax.lax.all_gather(per_slot, CLIENTS_AXIS, tiled=True)
      if not has_store:
        return jax.lax.psum(carry, CLIENTS_AXIS), per_slot, store
      # Each client sits in one slot of one device: the rows a device
      # wrote, summed with the other devices' zeros, are exact.
      acc, st, wrote = carry
      mine = jax.tree.map(lambda s: jnp.where(
          wrote.reshape((-1,) + (1,) * (s.ndim - 1)), s, 0), st)
      wrote = jax.lax.psum(wrote.astype(jnp.int32), CLIENTS_AXIS) > 0
      st = jax.tree.map(lambda s, m: jnp.where(
          wrote.reshape((-1,) + (1,) * (s.ndim - 1)), m, s), store,
                        jax.lax.psum(mine, CLIENTS_AXIS))
      return jax.lax.psum(acc, CLIENTS_AXIS), per_slot, st

    p = jax.sharding.PartitionSpec
    by_client = jax.sharding.NamedSharding(mesh, p(CLIENTS_AXIS))
    explicit = mesh.axis_types[mesh.axis_names.index(CLIENTS_AXIS)] == (
        jax.sharding.AxisType.Explicit)  # jax.make_mesh's default
    place = (jax.sharding.reshard if explicit
             else jax.lax.with_sharding_constraint)
    xs = jax.tree.map(lambda x: place(x, by_client), xs)
    # A 'replicas' axis beside the clients' (replicas of one program,
    # vmapped over it: `round.replica_step`) is manual too, so that the
    # vmap's batch dimension maps onto it.
    names = {CLIENTS_AXIS} | ({REPLICAS_AXIS} & set(mesh.axis_names))
    return jax.shard_map(
        block, mesh=mesh, in_specs=(p(), p(), p(CLIENTS_AXIS)),
        out_specs=(p(), p(), p()), axis_names=names,
        check_vma=False)(shared, store, xs)


__all__ = ['CLIENTS_AXIS', 'REPLICAS_AXIS', 'ROWS', 'ChunkLayout', 'Clients', 'CohortLayout',
           'Contribution', 'Placement', 'chunk_key', 'chunk_layout',
           'chunk_width', 'client_keys', 'default_chunk_size', 'map_clients', 'replicate']
