r"""Device profiles and availability of a simulated client population.

A `DeviceProfiles` says, per client (arrays of length N, index = client
index), what its device can do: sustained training throughput (FLOP/s),
download and upload bandwidth (bit/s), the memory a training program may use
(bytes), a device class, and when it is online (`Availability`). Together
with what a round costs one client (the FLOPs, bits and peak bytes that
`fedjax_eff.accounting` reads from the compiled device program), these give
simulated time (`timing`). Nothing here estimates a program's cost.

Stable per-client draws: every random quantity of client c derives from
(seed, tag, c) alone through a counter-based hash (SplitMix64, Steele, Lea &
Flood 2014, "Fast splittable pseudorandom number generators"; the finaliser
that seeds java.util.SplittableRandom and xoshiro), vectorised over clients.
Drawing a population of N clients and one of N + 10 gives the same first N
profiles, and a client's profile does not depend on who else is drawn.

Defaults (`DEFAULT_CLASSES`, `parametric`): four device classes, each client
log-normal around its class's medians. The numbers are rounded estimates,
not measurements; where they come from:

  throughput  what on-device *training* sustains in FP32 on the CPU
              (TFLite and MNN train there), after thermal throttling.
              AI Benchmark (Ignatov et al. 2019, "AI Benchmark: All about
              deep learning on smartphones in 2019") times CPU FP32
              inference of MobileNet-V2 (about 0.6 GFLOP a 224x224 image)
              on hundreds of phones, from tens of ms on flagships to
              hundreds of ms on low-end SoCs: of the order of 30 down to 2
              GFLOP/s of inference; training runs further from peak
              (backward pass, larger working set). A row of FedScale's
              capacity trace (Lai et al. 2022, built from AI Benchmark and
              MobiPerf; quoted in ahmedcs/REFL, core/helper/client.py)
              reads 162 ms/sample: about 4 GFLOP/s under the same 0.6
              GFLOP reference (`traces.profiles_from_fedscale`). We take
              medians of 2 / 8 / 25 GFLOP/s for low / mid / high-end phones
              and 0.5 GFLOP/s for an IoT-class board (Cortex-A53/A72,
              Raspberry-Pi-like). Rounded estimates, not fits.
  bandwidth   FLASH's network trace (Yang et al. 2021; PKU-Chengxu/FLASH,
              models/speed_distri.json: 19 devices' mean and std of down/up
              speed in KB/s, measured in the 136k-user study, where devices
              train on WiFi; models/device.py divides model bytes by 1024
              before dividing by them) has medians of 4.3 MB/s down and 3.3
              MB/s up (about 35 / 27 Mbit/s), device means from 2.4 to 17
              MB/s down. The same FedScale row (MobiPerf, WiFi) reads 5.6
              Mbit/s. Mobile speed tests (Ookla's Speedtest Global
              Index) put cellular medians at tens of Mbit/s down and about
              a third of that up. We take 10 / 30 / 60 Mbit/s down and 4 /
              15 / 25 Mbit/s up for low / mid / high, and 5 / 2 Mbit/s for
              IoT. Rounded estimates.
  memory      what one app's training program may allocate, not the RAM:
              Android caps an app's heap (`largeHeap`, typically 256 to 512
              MiB) and kills apps under memory pressure; iOS jetsam limits
              are a fraction of RAM. We take 0.5 / 1 / 2 GiB for low / mid
              / high phones and 256 MiB for IoT. Estimates.
  fractions   30 % low, 40 % mid, 20 % high, 10 % IoT: an assumption for a
              phone-dominated population with a long low-end tail. (FLASH,
              models/utils/device_util/device_util.py, maps a device model
              it cannot identify to one of its three reference phones,
              Google Nexus S / Xiaomi Redmi Note 7 Pro / Google Pixel 4,
              with weights 18820 : 16428 : 159.)
  spreads     log-normal sigmas within a class: 0.5 for throughput, 0.8 for
              bandwidths (FLASH's per-device standard deviations are 13 to
              100 % of the mean, and device means spread 7x), 0.25 for
              memory. Estimates.

Availability (`Availability`): `AlwaysAvailable`; `DiurnalAvailability`
(one daily window per client, e.g. idle + charging + WiFi at night, the
eligibility rule of Bonawitz et al. 2019, "Towards federated learning at
scale: system design", which makes participation diurnal); and
`TraceAvailability` (per-client sorted [start, end) online intervals in
seconds, repeating with a period if the trace says so: FedScale's
`client_behave_trace` and FLASH's state traces, loaded by `traces`).
Both answer `available(ids, t)` and `online_until(ids, t)`, vectorised over
clients; a client that is offline at `online_until` before it finishes
fails (`timing.offline_before_finish`).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Sequence
import zlib

import numpy as np

DAY_SECONDS = 86400.0
GIB = 2.0**30
MIB = 2.0**20


# ---------------------------------------------------------------------------
# Stable per-client random numbers.


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser of x + golden gamma (uint64 arrays, wrapping)."""
  with np.errstate(over='ignore'):
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _tag(tag: str) -> np.uint64:
  return np.uint64(zlib.crc32(tag.encode()))


def client_uniforms(seed: int, tag: str, ids, stream: int = 0) -> np.ndarray:
  """Uniforms in [0, 1), one per client, a function of (seed, tag, id, stream).

  Args:
    seed: a non-negative integer below 2**64.
    tag: names what is drawn ('flops', 'class', ...), so quantities of one
      client are independent.
    ids: client ids, non-negative integers (any shape).
    stream: a further counter for several draws of one quantity.

  Returns:
    float64 array of the shape of `ids`; element i depends only on
    (seed, tag, ids[i], stream).
  """
  if not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
    raise ValueError(f'seed must be an integer in [0, 2**64), got {seed!r}')
  ids = np.asarray(ids)
  if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0):
    raise ValueError('client ids must be non-negative integers')
  h = _splitmix64(np.full(ids.shape, int(seed), np.uint64))
  h = _splitmix64(h ^ _tag(tag))
  h = _splitmix64(h ^ ids.astype(np.uint64))
  h = _splitmix64(h ^ np.uint64(stream))
  return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def client_normals(seed: int, tag: str, ids, stream: int = 0) -> np.ndarray:
  """Standard normals per client (Box-Muller on two `client_uniforms`)."""
  u1 = 1.0 - client_uniforms(seed, tag, ids, 2 * stream)  # (0, 1]
  u2 = client_uniforms(seed, tag, ids, 2 * stream + 1)
  return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def as_client_ids(ids, n: int) -> np.ndarray:
  """`ids` (None = all n clients) as an int64 array checked against [0, n)."""
  if ids is None:
    return np.arange(n)
  ids = np.asarray(ids)
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f'client ids must be integers, got dtype {ids.dtype}')
  ids = ids.astype(np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= n):
    raise ValueError(f'client ids must lie in [0, {n}), got '
                     f'[{ids.min()}, {ids.max()}]')
  return ids


def _scalar_out(out: np.ndarray, ids, t):
  """A Python-style scalar where both `ids` and `t` were scalars."""
  return out[()] if np.ndim(ids) == 0 and np.ndim(t) == 0 else out


# ---------------------------------------------------------------------------
# Availability.


class Availability(abc.ABC):
  """When clients can train: online or not at simulated time t (seconds)."""

  @property
  @abc.abstractmethod
  def num_clients(self) -> int:
    """N, the number of clients described."""

  @abc.abstractmethod
  def available(self, ids, t) -> np.ndarray:
    """Bool array: is client ids[i] online at time t (t broadcasts with ids).

    `ids=None` means all clients. Scalar ids and t give a numpy bool."""

  @abc.abstractmethod
  def online_until(self, ids, t) -> np.ndarray:
    """End of the online interval containing t (absolute seconds); t where
    the client is offline at t; inf where it never goes offline."""

  @abc.abstractmethod
  def subset(self, ids) -> 'Availability':
    """The availability of clients `ids`, renumbered 0..len(ids)-1."""


@dataclasses.dataclass(frozen=True)
class AlwaysAvailable(Availability):
  """Every client is online at every time.

  `n=None` fits any population: `DeviceProfiles` binds it to its N (until
  then `available(None, t)` has no N to answer for)."""
  n: int | None = None

  @property
  def num_clients(self) -> int | None:
    return self.n

  def _ids(self, ids):
    if self.n is None:
      if ids is None:
        raise ValueError('AlwaysAvailable() without n needs explicit ids')
      return as_client_ids(ids, np.iinfo(np.int64).max)
    return as_client_ids(ids, self.n)

  def available(self, ids, t) -> np.ndarray:
    ids_ = self._ids(ids)
    out = np.ones(np.broadcast_shapes(ids_.shape, np.shape(t)), bool)
    return _scalar_out(out, ids, t)

  def online_until(self, ids, t) -> np.ndarray:
    ids_ = self._ids(ids)
    out = np.full(np.broadcast_shapes(ids_.shape, np.shape(t)), np.inf)
    return _scalar_out(out, ids, t)

  def subset(self, ids) -> 'AlwaysAvailable':
    return AlwaysAvailable(len(self._ids(ids)))


@dataclasses.dataclass(frozen=True, eq=False)
class DiurnalAvailability(Availability):
  r"""Client i is online in [start_i, start_i + length_i) every period.

  Times are seconds on the simulation clock; t = 0 is midnight of the
  reference time zone. A window that crosses midnight wraps. Client i is
  online at t iff ((t - start_i) mod period) < length_i; a window of one
  whole period or more is always online.
  """
  start_seconds: np.ndarray  # [N], in [0, period)
  length_seconds: np.ndarray  # [N], >= 0
  period: float = DAY_SECONDS

  def __post_init__(self):
    start = np.asarray(self.start_seconds, np.float64)
    length = np.asarray(self.length_seconds, np.float64)
    if start.ndim != 1 or start.shape != length.shape:
      raise ValueError('diurnal start_seconds and length_seconds must be 1-d '
                       f'of one length, got {start.shape} and {length.shape}')
    if not self.period > 0 or not np.isfinite(self.period):
      raise ValueError(f'diurnal period must be positive, got {self.period}')
    if np.any(length < 0) or not np.all(np.isfinite(start)):
      raise ValueError('diurnal windows need finite starts and lengths >= 0')
    object.__setattr__(self, 'start_seconds', np.mod(start, self.period))
    object.__setattr__(self, 'length_seconds', length)

  @property
  def num_clients(self) -> int:
    return len(self.start_seconds)

  def _phase(self, ids, t):
    ids = as_client_ids(ids, self.num_clients)
    phase = np.mod(np.asarray(t, np.float64) - self.start_seconds[ids],
                   self.period)
    return ids, phase, self.length_seconds[ids]

  def available(self, ids, t) -> np.ndarray:
    ids, phase, length = self._phase(ids, t)
    return _scalar_out((phase < length) | (length >= self.period), ids, t)

  def online_until(self, ids, t) -> np.ndarray:
    ids, phase, length = self._phase(ids, t)
    t = np.asarray(t, np.float64)
    out = np.where(phase < length, t + (length - phase), t)
    out = np.where(length >= self.period, np.inf, out)
    return _scalar_out(out, ids, t)

  def subset(self, ids) -> 'DiurnalAvailability':
    ids = as_client_ids(ids, self.num_clients)
    return DiurnalAvailability(self.start_seconds[ids],
                               self.length_seconds[ids], self.period)


def diurnal(num_clients: int, seed: int, *, start_hour_mean: float = 23.0,
            start_hour_std: float = 1.5, hours_median: float = 6.5,
            hours_sigma: float = 0.35, first_id: int = 0
            ) -> DiurnalAvailability:
  r"""A parametric diurnal population: one nightly window per client.

  Client c goes online at start_hour_mean + start_hour_std * z1 (hours, mod
  24) and stays hours_median * exp(hours_sigma * z2) hours (at most 24), z1,
  z2 standard normals from (seed, c). The default models the rule devices
  follow in production FL (Bonawitz et al. 2019: idle, charging and on an
  unmetered network), which holds mostly overnight: windows start around
  23:00 and last about 6.5 h (median), spread over +-1.5 h and a factor
  e^0.35. These are estimates, not fitted to a trace; use a trace
  (`traces.load_fedscale_behaviour`, `traces.load_flash_availability`) for
  measured behaviour.

  Args:
    num_clients: N.
    seed: the population's seed.
    start_hour_mean, start_hour_std: window start (hours after midnight).
    hours_median, hours_sigma: window length, log-normal.
    first_id: id of the first client (clients first_id .. first_id + N - 1).

  Returns:
    `DiurnalAvailability` with period 24 h.
  """
  if hours_median <= 0 or hours_sigma < 0 or start_hour_std < 0:
    raise ValueError('diurnal needs hours_median > 0 and spreads >= 0')
  ids = np.arange(first_id, first_id + num_clients)
  start = start_hour_mean + start_hour_std * client_normals(
      seed, 'diurnal_start', ids)
  hours = hours_median * np.exp(hours_sigma * client_normals(
      seed, 'diurnal_hours', ids))
  return DiurnalAvailability(
      np.mod(start * 3600.0, DAY_SECONDS),
      np.minimum(hours, 24.0) * 3600.0, DAY_SECONDS)


@dataclasses.dataclass(frozen=True, eq=False)
class TraceAvailability(Availability):
  r"""Per-client sorted, disjoint [start, end) online intervals, in seconds.

  Client i's intervals are `starts[offsets[i]:offsets[i+1]]`,
  `ends[...]` (a ragged array, as in CSR). If `period[i]` is finite, its
  trace repeats: time t maps to trace time

      tau = origin_i + ((t - origin_i) mod period_i),

  and the intervals lie in [origin_i, origin_i + period_i] (FedScale:
  origin 0, period `finish_time`; FLASH: origin = the trace's first
  timestamp, period = its length). With an infinite period the trace is
  played once: before its first and after its last interval the client is
  offline. Build with `from_intervals`, which sorts, merges overlapping or
  touching intervals and drops empty ones.
  """
  starts: np.ndarray  # [M] float64
  ends: np.ndarray  # [M] float64
  offsets: np.ndarray  # [N + 1] int64
  origin: np.ndarray  # [N] float64
  period: np.ndarray  # [N] float64, inf = no repetition
  names: tuple = ()  # optional: the trace row each client came from

  def __post_init__(self):
    starts = np.asarray(self.starts, np.float64)
    ends = np.asarray(self.ends, np.float64)
    offsets = np.asarray(self.offsets, np.int64)
    origin = np.asarray(self.origin, np.float64)
    period = np.asarray(self.period, np.float64)
    n = len(offsets) - 1
    if (n < 0 or starts.shape != ends.shape or starts.ndim != 1
        or origin.shape != (n,) or period.shape != (n,)):
      raise ValueError('trace availability arrays have inconsistent shapes')
    if offsets[0] != 0 or offsets[-1] != len(starts) or np.any(
        np.diff(offsets) < 0):
      raise ValueError('trace availability offsets must rise from 0 to M')
    if np.any(~(period > 0)):
      raise ValueError('trace periods must be positive (inf: no repetition)')
    if not (np.all(np.isfinite(starts)) and np.all(np.isfinite(ends))
            and np.all(np.isfinite(origin))):
      raise ValueError('trace intervals and origins must be finite')
    if np.any(ends <= starts):
      raise ValueError('trace intervals need start < end')
    same = np.repeat(np.arange(n), np.diff(offsets))
    if len(starts) > 1:
      inner = same[1:] == same[:-1]
      if np.any(starts[1:][inner] <= ends[:-1][inner]):
        raise ValueError('trace intervals of a client must be sorted and '
                         'disjoint (use TraceAvailability.from_intervals)')
    if len(starts):
      lo = origin[same]
      if np.any(np.isfinite(period[same])
                & ((starts < lo) | (ends > lo + period[same]))):
        raise ValueError('a repeating trace interval lies outside [origin, '
                         'origin + period]')
    for name, value in (('starts', starts), ('ends', ends),
                        ('offsets', offsets), ('origin', origin),
                        ('period', period)):
      object.__setattr__(self, name, value)
    object.__setattr__(self, 'names', tuple(self.names))

  @classmethod
  def from_intervals(cls, intervals: Sequence[Sequence[Sequence[float]]],
                     period=math.inf, origin=0.0, names=()
                     ) -> 'TraceAvailability':
    """From per-client lists of (start, end) pairs.

    Args:
      intervals: intervals[i] = [(start, end), ...] for client i, in
        seconds, any order; overlapping or touching intervals merge, empty
        ones (end <= start) are dropped. With a finite period they are
        clipped to [origin, origin + period].
      period: scalar or per-client; inf = no repetition.
      origin: scalar or per-client start of the repeating trace.
      names: optional per-client labels (trace row keys).
    """
    n = len(intervals)
    period = np.broadcast_to(np.asarray(period, np.float64), (n,)).copy()
    origin = np.broadcast_to(np.asarray(origin, np.float64), (n,)).copy()
    starts, ends, offsets = [], [], [0]
    for i, rows in enumerate(intervals):
      rows = np.asarray(rows, np.float64).reshape(-1, 2)
      if np.isfinite(period[i]):
        rows = np.clip(rows, origin[i], origin[i] + period[i])
      rows = rows[rows[:, 1] > rows[:, 0]]
      rows = rows[np.argsort(rows[:, 0], kind='stable')]
      merged = []
      for s, e in rows:
        if merged and s <= merged[-1][1]:
          merged[-1][1] = max(merged[-1][1], e)
        else:
          merged.append([s, e])
      starts += [m[0] for m in merged]
      ends += [m[1] for m in merged]
      offsets.append(offsets[-1] + len(merged))
    return cls(np.asarray(starts, np.float64), np.asarray(ends, np.float64),
               np.asarray(offsets, np.int64), origin, period, names)

  @property
  def num_clients(self) -> int:
    return len(self.offsets) - 1

  def intervals(self, i: int) -> np.ndarray:
    """[k, 2] array of client i's (start, end) intervals in trace time."""
    lo, hi = self.offsets[i], self.offsets[i + 1]
    return np.stack([self.starts[lo:hi], self.ends[lo:hi]], axis=-1)

  def _locate(self, ids, t):
    """Per query: trace time tau, index j of the last interval starting at or
    before tau (lo - 1 where none), the client's first index lo."""
    ids = as_client_ids(ids, self.num_clients)
    t = np.asarray(t, np.float64)
    ids, t = np.broadcast_arrays(ids, t)
    origin, period = self.origin[ids], self.period[ids]
    finite = np.isfinite(period)
    safe = np.where(finite, period, 1.0)
    tau = np.where(finite, origin + np.mod(t - origin, safe), t)
    lo = self.offsets[ids]
    first = lo.copy()
    hi = self.offsets[ids + 1]
    # Vectorised binary search inside each client's segment: the first index
    # in [lo, hi) whose start exceeds tau.
    if len(self.starts):
      while True:
        live = lo < hi
        if not np.any(live):
          break
        mid = (lo + hi) // 2
        go = live & (self.starts[np.minimum(mid, len(self.starts) - 1)] <= tau)
        lo = np.where(go, mid + 1, lo)
        hi = np.where(live & ~go, mid, hi)
    return ids, t, tau, lo - 1, first

  def available(self, ids, t) -> np.ndarray:
    ids_, t_, tau, j, first = self._locate(ids, t)
    has = j >= first
    jj = np.clip(j, 0, max(len(self.ends) - 1, 0))
    out = has & (tau < (self.ends[jj] if len(self.ends) else tau))
    return _scalar_out(out, ids, t)

  def online_until(self, ids, t) -> np.ndarray:
    ids_, t_, tau, j, first = self._locate(ids, t)
    if not len(self.ends):
      return _scalar_out(t_.copy(), ids, t)
    jj = np.clip(j, 0, len(self.ends) - 1)
    online = (j >= first) & (tau < self.ends[jj])
    until = t_ + (self.ends[jj] - tau)
    # Across the period's end: an interval that reaches origin + period
    # continues into the next period's first interval if that starts at the
    # origin; if both are one interval, it covers the whole period.
    origin, period = self.origin[ids_], self.period[ids_]
    last = self.offsets[ids_ + 1] - 1
    fj = np.clip(first, 0, len(self.ends) - 1)
    wraps = (online & np.isfinite(period)
             & (self.ends[jj] >= origin + period)
             & (self.starts[fj] <= origin) & (last >= first))
    whole = wraps & (jj == fj)
    until = np.where(wraps, until + (self.ends[fj] - origin), until)
    until = np.where(whole, np.inf, until)
    return _scalar_out(np.where(online, until, t_), ids, t)

  def subset(self, ids) -> 'TraceAvailability':
    ids = as_client_ids(ids, self.num_clients)
    return TraceAvailability.from_intervals(
        [self.intervals(i) for i in ids], self.period[ids], self.origin[ids],
        tuple(self.names[i] for i in ids) if self.names else ())


# ---------------------------------------------------------------------------
# Profiles.


@dataclasses.dataclass(frozen=True)
class DeviceClass:
  """Medians of one device class (per-client values are log-normal around
  them, `parametric`)."""
  name: str
  fraction: float  # share of the population
  flops_per_second: float  # sustained training throughput, FLOP/s
  download_bits_per_second: float
  upload_bits_per_second: float
  memory_bytes: float  # what a training program may use


# Sources and caveats: the module docstring. Rounded estimates.
DEFAULT_CLASSES = (
    DeviceClass('low_end_phone', 0.30, 2e9, 10e6, 4e6, 0.5 * GIB),
    DeviceClass('mid_range_phone', 0.40, 8e9, 30e6, 15e6, 1.0 * GIB),
    DeviceClass('high_end_phone', 0.20, 25e9, 60e6, 25e6, 2.0 * GIB),
    DeviceClass('iot_board', 0.10, 0.5e9, 5e6, 2e6, 256 * MIB),
)


@dataclasses.dataclass(frozen=True, eq=False)
class DeviceProfiles:
  """Per client (arrays of length N, index = client index): what its device
  can do.

  Attributes:
    flops_per_second: sustained training throughput, FLOP/s, > 0.
    download_bits_per_second: > 0.
    upload_bits_per_second: > 0.
    memory_bytes: what a training program may use, >= 0.
    device_class: int index into class_names.
    class_names: names of the device classes.
    availability: when each client can train (`Availability` of N clients).
  """
  flops_per_second: np.ndarray
  download_bits_per_second: np.ndarray
  upload_bits_per_second: np.ndarray
  memory_bytes: np.ndarray
  device_class: np.ndarray
  class_names: tuple[str, ...]
  availability: Availability

  def __post_init__(self):
    fields = {}
    for name in ('flops_per_second', 'download_bits_per_second',
                 'upload_bits_per_second', 'memory_bytes'):
      value = np.asarray(getattr(self, name), np.float64)
      if value.ndim != 1:
        raise ValueError(f'{name} must be a 1-d array, got shape '
                         f'{value.shape}')
      if np.any(np.isnan(value)):
        raise ValueError(f'{name} has NaN')
      fields[name] = value
    n = len(fields['flops_per_second'])
    for name, value in fields.items():
      if len(value) != n:
        raise ValueError(f'{name} has {len(value)} clients, '
                         f'flops_per_second has {n}')
    for name in ('flops_per_second', 'download_bits_per_second',
                 'upload_bits_per_second'):
      if np.any(fields[name] <= 0):
        raise ValueError(f'{name} must be positive, got min '
                         f'{fields[name].min()}')
    if np.any(fields['memory_bytes'] < 0):
      raise ValueError('memory_bytes must be >= 0')
    device_class = np.asarray(self.device_class)
    if device_class.shape != (n,) or (
        n and not np.issubdtype(device_class.dtype, np.integer)):
      raise ValueError(f'device_class must be {n} integers')
    names = tuple(self.class_names)
    if n and (device_class.min() < 0 or device_class.max() >= len(names)):
      raise ValueError(f'device_class must index class_names ({len(names)})')
    if not isinstance(self.availability, Availability):
      raise ValueError('availability must be an Availability, got '
                       f'{type(self.availability).__name__}')
    if (isinstance(self.availability, AlwaysAvailable)
        and self.availability.n is None):
      object.__setattr__(self, 'availability', AlwaysAvailable(n))
    if self.availability.num_clients != n:
      raise ValueError(f'availability describes '
                       f'{self.availability.num_clients} clients, profiles '
                       f'{n}')
    for name, value in fields.items():
      object.__setattr__(self, name, value)
    object.__setattr__(self, 'device_class', device_class.astype(np.int64))
    object.__setattr__(self, 'class_names', names)

  def __len__(self) -> int:
    return len(self.flops_per_second)

  def subset(self, ids) -> 'DeviceProfiles':
    """The profiles of clients `ids`, renumbered 0..len(ids)-1."""
    ids = as_client_ids(ids, len(self))
    return DeviceProfiles(
        self.flops_per_second[ids], self.download_bits_per_second[ids],
        self.upload_bits_per_second[ids], self.memory_bytes[ids],
        self.device_class[ids], self.class_names,
        self.availability.subset(ids))


def _check_classes(classes: Sequence[DeviceClass]) -> np.ndarray:
  if not classes:
    raise ValueError('parametric needs at least one device class')
  fractions = np.asarray([c.fraction for c in classes], np.float64)
  if np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0,
                                              atol=1e-6):
    raise ValueError(f'class fractions must be >= 0 and sum to 1, got '
                     f'{fractions.tolist()}')
  for c in classes:
    if min(c.flops_per_second, c.download_bits_per_second,
           c.upload_bits_per_second) <= 0 or c.memory_bytes < 0:
      raise ValueError(f'device class {c.name!r} needs positive throughput '
                       'and bandwidths and memory >= 0')
  return np.cumsum(fractions / fractions.sum())


def parametric(num_clients: int, seed: int,
               classes: Sequence[DeviceClass] = DEFAULT_CLASSES, *,
               flops_sigma: float = 0.5, bandwidth_sigma: float = 0.8,
               memory_sigma: float = 0.25, availability='always',
               first_id: int = 0) -> DeviceProfiles:
  r"""A parametric population: device classes, log-normal within a class.

  Client c (c = first_id .. first_id + N - 1) is of class k with
  probability classes[k].fraction, and

      flops_per_second = median_k * exp(flops_sigma * z1)
      download / upload = median_k * exp(bandwidth_sigma * z2 / z3)
      memory_bytes = median_k * exp(memory_sigma * z4)

  with z1..z4 independent standard normals; everything derives from
  (seed, c) alone (`client_uniforms`), so the first N clients of a larger
  population are the same. Defaults and their sources: module docstring.

  Args:
    num_clients: N.
    seed: the population's seed (non-negative integer).
    classes: the device classes (fractions sum to 1).
    flops_sigma, bandwidth_sigma, memory_sigma: log-normal spreads.
    availability: 'always' (`AlwaysAvailable`), 'diurnal' (`diurnal` with
      this seed), or an `Availability` of N clients (`AlwaysAvailable()`
      binds to N).
    first_id: the first client's id.

  Returns:
    `DeviceProfiles` of N clients.
  """
  if num_clients < 0:
    raise ValueError(f'num_clients must be >= 0, got {num_clients}')
  if min(flops_sigma, bandwidth_sigma, memory_sigma) < 0:
    raise ValueError('log-normal spreads must be >= 0')
  cumulative = _check_classes(classes)
  ids = np.arange(first_id, first_id + num_clients)
  u = client_uniforms(seed, 'device_class', ids)
  k = np.minimum(np.searchsorted(cumulative, u, side='right'),
                 len(classes) - 1)
  med = lambda attr: np.asarray([getattr(c, attr) for c in classes])[k]

  def draw(attr, tag, sigma):
    return med(attr) * np.exp(sigma * client_normals(seed, tag, ids))

  return DeviceProfiles(
      flops_per_second=draw('flops_per_second', 'flops', flops_sigma),
      download_bits_per_second=draw('download_bits_per_second', 'download',
                                    bandwidth_sigma),
      upload_bits_per_second=draw('upload_bits_per_second', 'upload',
                                  bandwidth_sigma),
      memory_bytes=draw('memory_bytes', 'memory', memory_sigma),
      device_class=k.astype(np.int64),
      class_names=tuple(c.name for c in classes),
      availability=_availability(availability, num_clients, seed, first_id))


def _availability(availability, num_clients: int, seed: int,
                  first_id: int) -> Availability:
  if isinstance(availability, Availability):
    return availability
  if availability == 'always':
    return AlwaysAvailable(num_clients)
  if availability == 'diurnal':
    return diurnal(num_clients, seed, first_id=first_id)
  raise ValueError(f"availability must be 'always', 'diurnal' or an "
                   f'Availability, got {availability!r}')


def uniform(num_clients: int, availability='always', *,
            device: DeviceClass = DEFAULT_CLASSES[1], seed: int = 0,
            first_id: int = 0) -> DeviceProfiles:
  """N identical devices: the medians of `device` (by default the default
  mid-range phone), one class. `availability` as in `parametric` (`seed`
  and `first_id` only serve 'diurnal')."""
  if num_clients < 0:
    raise ValueError(f'num_clients must be >= 0, got {num_clients}')
  full = lambda v: np.full(num_clients, float(v))
  return DeviceProfiles(
      flops_per_second=full(device.flops_per_second),
      download_bits_per_second=full(device.download_bits_per_second),
      upload_bits_per_second=full(device.upload_bits_per_second),
      memory_bytes=full(device.memory_bytes),
      device_class=np.zeros(num_clients, np.int64),
      class_names=(device.name,),
      availability=_availability(availability, num_clients, seed, first_id))
