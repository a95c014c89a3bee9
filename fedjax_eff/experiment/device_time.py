"""Synchronous rounds on simulated devices: who is online, who finishes,
how long a round lasts (`config.devices`; issue 20).

Round r starts at simulated time t_r (t_0 = 0). Of the training clients
online at t_r (`devices.Availability`) whose memory holds their tier's
program, the server samples ceil(K (1 + o)) (over-selection o; Bonawitz et
al. 2019, "Towards federated learning at scale"), seeded by (seed, r).
Client i then takes

  T_i = (down_i / B↓_i + F_i (s_i / S) / R_i + up_i / B↑_i) · exp(N(0, j²))

seconds: its tier's bits down and up and FLOPs per round, read from the
compiled device program of S local steps (`Experiment.program_cost`), the
FLOPs scaled to the s_i steps the client really runs (`client.epochs`, or
fewer than S B examples: `data.cohort.local_steps_of`, as the per-round
`device_flops_per_round` metric does), over its profile's bandwidths and
throughput, with log-normal jitter j (`devices.timing`).
It fails with probability p, or when it goes offline before T_i has
passed. The server aggregates the first K clients to finish (those within
the deadline D, if set); the round lasts until the last of them finishes,
or D if fewer than K made it (`devices.timing.plan_round`); nobody online
costs a wait of D (60 s without a deadline). t_{r+1} = t_r + the round's
duration.

The cohort the round trains is the aggregated clients, then the rest of
the slots absent (weight 0, no example: not computed, not aggregated): a
late or failed client's work is lost on a real device, and not simulated
here. Metrics per round: `sim_round_seconds`, `sim_hours` (the clock at
the round's end), `num_available`, `num_selected`, `num_late`,
`num_failed`. The clock is in the checkpoint: a resumed run continues it.

With `devices.tiers_by_memory` each client's tier is the largest whose
compiled program's peak memory fits its device (tiers ordered from the
smallest program up, e.g. last_n's n or federated dropout's keep ratios);
a client whose device holds none is never sampled.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import numpy as np

from fedjax_eff.devices import profiles as profiles_lib
from fedjax_eff.devices import timing
from fedjax_eff.devices import traces

# How long a round waits when no client is online (without a deadline).
IDLE_SECONDS = 60.0


def enabled(config) -> bool:
  return config.devices.get('profiles', 'none') != 'none'


def make_profiles(config, num_clients: int) -> profiles_lib.DeviceProfiles:
  """`config.devices.profiles`: 'parametric' (documented default classes),
  'uniform' (every device the same: the median of the default classes'
  middle class) or 'fedscale' (`devices.trace_path`); availability from
  `devices.availability`: 'always', 'diurnal', 'fedscale' or 'flash'
  (`devices.availability_path`)."""
  d = config.devices
  availability = make_availability(config, num_clients)
  if d.profiles == 'parametric':
    return profiles_lib.parametric(num_clients, config.seed,
                                   availability=availability)
  if d.profiles == 'uniform':
    return profiles_lib.uniform(num_clients, availability=availability)
  if d.profiles == 'fedscale':
    return traces.profiles_from_fedscale(d.trace_path, num_clients,
                                         config.seed,
                                         availability=availability)
  raise ValueError(f"config.devices.profiles={d.profiles!r} is not one of "
                   "'none', 'parametric', 'uniform', 'fedscale'.")


def make_availability(config, num_clients: int):
  d = config.devices
  if d.availability == 'always':
    return profiles_lib.AlwaysAvailable()
  if d.availability == 'diurnal':
    return profiles_lib.diurnal(num_clients, config.seed)
  if d.availability == 'fedscale':
    return traces.load_fedscale_behaviour(d.availability_path, num_clients,
                                          config.seed)
  if d.availability == 'flash':
    return traces.load_flash_availability(d.availability_path, num_clients,
                                          config.seed)
  raise ValueError(f"config.devices.availability={d.availability!r} is not "
                   "one of 'always', 'diurnal', 'fedscale', 'flash'.")


class RoundSim(NamedTuple):
  """One synchronous round in simulated time."""
  ids: np.ndarray     # [slots] clients: the aggregated first, then filler
  aggregated: int     # how many of `ids` the server aggregates
  record: dict        # the round's sim_* and num_* metrics


class DeviceTime:
  """The clock and the participation of synchronous rounds."""

  def __init__(self, config, profiles: profiles_lib.DeviceProfiles,
               cost: Callable[[int, int], Any], tier_of: np.ndarray,
               eligible: np.ndarray, step_share: np.ndarray | None = None):
    """`step_share`: `[N]` each client's local steps over S (its share of
    the S-step program's FLOPs); None: every client runs S."""
    d = config.devices
    self.config, self.profiles, self.cost = config, profiles, cost
    self.tier_of, self.eligible = tier_of, eligible
    self.step_share = (np.ones(len(tier_of)) if step_share is None
                       else np.asarray(step_share, np.float64))
    self.k = config.clients_per_round
    self.slots = min(len(tier_of),
                     int(math.ceil(self.k * (1 + d.over_selection))))
    self.deadline = float(d.deadline_seconds)
    self.clock: dict[int, float] = {0: 0.0}  # start of round r

  def restore(self, round_num: int, seconds: float) -> None:
    """The clock of a resumed run: round `round_num` starts at `seconds`."""
    self.clock = {round_num: float(seconds)}

  def round(self, r: int) -> RoundSim:
    d, seed = self.config.devices, self.config.seed
    t0 = self.clock[r]
    online = np.asarray(self.profiles.availability.available(
        None, t0), bool) & self.eligible
    candidates = np.flatnonzero(online)
    rng = np.random.default_rng([seed, 0x71AE, r])
    n = min(self.slots, len(candidates))
    ids = np.sort(rng.choice(candidates, n, replace=False)).astype(np.int64)
    tiers = self.tier_of[ids]
    costs = [self.cost(r, int(t)) for t in tiers]
    seconds = timing.client_seconds(
        self.profiles, ids,
        download_bits=np.array([c.download_bits or 0.0 for c in costs]),
        upload_bits=np.array([c.upload_bits or 0.0 for c in costs]),
        flops=np.array([c.flops_per_round or 0.0 for c in costs])
        * self.step_share[ids],
        jitter=d.jitter, rng=rng)
    failed = timing.draw_failures(rng, n, d.failure_probability)
    if n:  # offline before it finishes: its work is lost
      until = np.array([self.profiles.availability.online_until(int(i), t0)
                        for i in ids])
      failed = failed | (until < t0 + seconds)
    plan = timing.plan_round(seconds, target=self.k, deadline=self.deadline,
                             failed=failed)
    duration = float(plan.round_seconds)
    if not n:
      duration = self.deadline or IDLE_SECONDS
    agg = np.flatnonzero(plan.aggregated)
    agg = agg[np.argsort(seconds[agg], kind='stable')]
    rest = np.flatnonzero(~plan.aggregated)
    order = np.concatenate([agg, rest]).astype(np.int64)
    self.clock[r + 1] = t0 + duration
    self.clock.pop(r - 1, None)
    record = dict(sim_round_seconds=duration,
                  sim_hours=(t0 + duration) / 3600.0,
                  num_available=float(len(candidates)),
                  num_selected=float(n),
                  num_late=float(np.sum(plan.late)),
                  num_failed=float(np.sum(plan.failed)))
    return RoundSim(ids[order] if n else ids, int(len(agg)), record)

  def end_of(self, round_num: int) -> float:
    """Simulated seconds when round `round_num` - 1 ended (the start of
    `round_num`)."""
    return self.clock[round_num]


def memory_tiers(profiles, peaks: list[float], tier_of: np.ndarray,
                 by_memory: bool) -> tuple[np.ndarray, np.ndarray]:
  """(each client's tier, whether it may be sampled). By memory: the
  largest tier whose peak fits (`timing.tier_by_memory`); otherwise the
  drawn tiers, and a client whose device cannot hold its tier's program
  is excluded."""
  if by_memory:
    tiers = np.asarray(timing.tier_by_memory(profiles, peaks))
    return np.maximum(tiers, 0).astype(tier_of.dtype), tiers >= 0
  fits = np.asarray(profiles.memory_bytes) >= np.asarray(peaks)[tier_of]
  return tier_of, fits


__all__ = ['DeviceTime', 'IDLE_SECONDS', 'RoundSim', 'enabled',
           'make_availability', 'make_profiles', 'memory_tiers']
