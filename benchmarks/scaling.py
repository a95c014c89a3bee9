"""Rounds/s and peak memory vs clients per round (K = 100, 1,000, 10,000).

What it measures, per model (EMNIST CNN, MLP 784-200-200-62) and per cohort
size K, each in its own fresh subprocess so that the peak RSS
(`/proc/self/status` VmHWM, monotonic; not `ru_maxrss`, which keeps the
parent's RSS across fork and exec) belongs to that one K:

* `resident` (the main variant): `fedjax_eff.core.build_round(...,
  chunk_size=1)` (the CPU default) fed from device-resident data: the whole
  data set goes to the device once (`ResidentData`), each round only
  `pack_index`'s int32 row indices `[K, S, B]` cross from the host and the
  round gathers each chunk's rows inside the jitted program, so memory should
  stay O(C x model + data set), flat in K;
* `packed` (`--packed_cohorts`): the same round fed a host-packed `Cohort`
  (`data.pack`, `[K, S, B, 28, 28, 1]` float32 arrays), whose memory grows
  with K;
* `pair` (`--floor_cohorts`): the resident round and its floor, the same
  K x S SGD steps of batch B as one centralized `lax.scan` on one model
  (same loss, dropout and client optimizer; round 0's batches already on the
  device, all real), jitted; the two are timed alternately in one process
  (which goes first alternates) so that a slow spell of a shared machine
  hits both. `efficiency_vs_floor = floor seconds / round seconds` (1.0:
  federation costs nothing over plain minibatch SGD; `_device`: the round
  without its host part);
* `--sweep_steps` (e.g. `1,4,16` at `--sweep_cohort`): `pair` at several
  local-step counts S, to split the round's extra cost into a per-client
  part (delta, aggregation, per-client setup) and a per-step part.

Workload (defaults): synthetic EMNIST (uniform float32 pixels in [0, 1),
28x28x1, 62 random labels from the seed; float32 rather than uint8 so the
models see the same inputs as `round_throughput.py`), `--num_clients`
(default: the largest K) clients x 20 examples, K distinct clients sampled
per round, S = 1 local step of batch 20 (one epoch), client SGD 0.1, server
FedAvg (SGD 1.0), weights = examples, dropout on. A timed round is end to
end: sample the cohort, `pack_index` (host), `round_step`, block on the new
server parameters; the host part is also reported apart (`pack s`).
`--prefetch` packs round r+1 on a host thread while round r runs, as the
training loop does (`experiment/loop.py`): the host part is then the wait
for the packed cohort, and whatever packing is left when the round ends is
timed with it (the floor never shares the cores with it). Round 0
(compilation) is timed apart (`compile s` = round 0 minus the median round),
then `--rounds` rounds (fewer, but at least one, where they would run past
`--budget_seconds` per measurement); the median is reported. Nothing here
asserts a timing or a memory figure.

Run:

  python benchmarks/scaling.py                      # cnn,mlp x 100,1k,10k
  python benchmarks/scaling.py --models mlp --cohorts 100,1000 --rounds 3
  python benchmarks/scaling.py --sweep_steps 1,4,16 --sweep_cohort 100

Prints a table, then as its last line one JSON object:
`max_clients_per_round` (largest K that ran for every model), per model and K
`peak_rss_bytes`, `device_peak_bytes_in_use` (the allocator's peak where
the backend keeps one: GPU, TPU; null on CPU), `seconds_per_round`,
`rounds_per_second`, `clients_per_second`, `compile_seconds`,
`efficiency_vs_floor` per model, the step sweep, errors, machine and
versions. `--out PATH` also writes it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', default='cnn,mlp',
                 help='comma-separated: cnn (EMNIST CNN), mlp (200-200).')
  p.add_argument('--cohorts', default='100,1000,10000',
                 help='comma-separated clients per round K (resident data).')
  p.add_argument('--packed_cohorts', default='100,1000',
                 help='K for the host-packed path ("" to skip).')
  p.add_argument('--floor_cohorts', default='1000',
                 help='K at which to time the centralized floor ("" to skip).')
  p.add_argument('--sweep_steps', default='',
                 help='local steps S for the overhead sweep, e.g. 1,4,16.')
  p.add_argument('--sweep_cohort', type=int, default=100,
                 help='K of the step sweep.')
  p.add_argument('--rounds', type=int, default=3,
                 help='timed rounds per measurement, after round 0.')
  p.add_argument('--budget_seconds', type=float, default=600,
                 help='per measurement: stop timing rounds (keeping at '
                 'least one) when another would end past this many seconds '
                 'since round 0 began.')
  p.add_argument('--num_clients', type=int, default=None,
                 help='clients in the data (default: the largest K).')
  p.add_argument('--examples_per_client', type=int, default=20)
  p.add_argument('--batch_size', type=int, default=20)
  p.add_argument('--steps', type=int, default=1, help='local steps S.')
  p.add_argument('--chunk_size', type=int, default=1, help='C.')
  p.add_argument('--client_lr', type=float, default=0.1)
  p.add_argument('--server_lr', type=float, default=1.0)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--lanes', action='store_true',
                 help='build_round(lanes=True): the clients back to back on '
                 'C lanes (config.lanes).')
  p.add_argument('--prefetch', action='store_true',
                 help='pack round r+1 on a host thread while round r runs, '
                 'as the training loop does (experiment/loop.py); the host '
                 'time reported is then the wait for the packed cohort.')
  p.add_argument('--timeout', type=float, default=3600,
                 help='seconds per subprocess before it counts as failed.')
  p.add_argument('--out', default=None, help='also write the JSON here.')
  p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def ints(spec: str) -> list[int]:
  return [int(t) for t in spec.split(',') if t.strip()]


# ---------------------------------------------------------------------------
# Worker side: one measurement in a fresh process.


def _proc_status_bytes(field: str) -> int | None:
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _peak_rss_bytes() -> int:
  # VmHWM is this process's own peak; ru_maxrss (KiB on Linux) survives
  # exec, so it would also count the parent's RSS at fork.
  hwm = _proc_status_bytes('VmHWM')
  return hwm if hwm is not None else (
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _device_memory_bytes() -> dict:
  """The first local device's allocator figures (`peak_bytes_in_use`,
  `bytes_in_use`, `bytes_limit`), or {} where the backend keeps none (CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.local_devices()[0].memory_stats() or {}
  return {f'device_{f}': int(stats[f]) for f in
          ('peak_bytes_in_use', 'bytes_in_use', 'bytes_limit') if f in stats}


def _another_round(times: list[float], t_start: float, budget: float,
                   extra: float = 0.0) -> bool:
  """Round 0 and one timed round always; more while within the budget."""
  if len(times) < 2:
    return True
  return time.perf_counter() - t_start + times[-1] + extra <= budget


def run_worker(cfg: dict) -> dict:
  """One measurement in this (fresh) process; returns its figures.

  `cfg['mode']`: `resident` or `packed` (the federated round alone: its
  peak RSS is the cohort size's), or `pair` (the resident round and the
  centralized floor on the same K x S batches, timed alternately in one
  process so that a slow spell of the machine hits both alike).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  import optax

  from fedjax_eff import core
  from fedjax_eff import data as data_lib
  from fedjax_eff import models
  from fedjax_eff.core import round as round_lib
  sys.path.insert(0, HERE)
  import fedjax_shims  # pylint: disable=g-import-not-at-top

  t_setup = time.perf_counter()
  mode, k, s, b = cfg['mode'], cfg['k'], cfg['steps'], cfg['batch_size']
  seed = cfg['seed']
  if cfg['model'] == 'cnn':
    model = models.get_model('cnn', fedjax_shims.NUM_CLASSES, use_im2col=True)
  else:
    model = models.get_model('mlp', fedjax_shims.NUM_CLASSES,
                             hidden=(200, 200))
  data = data_lib.FederatedData(fedjax_shims.synthetic_emnist(
      cfg['num_clients'], cfg['examples_per_client'], seed))
  resident = data_lib.ResidentData.of(data)
  sampler = data_lib.CohortSampler(data.num_clients, k, seed)
  task = core.classification()
  client_opt = core.make_optimizer('sgd', cfg['client_lr'])
  params = model.init({'params': jax.random.key(seed)},
                      jnp.zeros((1, 28, 28, 1), jnp.float32))['params']
  rng = jax.random.key(seed + 1)
  pack_kw = dict(steps=s, batch_size=b, seed=seed, policy_small='repeat')
  out = dict(cfg, num_params=int(sum(x.size for x in jax.tree.leaves(
      params))), data_bytes=resident.nbytes)
  finite = lambda tree: bool(all(np.all(np.isfinite(np.asarray(x)))
                                 for x in jax.tree.leaves(tree)))

  # The federated round: `run_round(r)` -> seconds of its host part.
  fns = core.build_round(
      model, task, core.identity(), client_opt,
      core.make_optimizer('fedavg', cfg['server_lr']),
      chunk_size=cfg['chunk_size'], donate=True,
      lanes=bool(cfg.get('lanes')))
  state = [fns.init(params)]
  examples = None
  if mode in ('resident', 'pair'):
    examples = jax.device_put(dict(resident.examples))
    jax.block_until_ready(examples)  # so the setup figures include it
  losses = []

  def pack(r):
    ids = sampler.sample(r)
    if examples is not None:
      return data_lib.pack_index(resident, ids, round_num=r, **pack_kw)
    return data_lib.pack(data, ids, round_num=r, **pack_kw)

  # --prefetch: round r+1's cohort is packed on a host thread while round
  # r runs, as the training loop does (`experiment/loop.py`).
  pool = (concurrent.futures.ThreadPoolExecutor(max_workers=1)
          if cfg.get('prefetch') else None)
  ahead = {}

  def run_round(r):
    t0 = time.perf_counter()
    cohort = ahead.pop(r).result() if r in ahead else pack(r)
    host = time.perf_counter() - t0  # (prefetched: the wait for it)
    if pool is not None:
      ahead[r + 1] = pool.submit(pack, r + 1)
    state[0], metrics = fns.round_step(state[0], cohort,
                                       jax.random.fold_in(rng, r),
                                       examples=examples)
    jax.block_until_ready((state[0].params, metrics))
    if pool is not None:  # (done within the round: the floor runs alone)
      ahead[r + 1].result()
    losses.append(float(metrics.train_loss))
    out['num_dropped'] = float(metrics.num_dropped)
    return host

  # The floor: round 0's K x S batches as one stream of plain SGD steps.
  if mode == 'pair':
    idx = data_lib.pack_index(resident, sampler.sample(0), round_num=0,
                              **pack_kw)
    rows = idx.index.reshape(k * s, b)
    batches = jax.device_put(
        {f: a[rows] for f, a in resident.examples.items()})
    mask = jax.device_put(idx.mask.reshape(k * s, b))
    jax.block_until_ready((batches, mask))  # device_put is asynchronous
    out['real_example_fraction'] = float(np.asarray(idx.mask).mean())
    grad_fn = jax.grad(round_lib.make_loss_fn(model, task), has_aux=True)

    def train(params, batches, mask, key):
      def step(carry, xs):
        p, o = carry
        batch, mask_b, i = xs
        g, _ = grad_fn(p, batch, mask_b, jax.random.fold_in(key, i), p, {})
        u, o = client_opt.update(g, o, p)
        return (optax.apply_updates(p, u), o), None
      (p, _), _ = jax.lax.scan(step, (params, client_opt.init(params)),
                               (batches, mask, jnp.arange(k * s)))
      return p
    train = jax.jit(train, donate_argnums=(0,))
    floor_params = [jax.tree.map(jnp.copy, params)]

    def run_floor(r):
      floor_params[0] = train(floor_params[0], batches, mask,
                              jax.random.fold_in(rng, r))
      jax.block_until_ready(floor_params[0])

  out['rss_after_setup_bytes'] = _proc_status_bytes('VmRSS')
  out['hwm_after_setup_bytes'] = _proc_status_bytes('VmHWM')
  out['setup_seconds'] = time.perf_counter() - t_setup

  times, hosts, floors = [], [], []
  t_start = time.perf_counter()
  for r in range(cfg['rounds'] + 1):
    if not _another_round(times, t_start, cfg['budget_seconds'],
                          floors[-1] if floors else 0.0):
      break
    # In pairs, alternate which goes first.
    order = ('round', 'floor') if mode == 'pair' else ('round',)
    for what in (order if r % 2 == 0 else order[::-1]):
      t0 = time.perf_counter()
      if what == 'round':
        hosts.append(run_round(r))
        times.append(time.perf_counter() - t0)
      else:
        run_floor(r)
        floors.append(time.perf_counter() - t0)
  med = statistics.median(times[1:])
  out.update(first_round_seconds=times[0], round_seconds=times[1:],
             pack_seconds=statistics.median(hosts[1:]), train_loss=losses,
             params_finite=finite(state[0].params),
             seconds_per_round=med, rounds_per_second=1.0 / med,
             clients_per_second=k / med,
             compile_seconds=max(times[0] - med, 0.0))
  if mode == 'pair':
    fmed = statistics.median(floors[1:])
    dev = statistics.median(t - h for t, h in zip(times[1:], hosts[1:]))
    out.update(floor_first_seconds=floors[0], floor_seconds=floors[1:],
               floor_seconds_per_round=fmed,
               floor_params_finite=finite(floor_params[0]),
               round_device_seconds=dev,
               efficiency_vs_floor=fmed / med,
               efficiency_vs_floor_device=fmed / dev,
               floor_ms_per_step=fmed / (k * s) * 1e3,
               round_ms_per_client=med / k * 1e3,
               overhead_ms_per_client=(dev - fmed) / k * 1e3)
  out.update(_device_memory_bytes())
  out.update(peak_rss_bytes=_peak_rss_bytes(),
             peak_rss_above_setup_bytes=max(
                 _peak_rss_bytes() - out['hwm_after_setup_bytes'], 0))
  return out


# ---------------------------------------------------------------------------
# Parent side.


def base_cfg(args, num_clients: int) -> dict:
  """A worker's settings from the flags, less model, mode, k and steps."""
  return dict(num_clients=num_clients,
              examples_per_client=args.examples_per_client,
              batch_size=args.batch_size, chunk_size=args.chunk_size,
              client_lr=args.client_lr, server_lr=args.server_lr,
              seed=args.seed, rounds=args.rounds,
              budget_seconds=args.budget_seconds, prefetch=args.prefetch,
              lanes=args.lanes)


def spawn(cfg: dict, timeout: float, log=print) -> dict:
  """Runs one measurement in a fresh interpreter; never raises."""
  cmd = [sys.executable, os.path.abspath(__file__), '--worker',
         json.dumps(cfg)]
  name = (f"{cfg['model']} {cfg['mode']} K={cfg['k']} S={cfg['steps']} "
          f"B={cfg['batch_size']}")
  log(f'[{name}] starting')
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    log(f'[{name}] timed out after {timeout:.0f} s')
    return dict(cfg, error=f'timed out after {timeout:.0f} s')
  wall = time.perf_counter() - t0
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    tail = ' | '.join(proc.stderr.strip().splitlines()[-4:])
    log(f'[{name}] failed (exit {proc.returncode}): {tail}')
    return dict(cfg, error=f'exit {proc.returncode}: {tail}')
  res = json.loads(lines[-1])
  res['wall_seconds'] = wall
  log(f"[{name}] {res['seconds_per_round']:.3f} s/round (rounds "
      + ', '.join(f'{t:.2f}' for t in res['round_seconds'])
      + f"), round 0 {res['first_round_seconds']:.2f} s, peak RSS "
      f"{res['peak_rss_bytes'] / 2**20:.0f} MiB "
      f"(+{res['peak_rss_above_setup_bytes'] / 2**20:.0f} over setup), "
      f'{wall:.0f} s wall'
      + (f", floor {res['floor_seconds_per_round']:.3f} s (rounds "
         + ', '.join(f'{t:.2f}' for t in res['floor_seconds'])
         + f"), efficiency {res['efficiency_vs_floor']:.3f}"
         if 'floor_seconds_per_round' in res else ''))
  return res


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    print(json.dumps(run_worker(json.loads(args.worker))), flush=True)
    return
  sys.path.insert(0, HERE)
  import round_throughput  # pylint: disable=g-import-not-at-top

  model_names = [m.strip() for m in args.models.split(',') if m.strip()]
  cohorts = ints(args.cohorts)
  packed = ints(args.packed_cohorts)
  floors = ints(args.floor_cohorts)
  sweep = ints(args.sweep_steps)
  all_k = cohorts + packed + floors + ([args.sweep_cohort] if sweep else [])
  num_clients = args.num_clients or max(all_k)
  base = base_cfg(args, num_clients)
  log = lambda m: print(m, flush=True)
  log(f'models={model_names} K={cohorts} packed={packed} floor={floors} '
      f'sweep S={sweep} at K={args.sweep_cohort}; data {num_clients} clients '
      f'x {args.examples_per_client}, S={args.steps} B={args.batch_size} '
      f'C={args.chunk_size} rounds={args.rounds} nproc={os.cpu_count()}')

  t_all = time.perf_counter()
  runs: dict[str, dict] = {}   # model -> 'resident'|'packed'|'pair' -> K
  sweeps: dict[str, dict] = {}  # model -> S -> pair result
  for m in model_names:
    runs[m] = {'resident': {}, 'packed': {}, 'pair': {}}
    for mode, ks in (('resident', cohorts), ('packed', packed),
                     ('pair', floors)):
      for k in ks:
        runs[m][mode][k] = spawn(dict(base, model=m, mode=mode, k=k,
                                      steps=args.steps), args.timeout, log)
    if sweep:
      sweeps[m] = {s: spawn(dict(base, model=m, mode='pair',
                                 k=args.sweep_cohort, steps=s),
                            args.timeout, log) for s in sweep}

  ok = lambda r: r is not None and 'error' not in r
  print()
  print(f'{"model":5s} {"path":9s} {"K":>6s} {"s/round":>9s} {"rounds/s":>9s} '
        f'{"clients/s":>10s} {"compile s":>10s} {"pack s":>7s} '
        f'{"peak RSS MiB":>13s} {"+over setup":>12s}')
  for m in model_names:
    for mode in ('resident', 'packed'):
      for k, r in sorted(runs[m][mode].items()):
        if not ok(r):
          print(f'{m:5s} {mode:9s} {k:6d} failed: {r.get("error")}')
          continue
        print(f'{m:5s} {mode:9s} {k:6d} {r["seconds_per_round"]:9.3f} '
              f'{r["rounds_per_second"]:9.3f} {r["clients_per_second"]:10.1f} '
              f'{r["compile_seconds"]:10.2f} {r["pack_seconds"]:7.3f} '
              f'{r["peak_rss_bytes"] / 2**20:13.0f} '
              f'{r["peak_rss_above_setup_bytes"] / 2**20:12.0f}')

  def describe(m, k, s, r):
    print(f'{m}: K={k} S={s}: round {r["seconds_per_round"]:.3f} s, floor '
          f'{r["floor_seconds_per_round"]:.3f} s ({k * s} steps, '
          f'{r["floor_ms_per_step"]:.2f} ms/step): efficiency vs floor '
          f'{r["efficiency_vs_floor"]:.3f} end to end, '
          f'{r["efficiency_vs_floor_device"]:.3f} without host packing; '
          f'round overhead {r["overhead_ms_per_client"]:.2f} ms/client')

  print()
  efficiency, efficiency_device = {}, {}
  for m in model_names:
    efficiency[m], efficiency_device[m] = {}, {}
    for k, r in sorted(runs[m]['pair'].items()):
      if ok(r):
        efficiency[m][str(k)] = r['efficiency_vs_floor']
        efficiency_device[m][str(k)] = r['efficiency_vs_floor_device']
        describe(m, k, args.steps, r)
  sweep_out = {}
  for m, by_s in sweeps.items():
    sweep_out[m] = {}
    for s, r in sorted(by_s.items()):
      if ok(r):
        describe(m, args.sweep_cohort, s, r)
        sweep_out[m][str(s)] = {f: r[f] for f in (
            'seconds_per_round', 'round_device_seconds',
            'floor_seconds_per_round', 'efficiency_vs_floor',
            'efficiency_vs_floor_device', 'floor_ms_per_step',
            'overhead_ms_per_client', 'round_seconds', 'floor_seconds')}

  ran = {m: sorted(k for k, r in runs[m]['resident'].items() if ok(r)
                   and k in cohorts) for m in model_names}
  common = set(cohorts)
  for m in model_names:
    common &= set(ran[m])
  pick = lambda field, mode='resident': {
      m: {str(k): r[field] for k, r in sorted(runs[m][mode].items()) if ok(r)}
      for m in model_names}
  summary = dict(
      benchmark='scaling',
      config=dict(models=model_names, cohorts=cohorts, packed_cohorts=packed,
                  floor_cohorts=floors, sweep_steps=sweep,
                  sweep_cohort=args.sweep_cohort, num_clients=num_clients,
                  examples_per_client=args.examples_per_client,
                  batch_size=args.batch_size, local_steps=args.steps,
                  chunk_size=args.chunk_size, rounds=args.rounds,
                  budget_seconds=args.budget_seconds,
                  client_lr=args.client_lr, server_lr=args.server_lr,
                  pixels='float32', seed=args.seed, prefetch=args.prefetch,
                  lanes=args.lanes),
      max_clients_per_round=max(common) if common else None,
      max_clients_per_round_per_model={m: max(v) if v else None
                                       for m, v in ran.items()},
      peak_rss_bytes=pick('peak_rss_bytes'),
      peak_rss_above_setup_bytes=pick('peak_rss_above_setup_bytes'),
      device_peak_bytes_in_use={
          m: {str(k): r.get('device_peak_bytes_in_use')
              for k, r in sorted(runs[m]['resident'].items()) if ok(r)}
          for m in model_names},
      seconds_per_round=pick('seconds_per_round'),
      rounds_per_second=pick('rounds_per_second'),
      clients_per_second=pick('clients_per_second'),
      compile_seconds=pick('compile_seconds'),
      pack_seconds=pick('pack_seconds'),
      round_seconds=pick('round_seconds'),
      packed=dict(peak_rss_bytes=pick('peak_rss_bytes', 'packed'),
                  peak_rss_above_setup_bytes=pick(
                      'peak_rss_above_setup_bytes', 'packed'),
                  seconds_per_round=pick('seconds_per_round', 'packed')),
      floor_seconds=pick('floor_seconds_per_round', 'pair'),
      paired_round_seconds=pick('seconds_per_round', 'pair'),
      efficiency_vs_floor=efficiency,
      efficiency_vs_floor_device=efficiency_device,
      overhead_ms_per_client=pick('overhead_ms_per_client', 'pair'),
      step_sweep=sweep_out,
      params_finite={m: {f'{mode}_{k}': r.get('params_finite')
                         for mode in runs[m]
                         for k, r in sorted(runs[m][mode].items()) if ok(r)}
                     for m in model_names},
      errors=dict({f'{m}_{mode}_{k}': r['error'] for m in model_names
                   for mode in runs[m] for k, r in runs[m][mode].items()
                   if not ok(r)},
                  **{f'{m}_sweep_S{st}': r['error'] for m in sweeps
                     for st, r in sweeps[m].items() if not ok(r)}),
      total_seconds=time.perf_counter() - t_all,
      machine=round_throughput.machine_info(),
      command=' '.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]))
  round_throughput.emit_json(summary, args.out)


if __name__ == '__main__':
  main()
