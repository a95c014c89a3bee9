"""Seconds per round: fedjax_eff vs FedJAX, pfl-research and Flower.

The pfl-research CIFAR-10 benchmark shape, the same work on every side:
1,000 clients x 50 CIFAR-10-shaped examples (synthetic: uniform 32x32x3
float32 pixels and random labels from 10 classes, a pure function of
`(seed, client)`, `peers_workers/common.py:client_data`; nothing downloads),
50 clients per round, 1 local epoch at batch 10 (5 local steps, 250 client
steps per round), client SGD 0.1, server SGD 1.0 (= FedAvg), updates
weighted by examples, dropout on, no evaluation. The model everywhere is
pfl-research's `simple_cnn` for CIFAR-10 (apple/pfl-research
`benchmarks/model/pytorch/cnn.py`): conv3x3(32), ReLU, conv3x3(64), ReLU,
maxpool 2x2, dropout .25, dense 128, ReLU, dropout .5, dense 10 -
1,626,442 parameters; every side's count is printed and checked.

Variants:

* `fedjax_eff_C{..}`: `fedjax_eff.core.build_round(..., chunk_size=C)` with
  `models.CNN` (that same architecture; im2col convolution and
  reshape-max pooling, `fedjax_eff/models/layers.py`), timed end to end as in
  `round_throughput.py`: sample the cohort, pack it into `[K, S, B, ...]`
  on the host, run the round, block until the new parameters are ready;
* `fedjax`: FedJAX 0.0.17's `fed_avg.federated_averaging` on its default
  jit `for_each_client` backend, its haiku CNN module (`hk.Conv2D`), with
  the shims of `fedjax_shims.py` (`peers_workers/fedjax_worker.py`);
* `pfl`, `pfl_t1`: pfl-research 0.6's simulated `FederatedAveraging` with its
  PyTorch backend on CPU (`peers_workers/pfl_worker.py`), with PyTorch's
  default thread count (`pfl`) and with one thread (`pfl_t1`; on a shared
  2-core machine PyTorch's OpenMP threads can collapse when another process
  holds a core, see RESULTS.md); the faster one sets `ratio_vs_pfl`;
* `flower`: Flower's Ray simulation engine (`flwr.simulation.
  start_simulation`) with its `FedAvg` strategy and PyTorch `NumPyClient`s,
  default resources of 1 CPU per virtual client
  (`peers_workers/flower_worker.py`).

The `femnist` workload (`--workload femnist`; where vmapped clients should
win): the overhead-bound counterpart. LEAF FEMNIST's shape, 3,400 clients
(its writer count) x 20 synthetic FEMNIST-shaped examples (uniform 28x28x1
float32 pixels, random labels from 62 classes, `common.client_data`), 1
local epoch at batch 10 (2 local steps), client SGD 0.1, server SGD 1.0,
weighted by examples, clients per round swept over `--cohorts` (default
100 and 1,000; each cohort size timed in turn, its variants interleaved).
Model: McMahan et al.'s 2NN MLP 784-200-200-62 (ReLU), 209,662 parameters:
fedjax_eff `models.MLP(hidden=(200, 200))`, FedJAX its haiku
`emnist.create_dense_model(hidden_units=200)`, pfl and Flower
`torch_cnn.mlp_2nn`; every count is printed and checked. A client step is
~13 MFLOP here with the backward (against ~1 GFLOP for the CIFAR CNN), so
what each framework spends per client around the arithmetic (dispatch,
host batching, Python, weight copies, scheduling) weighs far more. fedjax_eff runs at
C = 1, 100 and K (`--chunk_sizes 1,100,all`). Ratios are per cohort size;
the JSON (keyed by cohort size) also goes to
`benchmarks/results/peers_femnist.json` unless `--out` says otherwise.

Each peer runs in its own process from its own venv under
`benchmarks/.venvs/<name>` (fedjax: fedjax 0.0.17 + dm-haiku with this
venv's jax/jaxlib/optax/numpy; pfl: pfl 0.6 + torch 2.13.0 CPU wheel; flower:
flwr[simulation] + torch 2.13.0 CPU wheel). A missing venv is an error
(reported, that peer's ratio null) unless `--install` is given, which
creates it with pip. Peers answer a line protocol (`round R` -> seconds
measured in the peer's process; pfl and Flower own their training loops and
report from their end-of-round hooks, waiting there for the next request),
so rounds are interleaved round-robin across all variants as in
`round_throughput.py`, spreading the slow spells of a shared machine over
every variant. Round 0 (compilation, Ray start-up, ...) is timed apart;
then `--rounds` rounds per variant; the median is reported. Nothing here
asserts a timing.

Run:

  python benchmarks/peers.py                                  # fedjax_eff only
  python benchmarks/peers.py --with fedjax,pfl,flower --install  # first time
  python benchmarks/peers.py --with fedjax,pfl,flower --rounds 5
  python benchmarks/peers.py --workload femnist --with fedjax,pfl,flower \
      --rounds 3                                      # cohorts 100, 1000

Prints a table (s/round, compile s, parameters per variant), the ratios
(peer s/round / best fedjax_eff s/round; > 1: fedjax_eff is faster), and as
its last line one JSON object: `ratio_vs_fedjax`, `ratio_vs_pfl`,
`ratio_vs_flower` (null where a peer did not run; the reason is printed and
in `peer_errors`), `seconds_per_round` and `compile_seconds` per variant,
`num_params` per variant, the machine and the versions. `--out PATH` also
writes it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_eff import core
from fedjax_eff import data as data_lib
from fedjax_eff import models

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(HERE, 'peers_workers')
sys.path.insert(0, HERE)
sys.path.insert(0, WORKERS)
import common  # noqa: E402  (peers_workers/, shared with every peer)
import fedjax_shims  # noqa: E402
import round_throughput as rt  # noqa: E402

VENVS = os.path.join(HERE, '.venvs')
FEMNIST_OUT = os.path.join(HERE, 'results', 'peers_femnist.json')
TORCH_PIN = 'torch==2.13.0+cpu'
TORCH_CPU_INDEX = 'https://download.pytorch.org/whl/cpu'
PEERS = ('fedjax', 'pfl', 'flower')
# name -> (pip requirements, import check printing the key versions)
PIP_PEERS = {
    'pfl': (['pfl==0.6.*', TORCH_PIN],
            'import pfl, torch, importlib.metadata as m; '
            'print(m.version("pfl"), torch.__version__)'),
    'flower': (['flwr[simulation]==1.41.*', TORCH_PIN],
               'import flwr, ray, torch, importlib.metadata as m; '
               'print(m.version("flwr"), ray.__version__, torch.__version__)'),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--with', dest='peers', default='',
                 help=f'comma-separated peers to time: {",".join(PEERS)}.')
  p.add_argument('--install', action='store_true',
                 help='create (pip install) missing peer venvs under '
                 f'{os.path.relpath(VENVS)}; without it a missing venv is '
                 'reported and that peer skipped.')
  common.add_workload_flags(p)
  p.add_argument('--rounds', type=int, default=5,
                 help='timed rounds per variant, after one warm-up round.')
  p.add_argument('--chunk_sizes', default=None,
                 help="comma-separated C for fedjax_eff; 'all' = K "
                 "(default: cifar10 '1,10'; femnist '1,100,all', widths "
                 'above K or repeated are dropped).')
  p.add_argument('--cohorts', default='100,1000',
                 help='femnist only: comma-separated clients per round, '
                 'timed one after the other (each interleaved).')
  p.add_argument('--pfl_threads', default='default,1',
                 help="torch threads of the pfl variants: 'default' "
                 '(torch picks; variant `pfl`) and/or N (variant `pfl_tN`).')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default=None,
                 help='also write the JSON here (femnist default: '
                 f'{os.path.relpath(FEMNIST_OUT)}).')
  args = p.parse_args(argv)
  common.resolve_workload(args)
  if args.chunk_sizes is None:
    args.chunk_sizes = '1,10' if args.workload == 'cifar10' else '1,100,all'
  if args.out is None and args.workload == 'femnist':
    args.out = FEMNIST_OUT
  args.peers = [s.strip() for s in args.peers.split(',') if s.strip()]
  bad = [s for s in args.peers if s not in PEERS]
  if bad:
    p.error(f'unknown peers {bad}; choose from {PEERS}.')
  return args


# ---------------------------------------------------------------------------
# Peer venvs (created only with --install).


def _venv_python(name: str) -> str:
  return os.path.join(VENVS, name, 'bin', 'python')


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items()
         if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                        env=env)


def _probe(name: str) -> str | None:
  python = _venv_python(name)
  if not os.path.exists(python):
    return None
  if name == 'fedjax':
    return fedjax_shims._probe(python)  # pylint: disable=protected-access
  try:
    out = _run([python, '-c', PIP_PEERS[name][1]], 300)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def _cuda_packages(name: str) -> list[str]:
  out = _run([_venv_python(name), '-m', 'pip', 'list', '--format=freeze'],
             120)
  return [l for l in out.stdout.splitlines()
          if l.lower().startswith(('nvidia', 'triton', 'cuda'))]


def ensure_peer(name: str, install: bool) -> str:
  """The peer venv's python; creates the venv only if `install`.

  Raises RuntimeError with the reason when the venv is missing/broken.
  """
  version = _probe(name)
  if version:
    return _venv_python(name)
  venv = os.path.join(VENVS, name)
  if not install:
    raise RuntimeError(f'{os.path.relpath(venv)} missing or broken; rerun '
                       'with --install to create it.')
  if name == 'fedjax':
    pins = [f'jax=={jax.__version__}',
            f'jaxlib=={importlib.metadata.version("jaxlib")}',
            f'optax=={importlib.metadata.version("optax")}',
            f'numpy=={np.__version__}']
    return fedjax_shims.ensure_venv(venv, pins,
                                    log=lambda m: print(m, flush=True))
  reqs = PIP_PEERS[name][0]
  print(f'[{name}] creating {os.path.relpath(venv)}: {" ".join(reqs)}',
        flush=True)
  pip = [_venv_python(name), '-m', 'pip', 'install', '--quiet',
         '--disable-pip-version-check']

  def step(cmd):
    try:
      out = _run(cmd, 3600)
    except (OSError, subprocess.TimeoutExpired) as e:
      return f'{" ".join(cmd[:5])}... failed: {e}'
    if out.returncode != 0:
      tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
      return (f'{" ".join(cmd[:5])}... exited {out.returncode}: '
              + ' | '.join(tail))
    return None

  err = step([sys.executable, '-m', 'venv', '--clear', venv])
  if err:
    raise RuntimeError(err)
  # The CPU wheel (`+cpu`) comes from PyTorch's CPU index (or a local
  # wheelhouse); failing that, PyPI's plain wheel, checked for CUDA below.
  err = step(pip + ['--extra-index-url', TORCH_CPU_INDEX, *reqs])
  if err:
    print(f'[{name}] {err}; retrying with torch from PyPI', flush=True)
    err = step(pip + [r.replace('+cpu', '') for r in reqs])
  if err:
    raise RuntimeError(err)
  cuda = _cuda_packages(name)
  if cuda:
    print(f'[{name}] warning: CUDA packages installed: {cuda}', flush=True)
  if not _probe(name):
    raise RuntimeError(f'{name} does not import in {os.path.relpath(venv)}.')
  return _venv_python(name)


# ---------------------------------------------------------------------------
# Peer processes.


def peer_variant(name: str, peer: str, script: str, args,
                 env_extra: dict | None = None):
  """(Variant, info) or raises RuntimeError with the reason."""
  python = ensure_peer(peer, args.install)
  proc = rt.ServedProcess(name, [python, os.path.join(WORKERS, script),
                                 *common.worker_argv(args)], env_extra)
  return rt.served_variant(name, proc, args.rounds)


# ---------------------------------------------------------------------------
# fedjax_eff.


def build_clients(args) -> data_lib.FederatedData:
  """`args.num_clients` synthetic clients of `args.workload`."""
  clients = {}
  for i in range(args.num_clients):
    x, y = common.client_data(i, args.examples_per_client, args.seed,
                              args.workload)
    clients[common.client_id(i)] = {'x': x, 'y': y}
  return data_lib.FederatedData(clients)


class Workload:
  """The synthetic clients; cohort sampling and packing."""

  def __init__(self, args, data: data_lib.FederatedData | None = None):
    self.args = args
    self.data = data if data is not None else build_clients(args)
    self.sampler = data_lib.CohortSampler(self.data.num_clients,
                                          args.clients_per_round, args.seed)
    self.steps = math.ceil(args.epochs * args.examples_per_client /
                           args.batch_size)
    self.policy_small = 'repeat' if args.epochs > 1 else 'pad'
    self.pack_seconds: list[float] = []

  def cohort(self, round_num: int):
    t0 = time.perf_counter()
    cohort = data_lib.pack(
        self.data, self.sampler.sample(round_num), steps=self.steps,
        batch_size=self.args.batch_size, seed=self.args.seed,
        round_num=round_num, policy_small=self.policy_small)
    self.pack_seconds.append(time.perf_counter() - t0)
    return cohort


def build_model(workload: str = 'cifar10'):
  """cifar10: pfl-research's simple_cnn, `models.CNN`'s default layers, 10
  classes; femnist: McMahan et al.'s 2NN, `models.MLP` 784-200-200-62."""
  w = common.WORKLOADS[workload]
  if w['model'] == 'mlp':
    return models.get_model('mlp', w['num_classes'], hidden=w['mlp_hidden'])
  return models.get_model('cnn', common.NUM_CLASSES, features=(32, 64),
                          hidden=128, dropout=True, use_im2col=True)


def fedjax_eff_variant(name, args, work: Workload, chunk: int):
  model = build_model(args.workload)
  fns = core.build_round(
      model, core.classification(), core.identity(),
      core.make_optimizer('sgd', args.client_lr),
      core.make_optimizer('fedavg', args.server_lr), chunk_size=chunk)
  params = model.init({'params': jax.random.key(args.seed)},
                      jnp.zeros((1,) + common.image_shape(args.workload))
                      )['params']
  num_params = int(sum(np.size(x) for x in jax.tree.leaves(params)))
  state = [fns.init(params)]
  rng = jax.random.key(args.seed + 1)

  def run_round(r):
    state[0], metrics = fns.round_step(state[0], work.cohort(r),
                                       jax.random.fold_in(rng, r))
    jax.block_until_ready((state[0].params, metrics))

  finite = rt._finite  # pylint: disable=protected-access
  return rt.Variant(name, run_round, args.rounds,
                    finite=lambda: finite(state[0].params)), num_params


# ---------------------------------------------------------------------------


def chunk_sizes(spec: str, k: int) -> list[tuple[str, int]]:
  """femnist: `rt.chunk_sizes`, less widths above K and repeats of a width
  (e.g. 'all' = 100 when K = 100 and 100 is listed)."""
  out, seen = [], set()
  for label, c in rt.chunk_sizes(spec, k):
    if c > k or c in seen:
      continue
    seen.add(c)
    out.append((label, c))
  return out


def run_cohort(args, work: Workload) -> dict:
  """Times every variant at `args.clients_per_round` clients per round,
  interleaved; prints the table and ratios; returns what the JSON needs."""
  k = args.clients_per_round
  expected = common.num_params(args.workload)
  variants: list = []
  num_params: dict[str, int] = {}
  widths = (chunk_sizes(args.chunk_sizes, k) if args.workload == 'femnist'
            else rt.chunk_sizes(args.chunk_sizes, k))
  for label, c in widths:
    v, n = fedjax_eff_variant(f'fedjax_eff_C{label}', args, work, c)
    variants.append(v)
    num_params[v.name] = n

  peer_errors: dict[str, str] = {}
  peer_info: dict[str, dict] = {}
  specs = []  # (variant name, peer, script, env)
  if 'fedjax' in args.peers:
    specs.append(('fedjax', 'fedjax', 'fedjax_worker.py', None))
  if 'pfl' in args.peers:
    for t in [s.strip() for s in args.pfl_threads.split(',') if s.strip()]:
      if t == 'default':
        specs.append(('pfl', 'pfl', 'pfl_worker.py', None))
      else:
        specs.append((f'pfl_t{int(t)}', 'pfl', 'pfl_worker.py',
                      {'OMP_NUM_THREADS': str(int(t)),
                       'MKL_NUM_THREADS': str(int(t))}))
  if 'flower' in args.peers:
    specs.append(('flower', 'flower', 'flower_worker.py', None))
  for name, peer, script, env in specs:
    try:
      v, info = peer_variant(name, peer, script, args, env)
    except Exception as e:  # pylint: disable=broad-except
      peer_errors[name] = f'{type(e).__name__}: {e}'
      print(f'[{name}] not timed: {peer_errors[name]}', flush=True)
      continue
    variants.append(v)
    peer_info[name] = info

  results = rt.time_variants(variants)
  for v in variants:
    if v.error is not None and v.name in peer_info:
      peer_errors[v.name] = v.error
  for name, info in peer_info.items():
    if 'num_params' in info:
      num_params[name] = info['num_params']

  ours = {n: r for n, r in results.items() if n.startswith('fedjax_eff_')}
  if not ours:
    raise SystemExit('no fedjax_eff variant ran: '
                     + json.dumps({v.name: v.error for v in variants}))
  best_name = min(ours, key=lambda n: ours[n]['seconds_per_round'])
  best = ours[best_name]['seconds_per_round']
  params_equal = all(n == expected for n in num_params.values())

  def ratio(peer):
    """Fastest variant of `peer` / best fedjax_eff; (ratio, variant)."""
    names = [n for n in results
             if n == peer or n.startswith(peer + '_t')]
    if not names:
      return None, None
    fastest = min(names, key=lambda n: results[n]['seconds_per_round'])
    return results[fastest]['seconds_per_round'] / best, fastest

  ratios = {p: ratio(p) for p in PEERS}

  print()
  print(f'{"variant":18s} {"s/round":>9s} {"min":>8s} {"compile s":>10s} '
        f'{"params":>10s} {"peer/this":>10s}')
  for n, r in results.items():
    rel = best / r['seconds_per_round']
    print(f'{n:18s} {r["seconds_per_round"]:9.3f} {r["min_seconds"]:8.3f} '
          f'{r["compile_seconds"]:10.2f} {num_params.get(n, 0):10,d} '
          f'{rel:9.2f}x')
  print('(peer/this: best fedjax_eff s/round / this s/round; < 1 means '
        'slower than fedjax_eff)')
  print(f'parameters: every side {expected:,d}: '
        + ('yes' if params_equal else f'NO: {num_params}'))
  print(f'pack (host) median {statistics.median(work.pack_seconds) * 1e3:.1f}'
        ' ms/round, included in every fedjax_eff round')
  print(f'best fedjax_eff: {best_name} {best:.3f} s/round')
  # The targets were set for the cifar10 shape.
  targets = ({'fedjax': 1.5, 'pfl': 5.0, 'flower': 20.0}
             if args.workload == 'cifar10' else {})
  for p in PEERS:
    if p not in args.peers:
      continue
    r, via = ratios[p]
    errs = {n: e for n, e in peer_errors.items()
            if n == p or n.startswith(p + '_t')}
    target = f'; target >= {targets[p]}x' if p in targets else ''
    if r is None:
      print(f'ratio vs {p}: n/a ({errs})')
    else:
      print(f'ratio vs {p}: {r:.2f}x (via {via}{target})'
            + (f'; errors: {errs}' if errs else ''))
  return dict(results=results, ratios=ratios, best_name=best_name,
              num_params=num_params, params_equal=params_equal,
              peer_errors=peer_errors, peer_info=peer_info,
              errors={v.name: v.error for v in variants if v.error},
              pack_seconds=statistics.median(work.pack_seconds))


def peers_machine(peer_info: dict) -> dict:
  machine = rt.machine_info()
  machine['peers'] = {n: {k2: v2 for k2, v2 in i.items()
                          if k2 not in ('num_params',)}
                      for n, i in peer_info.items()}
  return machine


def command_line() -> str:
  return ' '.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def main_cifar10(args, t_start):
  work = Workload(args)
  k = args.clients_per_round
  print(f'clients={args.num_clients} K={k} examples/client='
        f'{args.examples_per_client} batch={args.batch_size} S={work.steps} '
        f'rounds={args.rounds} peers={args.peers or "none"} '
        f'backend={jax.default_backend()} nproc={os.cpu_count()}', flush=True)
  c = run_cohort(args, work)
  results, ratios = c['results'], c['ratios']
  summary = dict(
      benchmark='peers_pfl_cifar10',
      config=dict(num_clients=args.num_clients, clients_per_round=k,
                  examples_per_client=args.examples_per_client,
                  batch_size=args.batch_size, epochs=args.epochs,
                  local_steps=work.steps, rounds=args.rounds,
                  client_lr=args.client_lr, server_lr=args.server_lr,
                  chunk_sizes=args.chunk_sizes, peers=args.peers,
                  pfl_threads=args.pfl_threads, seed=args.seed),
      ratio_vs_fedjax=ratios['fedjax'][0],
      ratio_vs_pfl=ratios['pfl'][0],
      ratio_vs_flower=ratios['flower'][0],
      ratio_via={p: ratios[p][1] for p in PEERS},
      best_fedjax_eff=c['best_name'],
      seconds_per_round={n: r['seconds_per_round']
                         for n, r in results.items()},
      min_seconds_per_round={n: r['min_seconds'] for n, r in results.items()},
      round_seconds={n: r['round_seconds'] for n, r in results.items()},
      compile_seconds={n: r['compile_seconds'] for n, r in results.items()},
      pack_seconds_per_round=c['pack_seconds'],
      num_params=c['num_params'], num_params_equal=c['params_equal'],
      params_finite={n: r.get('params_finite') for n, r in results.items()},
      peer_errors=c['peer_errors'],
      errors=c['errors'],
      total_seconds=time.perf_counter() - t_start,
      machine=peers_machine(c['peer_info']),
      command=command_line())
  rt.emit_json(summary, args.out)


def main_femnist(args, t_start):
  """The cohort sweep: one interleaved timing per cohort size, in turn."""
  cohorts = [int(s) for s in args.cohorts.split(',') if s.strip()]
  print(f'workload=femnist clients={args.num_clients} cohorts={cohorts} '
        f'examples/client={args.examples_per_client} '
        f'batch={args.batch_size} epochs={args.epochs} rounds={args.rounds} '
        f'chunk_sizes={args.chunk_sizes} peers={args.peers or "none"} '
        f'backend={jax.default_backend()} nproc={os.cpu_count()}', flush=True)
  t0 = time.perf_counter()
  data = build_clients(args)
  print(f'built {args.num_clients} clients in '
        f'{time.perf_counter() - t0:.1f} s', flush=True)
  per: dict[str, dict] = {}
  cohort_seconds: dict[str, float] = {}
  peer_info: dict[str, dict] = {}
  steps = None
  for k in cohorts:
    t_k = time.perf_counter()
    args_k = argparse.Namespace(**{**vars(args), 'clients_per_round': k})
    work = Workload(args_k, data)
    steps = work.steps
    print(f'\n=== K = {k} clients per round (S = {work.steps} local steps, '
          f'{k * work.steps} client steps per round) ===', flush=True)
    per[str(k)] = run_cohort(args_k, work)
    cohort_seconds[str(k)] = time.perf_counter() - t_k
    for n, i in per[str(k)]['peer_info'].items():
      peer_info.setdefault(n, i)

  def by_k(fn):
    return {k: fn(c) for k, c in per.items()}

  def per_variant(key):
    return by_k(lambda c: {n: r[key] for n, r in c['results'].items()})

  print('\nsummary (peer s/round / best fedjax_eff s/round; > 1: fedjax_eff '
        'is faster)')
  print(f'{"K":>6s} {"best fedjax_eff":>22s} '
        + ' '.join(f'{p:>16s}' for p in PEERS))
  for k, c in per.items():
    best = c['results'][c['best_name']]['seconds_per_round']
    cells = []
    for p in PEERS:
      r, via = c['ratios'][p]
      cells.append(f'{"n/a" if r is None else f"{r:.2f}x ({via})":>16s}')
    print(f'{k:>6s} {c["best_name"][len("fedjax_eff_"):]:>8s} '
          f'{best:8.3f} s/rd ' + ' '.join(cells))

  summary = dict(
      benchmark='peers_femnist',
      config=dict(workload='femnist', num_clients=args.num_clients,
                  cohorts=cohorts,
                  examples_per_client=args.examples_per_client,
                  batch_size=args.batch_size, epochs=args.epochs,
                  local_steps=steps, rounds=args.rounds,
                  client_lr=args.client_lr, server_lr=args.server_lr,
                  model='2NN MLP 784-200-200-62 (ReLU)',
                  chunk_sizes=args.chunk_sizes, peers=args.peers,
                  pfl_threads=args.pfl_threads, seed=args.seed),
      ratio_vs_fedjax=by_k(lambda c: c['ratios']['fedjax'][0]),
      ratio_vs_pfl=by_k(lambda c: c['ratios']['pfl'][0]),
      ratio_vs_flower=by_k(lambda c: c['ratios']['flower'][0]),
      ratio_via=by_k(lambda c: {p: c['ratios'][p][1] for p in PEERS}),
      best_fedjax_eff=by_k(lambda c: c['best_name']),
      seconds_per_round=per_variant('seconds_per_round'),
      min_seconds_per_round=per_variant('min_seconds'),
      round_seconds=per_variant('round_seconds'),
      compile_seconds=per_variant('compile_seconds'),
      pack_seconds_per_round=by_k(lambda c: c['pack_seconds']),
      num_params=by_k(lambda c: c['num_params']),
      num_params_expected=common.num_params('femnist'),
      num_params_equal=all(c['params_equal'] for c in per.values()),
      params_finite=by_k(lambda c: {n: r.get('params_finite')
                                    for n, r in c['results'].items()}),
      peer_errors=by_k(lambda c: c['peer_errors']),
      errors=by_k(lambda c: c['errors']),
      cohort_seconds=cohort_seconds,
      total_seconds=time.perf_counter() - t_start,
      machine=peers_machine(peer_info),
      command=command_line())
  rt.emit_json(summary, args.out)


def main(argv=None):
  args = parse_args(argv)
  t_start = time.perf_counter()
  if args.workload == 'femnist':
    main_femnist(args, t_start)
  else:
    main_cifar10(args, t_start)


if __name__ == '__main__':
  main()
