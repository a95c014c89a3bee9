"""Sampling a round's cohort and packing it into static shapes.

A jit-compiled round needs the same shapes every round, while real clients
hold anything from one example to thousands. `pack` turns the sampled clients
into arrays of shape `[K, S, B, ...]` (clients, local steps, batch) with an
example mask `[K, S, B]` and a per-client weight `[K]`:

* a client with more than `S * B` examples trains on a random subset of
  `S * B` of them, drawn afresh each round (`policy_large='subsample'`), or
  the run fails (`policy_large='error'`);
* a client with fewer examples fills its first steps with real examples and
  pads the rest with zeros and mask 0 (`policy_small='pad'`); with
  `policy_small='repeat'` it instead cycles through its examples (epochs)
  until the `S * B` slots are full.

With `weighting='num_examples'` a client's weight is the number of distinct
real examples it trained on, `min(n, S * B)`; with `'uniform'` every
non-empty client weighs 1.

With `epochs` E (config `client.epochs`, TFF's and FedJAX's convention), a
client instead runs E epochs over min(n, `max_examples`) of its examples:
E x ceil(min(n, max) / B) real steps, each epoch reshuffled with a
partial last batch, the rest of the S = `epoch_steps(...)` steps (those of
the largest client) padding; its weight is min(n, max) (FedJAX's
convention: examples per epoch; `'uniform'` as above).

Every random choice derives from `(seed, round, client index)`, so packing is
reproducible and a resumed run sees exactly the cohorts an unbroken run saw.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import numpy as np

from fedjax_eff.core.placement import ROWS, client_steps
from fedjax_eff.data.federated import FederatedData

POLICIES_LARGE = ('subsample', 'error')
POLICIES_SMALL = ('pad', 'repeat')
WEIGHTINGS = ('num_examples', 'uniform')




class Cohort(NamedTuple):
  """One round's clients in static shapes.

  Attributes:
    batches: feature name -> `[K, S, B, ...]` arrays; for device-resident
      data (`pack_index`) the one entry `ROWS` -> `[K, S, B]` int32 row
      indices into `ResidentData.examples` (padding: its all-zero row),
      gathered inside the round program.
    mask: `[K, S, B]` float32, 1 for a real example, 0 for padding.
    weight: `[K]` float32 aggregation weight (0 for an empty/padded slot).
    ctx: per-client context arrays `[K, ...]` for technique plans (e.g.
      `client_index`, device tier, task id).
  """
  batches: Mapping[str, np.ndarray]
  mask: np.ndarray
  weight: np.ndarray
  ctx: Mapping[str, np.ndarray]

  @property
  def num_clients(self) -> int:
    return self.mask.shape[0]

  @property
  def indexed(self) -> bool:
    """Row indices into device-resident examples, not the examples."""
    return ROWS in self.batches

  @property
  def index(self) -> np.ndarray:
    """`[K, S, B]` row indices (an indexed cohort only)."""
    return self.batches[ROWS]

  @property
  def steps_run(self) -> np.ndarray:
    """`[K]` int: the local steps each client's device runs, 1 + its last
    step with an example (0 for an empty slot); the host-side twin of
    `core.round.last_real_step` per client (`placement.client_steps`).
    With `epochs` (or clients smaller than S x B) it varies by client."""
    return client_steps(self.mask)


@dataclasses.dataclass(frozen=True)
class CohortSampler:
  """Draws `clients_per_round` distinct clients per round from (seed, round).

  Stateless: the cohort of round r is a pure function of the seed and r, so
  resuming needs nothing but the round number.
  """
  num_clients: int
  clients_per_round: int
  seed: int

  def __post_init__(self):
    if self.clients_per_round < 1:
      raise ValueError('clients_per_round must be >= 1, got '
                       f'{self.clients_per_round}.')
    if self.clients_per_round > self.num_clients:
      raise ValueError(
          f'clients_per_round={self.clients_per_round} is more than the '
          f'{self.num_clients} training clients available.')

  def sample(self, round_num: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, 0x5A3D, round_num])
    return np.sort(rng.choice(self.num_clients, self.clients_per_round,
                              replace=False)).astype(np.int64)


  @property
  def slots(self) -> int:
    """Static cohort size: every round draws exactly this many."""
    return self.clients_per_round

  @property
  def sampling_probability(self) -> float:
    return self.clients_per_round / self.num_clients


@dataclasses.dataclass(frozen=True)
class PoissonSampler(CohortSampler):
  """Each client joins round r independently with probability q = K / N
  (the sampling DP-FedAvg's amplification assumes; McMahan et al. 2018).

  The cohort's size varies; the round's shapes do not: `slots` =
  ceil(qN + 4 sqrt(qN(1-q))) + 1 (a draw larger than that has
  probability < 1e-4 per round) and `pad_absent` fills the rest with
  absent clients (weight 0, no example). A draw beyond `slots` keeps a
  random `slots` of its clients and says so (`overflow`).
  """
  # (clients_per_round K: the expected cohort size qN)

  @property
  def slots(self) -> int:
    k, q = self.clients_per_round, self.sampling_probability
    return int(min(self.num_clients,
                   np.ceil(k + 4 * np.sqrt(k * (1 - q))) + 1))

  def draw(self, round_num: int) -> tuple[np.ndarray, int]:
    """(sorted client indices, clients drawn beyond `slots`)."""
    rng = np.random.default_rng([self.seed, 0x9015, round_num])
    ids = np.flatnonzero(rng.random(self.num_clients)
                         < self.sampling_probability)
    over = max(len(ids) - self.slots, 0)
    if over:
      ids = np.sort(rng.choice(ids, self.slots, replace=False))
    return ids.astype(np.int64), over

  def sample(self, round_num: int) -> np.ndarray:
    return self.draw(round_num)[0]


@dataclasses.dataclass(frozen=True)
class CyclicSampler(CohortSampler):
  """The population, shuffled once (seeded), split into N // K blocks of K
  clients; round r trains block r mod (N // K). Each client takes part
  once every N // K rounds (min-separation N // K): the participation
  pattern banded DP-FTRL's accounting assumes (Choquette-Choo et al.
  2023; Kairouz et al. 2021 train in such epochs). The N mod K clients
  left over by the split never train.
  """

  @property
  def blocks(self) -> int:
    return self.num_clients // self.clients_per_round

  def sample(self, round_num: int) -> np.ndarray:
    order = np.random.default_rng([self.seed, 0xC1C1]).permutation(
        self.num_clients)
    b = round_num % self.blocks
    k = self.clients_per_round
    return np.sort(order[b * k:(b + 1) * k]).astype(np.int64)


SAMPLERS = {'fixed': CohortSampler, 'poisson': PoissonSampler,
            'cyclic': CyclicSampler}


def make_sampler(sampling: str, num_clients: int, clients_per_round: int,
                 seed: int):
  """'fixed' (K distinct clients per round), 'poisson' or 'cyclic'."""
  if sampling not in SAMPLERS:
    raise ValueError(f'sampling={sampling!r} is not one of '
                     f'{sorted(SAMPLERS)}.')
  return SAMPLERS[sampling](num_clients, clients_per_round, seed)


def padded_ids(ids: np.ndarray, slots: int) -> np.ndarray:
  """`ids` filled up to `slots` entries (repeating the first client, or
  client 0 for an empty draw) for packing; `pad_absent` empties the
  filler."""
  ids = np.asarray(ids, np.int64)
  filler = ids[0] if len(ids) else 0
  return np.concatenate([ids, np.full(slots - len(ids), filler, np.int64)])


def pad_absent(cohort, present: int):
  """`cohort` with every slot from `present` on absent: no example
  (mask 0) and weight 0, so it trains nothing and is not aggregated."""
  if present >= cohort.num_clients:
    return cohort
  mask = np.array(cohort.mask, copy=True)
  weight = np.array(cohort.weight, copy=True)
  mask[present:] = 0.0
  weight[present:] = 0.0
  return cohort._replace(mask=mask, weight=weight)


def _client_rng(seed: int, round_num: int, client_index: int):
  return np.random.default_rng([seed, 0xC0DE, round_num, client_index])


def _validate(policy_large, policy_small, weighting, steps, batch_size):
  if policy_large not in POLICIES_LARGE:
    raise ValueError(f'policy_large must be one of {POLICIES_LARGE}, got '
                     f'{policy_large!r}.')
  if policy_small not in POLICIES_SMALL:
    raise ValueError(f'policy_small must be one of {POLICIES_SMALL}, got '
                     f'{policy_small!r}.')
  if weighting not in WEIGHTINGS:
    raise ValueError(f'weighting must be one of {WEIGHTINGS}, got '
                     f'{weighting!r}.')
  if steps < 1 or batch_size < 1:
    raise ValueError(f'steps and batch_size must be >= 1, got steps={steps}, '
                     f'batch_size={batch_size}.')


def _example_order(client_id: str, n: int, capacity: int, rng, *,
                   policy_large: str, policy_small: str,
                   shuffle: bool) -> np.ndarray:
  """Which of a client's `n` examples fill its slots, in order (<= capacity).

  The one place the packing policies live: `pack` gathers these rows on the
  host, `pack_index` sends them to a round that gathers on the device, so
  both see exactly the same examples.
  """
  order = rng.permutation(n) if shuffle else np.arange(n)
  if n > capacity:
    if policy_large == 'error':
      raise ValueError(
          f'Client {client_id!r} has {n} examples, more than '
          f'steps*batch_size={capacity}; set policy_large="subsample".')
    order = order[:capacity]
  elif n < capacity and policy_small == 'repeat' and n > 0:
    reps = -(-capacity // n)
    order = np.concatenate(
        [order] + [rng.permutation(n) if shuffle else np.arange(n)
                   for _ in range(reps - 1)])[:capacity]
  return order


def _client_weight(trained: int, n: int, weighting: str) -> float:
  """`trained` (the distinct examples a client trains on) or 1."""
  return trained if weighting == 'num_examples' else float(n > 0)


def epoch_steps(sizes, batch_size: int, epochs: int,
                max_examples: int = 0) -> int:
  """S for `epochs` local epochs: the steps of the largest client,
  `epochs x ceil(min(n, max_examples) / B)` (max_examples 0: no cap)."""
  largest = int(np.max(sizes)) if len(sizes) else 0
  if max_examples:
    largest = min(largest, max_examples)
  return max(1, epochs * -(-largest // batch_size))


def local_steps_of(sizes, *, steps: int, batch_size: int, epochs: int = 0,
                   max_examples: int = 0, policy_small: str = 'pad',
                   **_) -> np.ndarray:
  """`[N]` the local steps each client of `sizes` runs when packed into S =
  `steps` (`pack`'s layout, from sizes alone; `Cohort.steps_run` is the
  same read off a packed cohort's mask):

    epochs E:          E ceil(min(n, max_examples) / B)
    policy_small 'repeat' (n > 0):  S (its examples repeat to fill them)
    otherwise:         ceil(min(n, S B) / B)

  and 0 for a client with no examples. Other `pack` keywords are ignored,
  so `local_steps_of(sizes, **packing)` takes a run's packing dict."""
  n = np.asarray(sizes, np.int64)
  if epochs:
    m = np.minimum(n, max_examples) if max_examples else n
    out = epochs * -(-m // batch_size)
  elif policy_small == 'repeat':
    out = np.where(n > 0, steps, 0)
  else:
    out = -(-np.minimum(n, steps * batch_size) // batch_size)
  return np.minimum(out, steps).astype(np.int64)


def _slot_examples(client_id: str, n: int, capacity: int, rng, *,
                   batch_size: int, policy_large: str, policy_small: str,
                   shuffle: bool, epochs: int = 0, max_examples: int = 0
                   ) -> tuple[np.ndarray, int]:
  """(the example in each of a client's `capacity` slots, -1 for padding;
  how many distinct examples it trains on).

  Without `epochs` the slots fill from the start (`_example_order`). With
  `epochs` E (TFF's and FedJAX's client epochs): the client trains on m =
  min(n, max_examples) of its examples (a fresh subset each round when
  n > max_examples), E times, each epoch a fresh order in ceil(m / B)
  steps whose last batch is partial (its other slots padding); its steps
  past E ceil(m / B) are padding. The packing policies do not apply.
  """
  if not epochs:
    order = _example_order(client_id, n, capacity, rng,
                           policy_large=policy_large,
                           policy_small=policy_small, shuffle=shuffle)
    slots = np.full(capacity, -1, np.int64)
    slots[:len(order)] = order
    return slots, min(n, capacity)
  m = min(n, max_examples) if max_examples else n
  per_epoch = -(-m // batch_size)
  if per_epoch * epochs * batch_size > capacity:
    raise ValueError(
        f'Client {client_id!r}: {epochs} epochs of {m} examples at batch '
        f'{batch_size} need {per_epoch * epochs} steps, more than the '
        f'{capacity // batch_size} packed (epoch_steps gives S).')
  base = rng.permutation(n)[:m] if shuffle else np.arange(m)
  slots = np.full(capacity, -1, np.int64)
  for e in range(epochs):
    start = e * per_epoch * batch_size
    slots[start:start + m] = rng.permutation(base) if shuffle else base
  return slots, m


def _full_ctx(client_indices, ctx):
  full_ctx: dict[str, Any] = {'client_index': np.asarray(client_indices,
                                                         np.int32)}
  if ctx:
    full_ctx.update({c: np.asarray(v) for c, v in ctx.items()})
  return full_ctx


def pack(data: FederatedData, client_indices: np.ndarray, *, steps: int,
         batch_size: int, seed: int, round_num: int,
         policy_large: str = 'subsample', policy_small: str = 'pad',
         weighting: str = 'num_examples', shuffle: bool = True,
         ctx: Mapping[str, np.ndarray] | None = None, epochs: int = 0,
         max_examples: int = 0) -> Cohort:
  """Packs clients into a `Cohort` of shape `[K, steps, batch_size, ...]`.

  Args:
    data: the federated training data.
    client_indices: `[K]` client indices into `data.client_ids`.
    steps: local steps S per client.
    batch_size: examples per step B.
    seed, round_num: derive the per-client example order and subsets.
    policy_large, policy_small, weighting: see the module docstring.
    shuffle: shuffle each client's examples (per round) before packing.
    ctx: extra per-client context, `[K, ...]` arrays.
    epochs, max_examples: local epochs over at most `max_examples` of each
      client's examples instead of filling the S steps (`_slot_examples`;
      `epoch_steps` gives the S they need).

  Returns:
    A `Cohort` of numpy arrays.
  """
  _validate(policy_large, policy_small, weighting, steps, batch_size)
  capacity = steps * batch_size
  k = len(client_indices)
  first = data.client(int(client_indices[0]))
  batches = {f: np.zeros((k, capacity) + a.shape[1:], a.dtype)
             for f, a in first.items()}
  mask = np.zeros((k, capacity), np.float32)
  weight = np.zeros((k,), np.float32)
  for slot, ci in enumerate(client_indices):
    ci = int(ci)
    client = data.client(ci)
    n = len(next(iter(client.values())))
    slots, trained = _slot_examples(
        data.client_ids[ci], n, capacity, _client_rng(seed, round_num, ci),
        batch_size=batch_size, policy_large=policy_large,
        policy_small=policy_small, shuffle=shuffle, epochs=epochs,
        max_examples=max_examples)
    real = slots >= 0
    for f, a in client.items():
      batches[f][slot, real] = a[slots[real]]
    mask[slot, real] = 1.0
    weight[slot] = _client_weight(trained, n, weighting)
  shape = (k, steps, batch_size)
  batches = {f: a.reshape(shape + a.shape[2:]) for f, a in batches.items()}
  return Cohort(batches, mask.reshape(shape), weight,
                _full_ctx(client_indices, ctx))


class ResidentData(NamedTuple):
  """All training clients' examples in one place, for on-device gathers.

  `examples[f]` is every client's rows of feature `f` back to back (client
  order), then one all-zero row (`pad_row`), `offsets[i]` where client `i`
  starts, `sizes[i]` its count. Put `examples` on the accelerator once
  (`jax.device_put`); each round only an `IndexedCohort` (int32 row
  indices) crosses from the host, and the round gathers the rows of each
  chunk inside the jitted program. Padded slots point at the zero row, so
  they hold exactly what `pack` puts in padding: a NaN or inf in a real
  example can never reach a padded slot (where a 0 mask would not cancel
  it: NaN x 0 = NaN).
  """
  examples: Mapping[str, Any]
  offsets: np.ndarray
  sizes: np.ndarray
  client_ids: tuple

  @classmethod
  def of(cls, data: FederatedData) -> 'ResidentData':
    sizes = data.client_sizes
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    rows = {f: np.concatenate([a, np.zeros((1,) + a.shape[1:], a.dtype)])
            for f, a in data.concatenated().items()}
    return cls(rows, offsets, sizes, tuple(data.client_ids))

  @property
  def pad_row(self) -> int:
    """The all-zero row padded slots point at (after every client's)."""
    return int(self.offsets[-1] + self.sizes[-1])

  @property
  def nbytes(self) -> int:
    return int(sum(np.asarray(a).nbytes if isinstance(a, np.ndarray)
                   else a.nbytes for a in self.examples.values()))


def IndexedCohort(index, mask, weight, ctx) -> Cohort:  # pylint: disable=invalid-name
  """A cohort as row indices into `ResidentData.examples`: a `Cohort`
  whose one feature is `ROWS` (`[K, S, B]` int32; padding slots point at
  `ResidentData.pad_row`, all zeros, with mask 0)."""
  return Cohort({ROWS: index}, mask, weight, ctx)


def _fill_front(resident: ResidentData, ids: np.ndarray, capacity: int,
                index, mask, weight, *, seed, round_num, policy_large,
                weighting, shuffle) -> None:
  """`pack_index`'s rows without epochs or repeats: each client's first
  min(n, capacity) examples of its order (`_example_order`: the same
  per-client stream, so the same examples) at the front of its slots, in
  bulk; only the per-client permutation is a Python call."""
  n = resident.sizes[ids].astype(np.int64)
  if policy_large == 'error' and np.any(n > capacity):
    first = int(np.argmax(n > capacity))  # (pack's loop meets it first)
    _example_order(resident.client_ids[int(ids[first])], int(n[first]),
                   capacity, None, policy_large='error', policy_small='pad',
                   shuffle=False)  # (raises)
  take = np.minimum(n, capacity)
  rows = np.repeat(np.arange(len(ids)), take)  # (client slot, its position)
  cols = np.arange(take.sum()) - np.repeat(np.cumsum(take) - take, take)
  order = cols  # (unshuffled: each client's first examples)
  if shuffle:
    orders = [_client_rng(seed, round_num, int(ci)).permutation(int(m))[:t]
              for ci, m, t in zip(ids, n, take)]
    order = np.concatenate(orders) if orders else cols
  index[rows, cols] = np.repeat(resident.offsets[ids], take) + order
  mask[rows, cols] = 1.0
  weight[:] = take if weighting == 'num_examples' else (n > 0)


def pack_index(resident: ResidentData, client_indices: np.ndarray, *,
               steps: int, batch_size: int, seed: int, round_num: int,
               policy_large: str = 'subsample', policy_small: str = 'pad',
               weighting: str = 'num_examples', shuffle: bool = True,
               ctx: Mapping[str, np.ndarray] | None = None, epochs: int = 0,
               max_examples: int = 0) -> Cohort:
  """`pack`, but as row indices: the same examples in the same slots."""
  _validate(policy_large, policy_small, weighting, steps, batch_size)
  if resident.pad_row >= 2 ** 31 - 1:
    raise ValueError('ResidentData holds 2^31 or more rows; int32 row '
                     'indices cannot address them.')
  capacity = steps * batch_size
  k = len(client_indices)
  index = np.full((k, capacity), resident.pad_row, np.int32)
  mask = np.zeros((k, capacity), np.float32)
  weight = np.zeros((k,), np.float32)
  bulk = not epochs and policy_small == 'pad'  # (the common case)
  if bulk:
    _fill_front(resident, np.asarray(client_indices, np.int64), capacity,
                index, mask, weight, seed=seed, round_num=round_num,
                policy_large=policy_large, weighting=weighting,
                shuffle=shuffle)
  for slot, ci in enumerate(() if bulk else client_indices):
    ci = int(ci)
    n = int(resident.sizes[ci])
    slots, trained = _slot_examples(
        resident.client_ids[ci], n, capacity,
        _client_rng(seed, round_num, ci), batch_size=batch_size,
        policy_large=policy_large, policy_small=policy_small,
        shuffle=shuffle, epochs=epochs, max_examples=max_examples)
    real = slots >= 0
    index[slot, real] = resident.offsets[ci] + slots[real]
    mask[slot, real] = 1.0
    weight[slot] = _client_weight(trained, n, weighting)
  shape = (k, steps, batch_size)
  return IndexedCohort(index.reshape(shape), mask.reshape(shape), weight,
                       _full_ctx(client_indices, ctx))
