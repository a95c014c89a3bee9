"""One accelerator session on a time budget: chunk-width sweep, then scaling.

Made for a single short run on a GPU or TPU (about 7 minutes, compiles
included), reusing `scaling.py`'s measurement (`scaling.run_worker`: one
synthetic-EMNIST workload, device-resident data, a timed round is end to
end: sample, `pack_index` on the host, `round_step`, block) and its
subprocess runner (`scaling.spawn`):

(a) throughput vs chunk width: per model (EMNIST CNN, MLP 200-200) and C in
    `--chunks` at `--sweep_k` clients per round, in this process;
    `clients_per_second`, `seconds_per_round`, `compile_seconds`;
(b) scaling: per model, K in `--cohorts` at the model's best C from (a)
    (capped at K), each K in a fresh process so that the device allocator's
    `peak_bytes_in_use` (`jax` `memory_stats()`; the peak RSS on CPU, which
    keeps none) belongs to that K alone; memory per client = peak / K (the
    whole data set, `num_clients = K`, is on the device). At `--floor_k`, the
    round against its centralized floor (`scaling.py`'s `pair`):
    `efficiency_vs_floor`. A model's ladder stops at its first failure (out
    of memory, say) and where linear extrapolation from its previous K says
    the next one would not finish within the time left.
(c) ragged cohorts (`ragged.py`, issue 18): useful fraction and s/round of
    one-epoch cohorts of heavy-tailed sizes against fixed-S packing and the
    centralized floor, the timed rounds at chunk width `--ragged_chunk`;
(d) the peers that run on the accelerator: `peers.py`'s overhead-bound
    FEMNIST workload with fedjax_eff alone (the other frameworks' venvs are
    CPU builds that do not travel; their CPU figures are in RESULTS.md).
(c) and (d) are subprocesses with `--ragged_s` and `--peers_s` seconds
reserved for them out of the budget (their JSON goes to files beside
`--out`, and their headline figures into the suite's).

The budget (`--budget_s`) is checked before every item: (a) may use
`--sweep_share` of it, (b) the rest; an item that does not start is listed
in `skipped` and said so. Progress lines are flushed as they come; the last
line is one JSON object (backend, device kind, jax version, per model the
best clients/s and its C, `max_clients_per_round`, memory per client, the
tables), also written to `--out`. `--reduced` is a seconds-long CPU version
(tiny cohorts) for the tests. Nothing here asserts a timing.

  python benchmarks/accelerator_suite.py --budget_s 420
  python benchmarks/accelerator_suite.py --reduced --out /tmp/suite.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time

# Before jax starts: the scaling workers are other processes on the same
# device, and their peak figures should be their own allocations.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import round_throughput  # noqa: E402  (machine_info, emit_json)
import scaling  # noqa: E402  (run_worker, spawn)

from fedjax_eff.core import round as round_lib  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, 'results', 'accelerator_suite.json')
REDUCED = dict(chunks='1,8', sweep_k=8, cohorts='16', floor_k=16,
               ragged_args='--rounds 1 --caps 32 --dists so',
               peers_args='--cohorts 10 --rounds 1 --chunk_sizes 1,all')
REDUCED_WORKLOAD = ['--examples_per_client', '4', '--batch_size', '4',
                    '--rounds', '1']


def parse_args(argv=None):
  """(the suite's flags, scaling.py's flags: the workload of every item)."""
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Other flags go to scaling.py's parser: the workload "
      '(--examples_per_client, --batch_size, --steps, --rounds, --client_lr, '
      '--server_lr, --seed; --budget_seconds per item, default 20 here).')
  p.add_argument('--budget_s', type=float, default=420,
                 help='seconds for everything; items past it are skipped.')
  p.add_argument('--sweep_share', type=float, default=0.45,
                 help='fraction of the budget part (a) may start items in.')
  p.add_argument('--models', default='cnn,mlp')
  p.add_argument('--chunks', default='1,8,32,128,512', help='C of part (a).')
  p.add_argument('--sweep_k', type=int, default=2048,
                 help='clients per round of part (a).')
  p.add_argument('--cohorts', default='100,1000,10000,100000',
                 help='clients per round K of part (b), ascending.')
  p.add_argument('--floor_k', type=int, default=1000,
                 help='K of the centralized-floor comparison (0: none).')
  p.add_argument('--ragged_s', type=float, default=100,
                 help='seconds reserved for (c); 0 skips it.')
  p.add_argument('--ragged_chunk', type=int, default=8,
                 help='C of (c)\'s timed rounds.')
  p.add_argument('--ragged_args', default='--rounds 2',
                 help="more flags for ragged.py.")
  p.add_argument('--peers_s', type=float, default=70,
                 help='seconds reserved for (d); 0 skips it.')
  p.add_argument('--peers_args', default='--rounds 3',
                 help='more flags for peers.py --workload femnist.')
  p.add_argument('--reduced', action='store_true',
                 help='tiny CPU version: ' + ', '.join(
                     f'{k}={v}' for k, v in REDUCED.items()) + ' '
                 + ' '.join(REDUCED_WORKLOAD))
  p.add_argument('--out', default=DEFAULT_OUT)
  args, rest = p.parse_known_args(argv)
  if args.reduced:
    vars(args).update(REDUCED)
  work = scaling.parse_args(['--budget_seconds', '20'] + (
      REDUCED_WORKLOAD if args.reduced else []) + rest)
  return args, work


class Clock:
  """Seconds since start; `log` prefixes them to a flushed line."""

  def __init__(self, budget: float):
    self.t0, self.budget = time.perf_counter(), budget

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def left(self, share: float = 1.0) -> float:
    return self.budget * share - self.elapsed()

  def log(self, msg: str) -> None:
    print(f'[{self.elapsed():6.1f} s] {msg}', flush=True)


def worker_cfg(work, model: str, mode: str, k: int, chunk: int) -> dict:
  """One item: `num_clients = k`, so the data on the device grows with K."""
  return dict(scaling.base_cfg(work, k), chunk_size=chunk, model=model,
              mode=mode, k=k, steps=work.steps)


def sweep(args, work, models, clock: Clock, skipped: list,
          errors: dict) -> dict:
  """(a): model -> str(C) -> figures, in this process."""
  out = {m: {} for m in models}
  chunks = [int(c) for c in args.chunks.split(',') if c.strip()]
  for c in chunks:
    for m in models:
      name = f'sweep {m} K={args.sweep_k} C={c}'
      if c > args.sweep_k or clock.left(args.sweep_share) <= 0:
        why = 'C > K' if c > args.sweep_k else 'sweep budget spent'
        skipped.append(f'{name} ({why})')
        clock.log(f'[{name}] skipped: {why}')
        continue
      try:
        r = scaling.run_worker(worker_cfg(work, m, 'resident', args.sweep_k,
                                          c))
      except Exception as e:  # pylint: disable=broad-except
        errors[name] = f'{type(e).__name__}: {str(e)[:300]}'
        clock.log(f'[{name}] failed: {errors[name]}')
        continue
      out[m][str(c)] = {f: r[f] for f in (
          'seconds_per_round', 'clients_per_second', 'compile_seconds',
          'pack_seconds', 'round_seconds', 'params_finite')}
      # The host's pack_index is in every round; what the device alone does:
      device_s = r['seconds_per_round'] - r['pack_seconds']
      out[m][str(c)]['clients_per_second_excluding_pack'] = (
          args.sweep_k / device_s if device_s > 0 else None)
      clock.log(f"[{name}] {r['seconds_per_round']:.4f} s/round (pack "
                f"{r['pack_seconds']:.4f}), {r['clients_per_second']:.0f} "
                f"clients/s, compile {r['compile_seconds']:.1f} s")
  return out


def memory_per_client(r: dict) -> tuple[float, str]:
  """Peak bytes / K: the device allocator's, else (CPU) the process's."""
  if r.get('device_peak_bytes_in_use'):
    return r['device_peak_bytes_in_use'] / r['k'], 'device_peak_bytes_in_use'
  return r['peak_rss_bytes'] / r['k'], 'peak_rss_bytes'


def scale(args, work, models, best_c: dict, clock: Clock, skipped: list,
          errors: dict) -> tuple[dict, dict]:
  """(b): (model -> str(K) -> figures, model -> floor pair figures)."""
  cohorts = [int(k) for k in args.cohorts.split(',') if k.strip()]
  items = [(k, 0, m, 'resident') for k in cohorts for m in models]
  if args.floor_k:
    items += [(args.floor_k, 1, m, 'pair') for m in models]
  runs, pairs = {m: {} for m in models}, {}
  last = {}       # model -> (K, wall seconds) of its last resident run
  stopped = {}    # model -> why its ladder stopped
  fixed = None    # the smallest wall seen: roughly the per-process cost
  for k, _, m, mode in sorted(items):
    name = f'{m} {mode} K={k}'
    left = clock.left() - args.ragged_s - args.peers_s
    why = stopped.get(m) if mode == 'resident' else None
    if why is None and m in last and mode == 'resident':
      k0, w0 = last[m]
      guess = fixed + (w0 - fixed) * k / k0
      if guess > left:
        why = f'predicted {guess:.0f} s > {left:.0f} s left'
    if why is None and left < 5:
      why = 'budget spent'
    if why is not None:
      skipped.append(f'{name} ({why})')
      clock.log(f'[{name}] skipped: {why}')
      continue
    c = min(best_c[m], k)
    r = scaling.spawn(worker_cfg(work, m, mode, k, c), left, clock.log)
    if 'error' in r:
      errors[name] = r['error']
      if mode == 'resident':
        stopped[m] = f'K={k} failed'
      continue
    mem, source = memory_per_client(r)
    fields = dict(chunk_size=c, memory_per_client_bytes=mem,
                  memory_source=source,
                  **{f: r.get(f) for f in (
                      'seconds_per_round', 'clients_per_second',
                      'compile_seconds', 'pack_seconds', 'data_bytes',
                      'device_peak_bytes_in_use', 'device_bytes_limit',
                      'peak_rss_bytes', 'wall_seconds', 'params_finite')})
    if mode == 'pair':
      pairs[m] = dict(fields, k=k, **{f: r[f] for f in (
          'floor_seconds_per_round', 'efficiency_vs_floor',
          'efficiency_vs_floor_device', 'overhead_ms_per_client')})
    else:
      runs[m][str(k)] = fields
      last[m] = (k, r['wall_seconds'])
      fixed = min(fixed or math.inf, r['wall_seconds'])
  return runs, pairs


def run_script(name: str, argv: list, out: str, seconds: float,
               clock: Clock, skipped: list, errors: dict):
  """Runs `benchmarks/<name>.py argv --out out` for at most `seconds`,
  its lines echoed; its JSON (from `out`), or None (failure or skip)."""
  if seconds <= 5:  # 0: not asked for
    why = 'budget spent' if seconds else 'not asked for'
    skipped.append(f'{name} ({why})')
    clock.log(f'[{name}] skipped: {why}')
    return None
  cmd = [sys.executable, '-u', os.path.join(HERE, f'{name}.py')] + argv + [
      '--out', out]
  clock.log(f'[{name}] ' + ' '.join(cmd[2:]) + f' (at most {seconds:.0f} s)')
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  timer = threading.Timer(seconds, proc.kill)
  timer.start()
  tail = []
  for line in proc.stdout:
    clock.log(f'  {name}: {line.rstrip()}')
    tail = (tail + [line.rstrip()])[-5:]
  proc.wait()
  timer.cancel()
  if proc.returncode != 0:
    why = (f'killed after {seconds:.0f} s' if proc.returncode < 0 else
           f'exit {proc.returncode}: ' + ' | '.join(tail)[-300:])
    errors[name] = why
    clock.log(f'[{name}] failed: {why}')
    return None
  try:
    with open(out) as f:
      return json.load(f)
  except (OSError, ValueError) as e:  # (a part's failure is not the suite's)
    errors[name] = f'{type(e).__name__}: {e}'[:300]
    clock.log(f'[{name}] failed: {errors[name]}')
    return None


def main(argv=None):
  args, work = parse_args(argv)
  clock = Clock(args.budget_s)
  models = [m.strip() for m in args.models.split(',') if m.strip()]
  dev = jax.devices()[0]
  clock.log(f'backend={jax.default_backend()} device={dev.device_kind} '
            f'x{jax.device_count()} jax={jax.__version__} '
            f'budget={args.budget_s:.0f} s models={models} '
            f'reduced={args.reduced}')
  skipped, errors = [], {}

  clock.log(f'(a) chunk sweep C={args.chunks} at K={args.sweep_k}')
  swept = sweep(args, work, models, clock, skipped, errors)
  best_c = {}
  for m in models:
    best_c[m] = (min(swept[m], key=lambda c: swept[m][c]['seconds_per_round'])
                 if swept[m] else None)
    clock.log(f'{m}: best C={best_c[m]} ' + ', '.join(
        f"C={c} {r['clients_per_second']:.0f}/s" for c, r in swept[m].items()))
  chunk_for = {m: int(best_c[m]) if best_c[m] else
               round_lib.default_chunk_size(args.sweep_k) for m in models}

  clock.log(f'(b) scaling K={args.cohorts} at C={chunk_for}, floor at '
            f'K={args.floor_k}')
  runs, pairs = scale(args, work, models, chunk_for, clock, skipped, errors)
  reached = {m: max(map(int, runs[m]), default=None) for m in models}
  stem = os.path.splitext(os.path.abspath(args.out or DEFAULT_OUT))[0]
  clock.log(f'(c) ragged cohorts at C={args.ragged_chunk}')
  ragged = run_script(
      'ragged', shlex.split(args.ragged_args) + [
          '--time_chunk', str(args.ragged_chunk)], stem + '_ragged.json',
      args.ragged_s and min(args.ragged_s, clock.left() - args.peers_s),
      clock, skipped, errors)
  clock.log('(d) peers.py femnist, fedjax_eff alone')
  peers = run_script(
      'peers', ['--workload', 'femnist'] + shlex.split(args.peers_args),
      stem + '_peers_femnist.json', args.peers_s and clock.left(), clock,
      skipped, errors)
  summary = dict(
      benchmark='accelerator_suite',
      backend=jax.default_backend(), device_kind=dev.device_kind,
      device_count=jax.device_count(), jax_version=jax.__version__,
      best_clients_per_second={
          m: swept[m][best_c[m]]['clients_per_second'] if best_c[m] else None
          for m in models},
      best_chunk={m: int(best_c[m]) if best_c[m] else None for m in models},
      # Ladders stop at their first failure: the largest K all models ran.
      max_clients_per_round=(None if None in reached.values()
                             else min(reached.values(), default=None)),
      max_clients_per_round_per_model=reached,
      memory_per_client_bytes={
          m: runs[m][str(k)]['memory_per_client_bytes'] if k else None
          for m, k in reached.items()},
      memory_source=next((r['memory_source'] for m in models
                          for r in runs[m].values()), None),
      efficiency_vs_floor={m: p['efficiency_vs_floor']
                           for m, p in pairs.items()},
      ragged={k: (ragged or {}).get(k) for k in (
          'useful_fraction_c1', 'useful_fraction_c8',
          'useful_fraction_c8_lanes', 'round_over_floor',
          'round_over_floor_lanes', 'speedup_vs_fixed_steps',
          'speedup_lanes_vs_chunks', 'seconds_per_round', 'seconds_lanes',
          'time_chunk')},
      peers_femnist_seconds_per_round=(peers or {}).get('seconds_per_round'),
      sweep=swept, scaling=runs, floor=pairs, skipped=skipped, errors=errors,
      budget_s=args.budget_s, elapsed_s=clock.elapsed(),
      config=dict(reduced=args.reduced, chunks=args.chunks,
                  sweep_k=args.sweep_k, cohorts=args.cohorts,
                  floor_k=args.floor_k, ragged_args=args.ragged_args,
                  ragged_chunk=args.ragged_chunk,
                  peers_args=args.peers_args,
                  workload=dict({k: v for k, v in scaling.base_cfg(
                      work, 0).items() if k not in ('num_clients',
                                                     'chunk_size')},
                                steps=work.steps, pixels='float32')),
      machine=round_throughput.machine_info(),
      command=' '.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]))
  clock.log(f'done: {len(skipped)} skipped, {len(errors)} failed; '
            f'best clients/s {summary["best_clients_per_second"]}, '
            f'max K {reached}')
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  round_throughput.emit_json(summary, args.out)


if __name__ == '__main__':
  main()
