"""`config.mode='fedbuff'`: asynchronous buffered aggregation over simulated
time (Nguyen et al. 2022; the programs are `core/buffered.py`).

P = `fedbuff.concurrency` clients train at any time. An event queue over
simulated seconds (device profiles and the compiled program's cost, as in
`device_time.py`) orders their arrivals. Each arrival joins the buffer
(a failed client's does not) and frees its place for a new client; once M
= `fedbuff.buffer_size` updates are buffered the server steps. A server
step is one "round" of the run: `num_rounds` steps, metrics.jsonl one
line per step.

The processing rules:

- Arrivals are taken in time order (ties: launch order). The server steps
  as soon as M are buffered, on the M that arrived first.
- The new clients that replace arrivals at time t are drawn together, once
  every event at t is processed and no server step is due at t. They start
  from the model version current then: after any step at t. With equal
  durations, M = P = K and no staleness, every version's cohort trains from
  it, which is synchronous FedAvg.
- Drawn clients are the online ones not already training, seeded by
  (seed, draw). Each draw packs its clients with `round_num` = its draw
  number, and client p of draw b gets the key fold_in(round key b, p), as
  round b of a synchronous run would.
- The clients that start from one version train together in one program.
  Training waits until the version is about to change or one of them
  arrives, so the clients of several draws batch into one program (their
  number rounded up to a power of two, at most P slots; the empty ones
  skip their steps).
- An update's staleness τ is the number of server steps between its start
  and its arrival; it is weighted by s(τ) (`fedbuff.staleness`).

Everything the queue needs is in the checkpoint: the clock, the draw
counter, every client in flight or buffered (trained outputs included;
untrained ones retrain from the restored version) and the pending
replacements. A resumed run is bit-identical to an unbroken one.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_eff import core
from fedjax_eff.core import buffered as buffered_lib
from fedjax_eff.data import cohort as cohort_lib
from fedjax_eff.devices import timing
from fedjax_eff.experiment import errors
from fedjax_eff.experiment.build import Experiment, params_sha256

FREE, LAUNCHED, TRAINED, BUFFERED = 0, 1, 2, 3
# Nobody in flight and nobody online for this long: the run cannot go on.
IDLE_LIMIT_SECONDS = 7 * 86400.0
_META = ('status', 'client', 'draw', 'position', 'start', 'finish',
         'failed', 'version', 'weight', 'seq', 'up_bits', 'down_bits')


class FedBuffMode:
  """Server steps of FedBuff on simulated devices (`run.RoundMode`)."""

  desc = 'server steps'

  def __init__(self, exp: Experiment):
    c = exp.config
    if exp.device_time is None:
      raise ValueError("config.mode='fedbuff' runs in simulated time: set "
                       'config.devices.profiles (e.g. parametric).')
    if exp.num_tiers != 1:
      raise ValueError("config.mode='fedbuff' runs one device tier.")
    self.exp, self.config = exp, c
    f = c.fedbuff
    self.p, self.m = int(f.concurrency), int(f.buffer_size)
    self.staleness = f.staleness
    n = exp.data.train.num_clients
    if not 1 <= self.m <= self.p <= n:
      raise ValueError(
          f'config.fedbuff needs 1 <= buffer_size ({self.m}) <= concurrency '
          f'({self.p}) <= the training clients ({n}).')
    self.fns = buffered_lib.build_buffered(
        exp.model, exp.task, exp.technique, exp.client_optimizer,
        exp.server_optimizer, prox_mu=c.client.prox_mu)
    self.capacity = 2 * self.p + self.m
    self.current = {'state': exp.init_state()}
    self.store = self.fns.empty_store(exp.init_params, self.capacity)
    self.meta = {k: np.zeros(self.capacity, np.float64 if k in (
        'start', 'finish', 'weight', 'up_bits', 'down_bits') else np.int64)
                 for k in _META}
    self.pending = np.full(self.p, np.nan)  # replacement launch times
    self.clock, self.draws, self.seq = 0.0, 0, 0
    self.failed_since = 0
    # Client p of draw d: fold_in(round key d, p), as round d keys it.
    self.keys = jax.jit(jax.vmap(
        lambda base, d, p: jax.random.fold_in(jax.random.fold_in(base, d), p),
        in_axes=(None, 0, 0)))

  # ---------------------------------------------------------- checkpoint --

  def state(self) -> dict[str, Any]:
    return {'state': self.current['state'], 'fedbuff': {
        'store': self.store, 'meta': dict(self.meta),
        'pending': self.pending,
        'counters': np.asarray([self.clock, self.draws, self.seq,
                                self.failed_since], np.float64)}}

  def checkpoint(self, done: int) -> dict[str, Any]:
    del done
    return self.state()

  def restore(self, restored: dict[str, Any]) -> int:
    self.current['state'] = jax.tree.map(jnp.asarray, restored['state'])
    q = restored['fedbuff']
    self.store = jax.tree.map(jnp.asarray, q['store'])
    self.meta = {k: np.array(v) for k, v in q['meta'].items()}
    self.pending = np.array(q['pending'])
    clock, draws, seq, failed = np.asarray(q['counters'])
    self.clock, self.draws = float(clock), int(draws)
    self.seq, self.failed_since = int(seq), int(failed)
    return int(self.current['state'].round)

  # ----------------------------------------------------------- the queue --

  @property
  def version(self) -> int:
    return int(self.current['state'].round)

  def rows(self, *status) -> np.ndarray:
    return np.flatnonzero(np.isin(self.meta['status'], status))

  def next_event(self) -> tuple[float, int] | None:
    """(time, row) of the earliest arrival (ties: launch order)."""
    rows = self.rows(LAUNCHED, TRAINED)
    if not len(rows):
      return None
    key = np.lexsort((self.meta['seq'][rows], self.meta['finish'][rows]))
    row = int(rows[key[0]])
    return float(self.meta['finish'][row]), row

  def launch(self, t: float, n: int) -> None:
    """Draws `n` clients online at `t` and not training, and schedules
    their arrivals (their training waits: `train_launched`)."""
    exp = self.exp
    dt = exp.device_time
    busy = self.meta['client'][self.rows(LAUNCHED, TRAINED)]
    online = np.asarray(dt.profiles.availability.available(None, t),
                        bool) & dt.eligible
    online[busy] = False
    rng = np.random.default_rng([self.config.seed, 0x5A3D, self.draws])
    if online.all():  # (CohortSampler's draw: FedAvg's cohorts)
      ids = rng.choice(len(online), n, replace=False)
    else:
      candidates = np.flatnonzero(online)
      ids = rng.choice(candidates, min(n, len(candidates)), replace=False)
    ids = np.sort(ids).astype(np.int64)
    cost = exp.program_cost(self.version, 0)
    seconds = timing.client_seconds(
        dt.profiles, ids, download_bits=float(cost.download_bits or 0),
        upload_bits=float(cost.upload_bits or 0),
        flops=float(cost.flops_per_round or 0) * dt.step_share[ids],
        jitter=self.config.devices.jitter, rng=rng)
    failed = timing.draw_failures(rng, len(ids),
                                  self.config.devices.failure_probability)
    for pos, (i, s, bad) in enumerate(zip(ids, seconds, failed)):
      until = dt.profiles.availability.online_until(int(i), t)
      row = int(self.rows(FREE)[0])
      for k, v in dict(status=LAUNCHED, client=i, draw=self.draws,
                       position=pos, start=t, finish=t + s,
                       failed=int(bad or until < t + s), version=-1,
                       seq=self.seq).items():
        self.meta[k][row] = v
      self.seq += 1
    if not len(ids) and not len(self.rows(LAUNCHED, TRAINED)) and (
        t - self.clock > IDLE_LIMIT_SECONDS):
      raise errors.RunFailed(
          f'FedBuff: no client came online in {IDLE_LIMIT_SECONDS / 86400:g} '
          f'simulated days (from {self.clock / 3600:.1f} h); check '
          'config.devices.availability.')
    # (fewer online than asked: the rest of the places wait a round trip)
    for _ in range(n - len(ids)):
      self.pending[np.flatnonzero(np.isnan(self.pending))[0]] = (
          t + (self.config.devices.deadline_seconds or 60.0))
    self.draws += 1

  def train_launched(self) -> None:
    """Trains every launched client from the current version, in one
    program: each draw packed as its round, P slots."""
    rows = self.rows(LAUNCHED)
    if not len(rows):
      return
    exp, c = self.exp, self.config
    rows = rows[np.lexsort((self.meta['position'][rows],
                            self.meta['draw'][rows]))]
    cohorts = []
    for d in np.unique(self.meta['draw'][rows]):
      mine = rows[self.meta['draw'][rows] == d]
      ids = self.meta['client'][mine]
      cohorts.append(cohort_lib.pack(
          exp.data.train, ids, **dict(exp.packing, round_num=int(d),
                                      ctx={'tier': exp.tier_of[ids]})))
    # P slots at most; padded to a power of two (log2 P programs, at most
    # 2x the slots of the clients launched).
    slots = min(self.p, 1 << max(len(rows) - 1, 0).bit_length())
    filler = slots - len(rows)
    cohort = _concat(cohorts, filler)
    pad = lambda x: np.concatenate([x, np.zeros(filler, np.int64)])
    keys = self.keys(exp.base_key, jnp.asarray(pad(self.meta['draw'][rows])),
                     jnp.asarray(pad(self.meta['position'][rows])))
    out = self.fns.train(self.current['state'].params,
                         jnp.int32(self.version), cohort.batches,
                         cohort.mask, cohort.ctx, keys)
    index = np.full(slots, self.capacity, np.int32)
    index[:len(rows)] = rows
    self.store = self.fns.write(self.store, jnp.asarray(index), out)
    self.meta['status'][rows] = TRAINED
    self.meta['version'][rows] = self.version
    self.meta['weight'][rows] = np.asarray(cohort.weight)[:len(rows)]
    self.meta['up_bits'][rows] = np.asarray(out.upload_bits)[:len(rows)]
    self.meta['down_bits'][rows] = np.asarray(out.download_bits)[:len(rows)]

  def launch_pending(self, before: float) -> None:
    """Draws the replacements of every arrival before `before`, grouped by
    arrival time (one draw per time)."""
    due = self.pending[~np.isnan(self.pending) & (self.pending < before)]
    for t in np.unique(due):
      n = int(np.sum(self.pending == t))
      self.pending[self.pending == t] = np.nan
      self.launch(float(t), n)

  # ---------------------------------------------------------- one step --

  def cohort(self, round_num: int):
    del round_num  # the queue decides

  def step(self, r: int, this) -> tuple[dict[str, float], float]:
    del r, this
    if self.draws == 0:
      self.launch(0.0, self.p)
    start_clock = self.clock
    while len(self.rows(BUFFERED)) < self.m:
      nxt = self.next_event()
      self.launch_pending(np.inf if nxt is None else nxt[0])
      nxt = self.next_event()
      while nxt is None and not np.all(np.isnan(self.pending)):
        self.launch_pending(np.inf)  # nobody online yet: wait and retry
        nxt = self.next_event()
      if nxt is None:
        raise RuntimeError('FedBuff: no client in flight.')
      t, row = nxt
      if self.meta['status'][row] == LAUNCHED and not self.meta['failed'][row]:
        self.train_launched()  # (arriving before the version changes)
      self.clock = t
      self.meta['status'][row] = FREE if self.meta['failed'][row] else (
          BUFFERED)
      self.failed_since += int(self.meta['failed'][row])
      self.pending[np.flatnonzero(np.isnan(self.pending))[0]] = t
    self.train_launched()  # from the version about to be replaced
    buf = self.rows(BUFFERED)
    buf = buf[np.lexsort((self.meta['seq'][buf], self.meta['finish'][buf]))]
    rows = buf[:self.m]
    tau = self.version - self.meta['version'][rows]
    w = self.meta['weight'][rows]
    s = np.asarray(buffered_lib.staleness_weight(tau, self.staleness))
    new, skipped, sums, dropped = self.fns.step(
        self.current['state'], self.store, jnp.asarray(rows, jnp.int32),
        jnp.asarray(w * s, jnp.float32), jnp.asarray(w, jnp.float32))
    self.current['state'] = new
    self.meta['status'][rows] = FREE
    loss, correct, examples, scored = (float(x) for x in np.asarray(sums))
    record = dict(
        train_loss=loss / examples if examples > 0 else float('nan'),
        train_accuracy=correct / max(scored, 1.0),
        num_clients=float(self.m), num_dropped=float(dropped),
        upload_bits=float(np.mean(self.meta['up_bits'][rows])),
        download_bits=float(np.mean(self.meta['down_bits'][rows])),
        server_step_skipped=float(skipped),
        staleness_mean=float(np.mean(tau)), staleness_max=float(np.max(tau)),
        num_failed=float(self.failed_since),
        sim_round_seconds=self.clock - start_clock,
        sim_hours=self.clock / 3600.0)
    self.failed_since = 0
    t_acc = time.time()
    m = core.RoundMetrics(*([0.0] * 7), client_upload_bits=np.asarray(
        self.meta['up_bits'][rows]), client_download_bits=np.asarray(
            self.meta['down_bits'][rows]))
    record.update(self.exp.device_metrics(self.version - 1,
                                          np.zeros(self.m, np.int64), m))
    return record, time.time() - t_acc

  def evaluate(self, done: int) -> dict[str, float]:
    return self.exp.eval_metrics(self.current['state'].params, done)

  def finish(self, last: dict[str, Any], rounds: int,
             history: list[dict[str, Any]]) -> dict[str, Any]:
    exp, state = self.exp, self.current['state']
    if 'test_accuracy' not in last and 'heldout_accuracy' not in last:
      last.update(exp.eval_metrics(state.params, rounds))
    return {
        'params_sha256': params_sha256(state.params),
        'technique': exp.round_fns.technique.name,
        'sim_hours': self.clock / 3600.0,
        'fedbuff': dict(concurrency=self.p, buffer_size=self.m,
                        staleness=self.staleness, draws=self.draws),
        'device_cost': exp.cost_table(),
        'num_params': int(sum(np.size(x)
                              for x in jax.tree.leaves(state.params))),
    }


def _concat(cohorts, filler: int):
  """Cohorts one after another, then `filler` absent slots."""
  first = cohorts[0]
  cat = lambda *xs: np.concatenate(xs, axis=0)
  pad = lambda x: np.concatenate(
      [x, np.zeros((filler,) + x.shape[1:], x.dtype)], axis=0)
  batches = {k: pad(cat(*(c.batches[k] for c in cohorts)))
             for k in first.batches}
  ctx = {k: pad(cat(*(c.ctx[k] for c in cohorts))) for k in first.ctx}
  return first._replace(batches=batches,
                        mask=pad(cat(*(c.mask for c in cohorts))),
                        weight=pad(cat(*(c.weight for c in cohorts))),
                        ctx=ctx)


__all__ = ['FedBuffMode']
