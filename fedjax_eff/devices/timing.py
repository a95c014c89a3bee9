r"""Simulated time: what a round costs each client, in seconds, and the round.

The cost of one client's round (bits down, FLOPs, bits up, peak bytes) is
measured, not estimated: `fedjax_eff.accounting` compiles the device program
of each client's tier or variant and reads XLA's cost and memory analyses.
This module only divides those costs by each device's speeds
(`profiles.DeviceProfiles`) and applies the synchronous round's rules. Pure
NumPy: no JAX.

Per client i (Lai et al. 2022, FedScale's `get_completion_time`, without
its fixed 3x inference-to-training factor: our FLOPs are training FLOPs):

    seconds_i = (download_bits_i / download_bps_i
                 + flops_i / flops_per_second_i
                 + upload_bits_i / upload_bps_i) * exp(jitter * z_i),

z_i ~ N(0, 1) from the caller's generator (seeded from (seed, round)), so
the factor is log-normal with median 1. The phases run one after another on
the device (download, train, upload), as in FedScale and FLASH.

A synchronous round (`plan_round`) follows FedAvg with over-selection
(Bonawitz et al. 2019, "Towards federated learning at scale: system
design"): the server samples K(1 + o) clients, aggregates the first K to
report among those that neither failed nor missed the deadline, and drops
the rest.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from fedjax_eff.devices import profiles as profiles_lib


def _per_client(name: str, value, n: int) -> np.ndarray:
  value = np.asarray(value, np.float64)
  if value.ndim > 1 or (value.ndim == 1 and len(value) != n):
    raise ValueError(f'{name} must be a scalar or {n} values, got shape '
                     f'{value.shape}')
  if np.any(np.isnan(value)) or np.any(value < 0):
    raise ValueError(f'{name} must be >= 0 (no NaN)')
  return np.broadcast_to(value, (n,))


def client_seconds(profiles: profiles_lib.DeviceProfiles, ids=None, *,
                   download_bits, upload_bits, flops, jitter: float = 0.0,
                   rng: np.random.Generator | None = None) -> np.ndarray:
  """Each client's time to download, train and upload, in seconds.

  Args:
    profiles: the population.
    ids: client indices into `profiles` ([K] ints; repeats allowed); None =
      all clients.
    download_bits, upload_bits, flops: what the round costs each client:
      scalars, or [K] arrays (one per client, from the compiled device
      program of its tier or variant).
    jitter: sigma of the log-normal factor exp(N(0, jitter^2)); 0 = exact.
    rng: `np.random.Generator` for the jitter (the caller seeds it from
      (seed, round)); required when jitter > 0.

  Returns:
    [K] float64 seconds.
  """
  ids = profiles_lib.as_client_ids(ids, len(profiles))
  n = len(ids)
  down = _per_client('download_bits', download_bits, n)
  up = _per_client('upload_bits', upload_bits, n)
  fl = _per_client('flops', flops, n)
  seconds = (down / profiles.download_bits_per_second[ids]
             + fl / profiles.flops_per_second[ids]
             + up / profiles.upload_bits_per_second[ids])
  if jitter < 0 or not np.isfinite(jitter):
    raise ValueError(f'jitter must be >= 0, got {jitter}')
  if jitter > 0:
    if rng is None:
      raise ValueError('jitter > 0 needs rng (a np.random.Generator seeded '
                       'from (seed, round))')
    seconds = seconds * np.exp(jitter * rng.standard_normal(n))
  return seconds


def fits_in_memory(profiles: profiles_lib.DeviceProfiles, ids,
                   peak_bytes) -> np.ndarray:
  """[K] bool: the program's peak bytes (scalar or [K]) fit each client's
  memory (peak <= memory_bytes). ids None = all clients."""
  ids = profiles_lib.as_client_ids(ids, len(profiles))
  peak = _per_client('peak_bytes', peak_bytes, len(ids))
  return peak <= profiles.memory_bytes[ids]


def tier_by_memory(profiles: profiles_lib.DeviceProfiles,
                   tier_peak_bytes: Sequence[float], ids=None) -> np.ndarray:
  """Each client's largest tier whose program fits its memory.

  Args:
    profiles: the population.
    tier_peak_bytes: peak training bytes of each tier's device program,
      ordered from the smallest program to the largest (non-decreasing).
    ids: client indices; None = all clients.

  Returns:
    [K] int64: index into `tier_peak_bytes` of the largest tier with
    peak <= memory_bytes, or -1 if none fits.
  """
  peaks = np.asarray(tier_peak_bytes, np.float64)
  if peaks.ndim != 1 or not len(peaks):
    raise ValueError('tier_peak_bytes must be a non-empty 1-d sequence')
  if np.any(np.isnan(peaks)) or np.any(np.diff(peaks) < 0):
    raise ValueError('tier_peak_bytes must be ordered from the smallest '
                     f'program to the largest, got {peaks.tolist()}')
  ids = profiles_lib.as_client_ids(ids, len(profiles))
  return (np.searchsorted(peaks, profiles.memory_bytes[ids], side='right')
          - 1).astype(np.int64)


def offline_before_finish(availability: profiles_lib.Availability, ids,
                          start: float, seconds) -> np.ndarray:
  """[K] bool: client ids[i], starting at `start`, is offline at the start or
  goes offline before start + seconds[i] (it fails: a device stops training
  when it leaves its online window, Bonawitz et al. 2019)."""
  seconds = np.asarray(seconds, np.float64)
  until = availability.online_until(ids, start)
  online = availability.available(ids, start)
  return ~online | (start + seconds > until)


def draw_failures(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
  """[n] bool: each client fails mid-round independently with probability p
  (the caller seeds `rng`, e.g. from (seed, round))."""
  if not 0.0 <= p <= 1.0:
    raise ValueError(f'failure probability must lie in [0, 1], got {p}')
  if n < 0:
    raise ValueError(f'n must be >= 0, got {n}')
  return rng.random(n) < p


@dataclasses.dataclass
class RoundPlan:
  """What happens to the clients sampled for one synchronous round.

  Attributes:
    ids: [K'] the clients sampled (over-selected).
    seconds: [K'] each one's time to finish; inf where it failed.
    aggregated: [K'] bool: the clients the server aggregates.
    late: [K'] bool: finished after the deadline (not failed).
    failed: [K'] bool: failed mid-round (dropped out, or went offline
      before finishing).
    round_seconds: the round's duration.
  """
  ids: np.ndarray
  seconds: np.ndarray
  aggregated: np.ndarray
  late: np.ndarray
  failed: np.ndarray
  round_seconds: float

  @property
  def num_aggregated(self) -> int:
    return int(self.aggregated.sum())


def plan_round(seconds, *, target: int, deadline: float = 0.0, failed=None,
               ids=None) -> RoundPlan:
  r"""Synchronous FedAvg with over-selection and an optional deadline.

  The caller samples K' = K(1 + o) clients and gives each one's time to
  finish (`client_seconds`); `failed` marks those that drop out or go
  offline before finishing (`draw_failures`, `offline_before_finish`);
  an infinite time also counts as failed.

  * The server aggregates the first `target` (K) clients to finish among
    those not failed and (with a deadline) finished by it: ties by position.
    A client finishing exactly at the deadline is in time.
  * Late: not failed, finished after the deadline (deadline > 0).
  * Duration: if K clients were aggregated, the K-th one's finishing time
    (the server closes the round then; the rest are dropped). Otherwise,
    with a deadline, the deadline (the server waits for it, even if nobody
    reports); without one, the last aggregated client's finishing time. If
    nobody is aggregated and there is no deadline (everyone failed), the
    round lasts as long as the longest finite time given for a failed
    client (callers may pass the moment each failure happened; the server
    learns of it then), else 0.

  Args:
    seconds: [K'] times to finish.
    target: K >= 1, the clients the server wants to aggregate.
    deadline: seconds; 0 = none.
    failed: [K'] bool, or None (none failed).
    ids: [K'] the sampled clients' ids (default 0..K'-1), carried along.

  Returns:
    `RoundPlan`.
  """
  seconds = np.asarray(seconds, np.float64)
  if seconds.ndim != 1:
    raise ValueError(f'seconds must be 1-d, got shape {seconds.shape}')
  n = len(seconds)
  if np.any(np.isnan(seconds)) or np.any(seconds < 0):
    raise ValueError('seconds must be >= 0 (no NaN)')
  if target < 1:
    raise ValueError(f'target must be >= 1, got {target}')
  if deadline < 0 or not np.isfinite(deadline):
    raise ValueError(f'deadline must be >= 0 (0 = none), got {deadline}')
  if failed is None:
    failed = np.zeros(n, bool)
  failed = np.asarray(failed, bool)
  if failed.shape != (n,):
    raise ValueError(f'failed must be {n} bools, got shape {failed.shape}')
  ids = np.arange(n) if ids is None else np.asarray(ids)
  if ids.shape != (n,):
    raise ValueError(f'ids must be {n} values, got shape {ids.shape}')
  failed = failed | ~np.isfinite(seconds)
  late = ~failed & (seconds > deadline) if deadline > 0 else np.zeros(n, bool)
  ok = ~failed & ~late
  order = np.flatnonzero(ok)[np.argsort(seconds[ok], kind='stable')]
  chosen = order[:target]
  aggregated = np.zeros(n, bool)
  aggregated[chosen] = True
  if len(chosen) == target:
    round_seconds = float(seconds[chosen[-1]])
  elif deadline > 0:
    round_seconds = float(deadline)
  elif len(chosen):
    round_seconds = float(seconds[chosen[-1]])
  else:
    known = seconds[failed & np.isfinite(seconds)]
    round_seconds = float(known.max()) if len(known) else 0.0
  return RoundPlan(ids=ids, seconds=np.where(failed, np.inf, seconds),
                   aggregated=aggregated, late=late, failed=failed,
                   round_seconds=round_seconds)
