"""Seconds per federated round: fedjax_eff vs a per-client loop vs FedJAX.

Same model, data and cohort for every variant:

* `fedjax_eff_C{1,8,all}`: `fedjax_eff.core.build_round(..., chunk_size=C)`,
  the whole cohort in one jitted `round_step` (a `lax.scan` over K/C chunks,
  each a `vmap` over C clients, each a `lax.scan` over S local steps);
* `reference_loop`: `fedjax_eff.core.build_reference_round`, a Python loop
  with one jitted call per client step (what FedJAX's jit backend does);
* `fedjax` (with `--with-fedjax`): FedJAX 0.0.17 itself, its own
  `fed_avg.federated_averaging` on its default jit `for_each_client` backend
  and its own haiku EMNIST CNN (`emnist.create_conv_model`), run in its own
  venv `benchmarks/.venvs/fedjax` (made on first use, about 650 MB) with the
  shims of `benchmarks/fedjax_shims.py`.

The conv layers differ by design: fedjax_eff's CNN uses an im2col convolution
(slices + matmul; XLA:CPU runs conv weight-gradients inside loops slowly),
FedJAX's haiku CNN uses `lax.conv`. `--lax_conv` adds `..._lax_conv` variants
of fedjax_eff and of the reference loop with `flax.linen.Conv` (lax conv) so
the conv choice is visible apart from the engine.

Workload (defaults): synthetic EMNIST (uniform 28x28x1 pixels, 62 labels, no
download), 100 clients x 32 examples, all 100 clients every round, batch 16,
1 epoch (S = 2 local steps), client SGD 0.1, server FedAvg (SGD 1.0),
examples-weighted mean, dropout on. A timed round is end to end: sample the
cohort, pack it into `[K, S, B, ...]` (host), run the round, block until the
new server parameters are ready. Each variant's first round (compilation)
is timed apart; then `--rounds` rounds per variant are timed one by one,
round-robin over the variants (order rotated every round, FedJAX answering
from its own process), so that a slow spell of a shared machine hits every
variant alike; the median is reported. Nothing here asserts a timing.

Run:

  python benchmarks/round_throughput.py                 # fedjax_eff + loop
  python benchmarks/round_throughput.py --with-fedjax   # + FedJAX 0.0.17
  python benchmarks/round_throughput.py --model mlp --chunk_sizes 1,all

Prints a table, then ratios (> 1: fedjax_eff is faster), and as its last
line one JSON object: `seconds_per_round` and `compile_seconds` per variant,
`ratio_vs_reference_loop` and `ratio_vs_fedjax` (other's s/round / best
fedjax_eff s/round; null without `--with-fedjax` or if FedJAX failed), the
same per variant, and the machine and versions. `--out PATH` also writes it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_eff
from fedjax_eff import core
from fedjax_eff import data as data_lib
from fedjax_eff import models

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fedjax_shims  # noqa: E402  (benchmarks/ helper, shared with FedJAX)

HERE = os.path.dirname(os.path.abspath(__file__))
FEDJAX_VENV = os.path.join(HERE, '.venvs', 'fedjax')


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', choices=('cnn', 'mlp'), default='cnn',
                 help='EMNIST CNN (FedJAX create_conv_model) or MLP 200-200.')
  p.add_argument('--clients_per_round', type=int, default=100,
                 help='K; the data has exactly K clients, all used per round.')
  p.add_argument('--examples_per_client', type=int, default=32)
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--epochs', type=int, default=1)
  p.add_argument('--client_lr', type=float, default=0.1,
                 help='client SGD learning rate.')
  p.add_argument('--server_lr', type=float, default=1.0,
                 help='server FedAvg (SGD) learning rate.')
  p.add_argument('--rounds', type=int, default=5,
                 help='timed rounds per variant, after one warm-up round.')
  p.add_argument('--chunk_sizes', default='1,8,all',
                 help="comma-separated C for fedjax_eff; 'all' = K.")
  p.add_argument('--lax_conv', action='store_true',
                 help='also time fedjax_eff C=1 and the reference loop with '
                 'flax nn.Conv (lax conv) instead of im2col (CNN only).')
  p.add_argument('--lax_conv_rounds', type=int, default=2,
                 help='timed rounds of fedjax_eff_C1_lax_conv (minutes each '
                 'on CPU: conv weight-gradients inside lax.scan are slow).')
  p.add_argument('--no_reference', action='store_true',
                 help='skip the per-client reference loop.')
  p.add_argument('--with-fedjax', dest='with_fedjax', action='store_true',
                 help=f'also time FedJAX {fedjax_shims.FEDJAX_VERSION} in '
                 f'{os.path.relpath(FEDJAX_VENV)} (created if missing).')
  p.add_argument('--fedjax_venv', default=FEDJAX_VENV)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default=None, help='also write the JSON here.')
  return p.parse_args(argv)


def chunk_sizes(spec: str, k: int) -> list[tuple[str, int]]:
  out = []
  for tok in spec.split(','):
    tok = tok.strip()
    if not tok:
      continue
    c = k if tok == 'all' else int(tok)
    out.append(('all' if tok == 'all' else str(c), c))
  return out


def build_model(args, use_im2col: bool = True):
  if args.model == 'cnn':
    return models.get_model('cnn', fedjax_shims.NUM_CLASSES,
                            use_im2col=use_im2col)
  return models.get_model('mlp', fedjax_shims.NUM_CLASSES, hidden=(200, 200))


class Workload:
  """Data, cohort sampler and packing shared by fedjax_eff and the loop."""

  def __init__(self, args):
    self.args = args
    k = args.clients_per_round
    self.data = data_lib.FederatedData(fedjax_shims.synthetic_emnist(
        k, args.examples_per_client, args.seed))
    self.sampler = data_lib.CohortSampler(self.data.num_clients, k,
                                          args.seed)
    # As FedJAX's shuffle_repeat_batch(num_epochs=E, drop_remainder=False):
    # ceil(E * n / B) batches; with E > 1 the examples cycle ('repeat').
    self.steps = math.ceil(args.epochs * args.examples_per_client /
                           args.batch_size)
    self.policy_small = 'repeat' if args.epochs > 1 else 'pad'
    self.pack_seconds: list[float] = []

  def cohort(self, round_num: int):
    t0 = time.perf_counter()
    ids = self.sampler.sample(round_num)
    cohort = data_lib.pack(
        self.data, ids, steps=self.steps, batch_size=self.args.batch_size,
        seed=self.args.seed, round_num=round_num,
        policy_small=self.policy_small)
    self.pack_seconds.append(time.perf_counter() - t0)
    return cohort


def init_params(model, seed: int):
  x = jnp.zeros((1, 28, 28, 1), jnp.float32)
  return model.init({'params': jax.random.key(seed)}, x)['params']


class Variant:
  """One contender: `run_round(r)` blocks until round r's results are ready."""

  def __init__(self, name, run_round, rounds, finite=None, close=None,
               own_clock=None):
    self.name, self.run_round, self.rounds = name, run_round, rounds
    self.finite = finite or (lambda: None)
    self.close = close or (lambda: None)
    # round -> seconds measured by the variant itself (FedJAX's process),
    # used instead of the parent's clock when present.
    self.own_clock: dict[int, float] = own_clock if own_clock is not None \
        else {}
    self.first = None
    self.times: list[float] = []
    self.error = None


def _finite(tree) -> bool:
  return bool(all(np.all(np.isfinite(np.asarray(x)))
                  for x in jax.tree.leaves(tree)))


def fedjax_eff_variant(name, args, work: Workload, chunk: int,
                       use_im2col=True, rounds=None) -> Variant:
  model = build_model(args, use_im2col)
  fns = core.build_round(
      model, core.classification(), core.identity(),
      core.make_optimizer('sgd', args.client_lr),
      core.make_optimizer('fedavg', args.server_lr), chunk_size=chunk)
  state = [fns.init(init_params(model, args.seed))]
  rng = jax.random.key(args.seed + 1)

  def run_round(r):
    state[0], metrics = fns.round_step(state[0], work.cohort(r),
                                       jax.random.fold_in(rng, r))
    jax.block_until_ready((state[0].params, metrics))

  return Variant(name, run_round, rounds or args.rounds,
                 finite=lambda: _finite(state[0].params))


def reference_variant(name, args, work: Workload, use_im2col=True) -> Variant:
  model = build_model(args, use_im2col)
  server_opt = core.make_optimizer('fedavg', args.server_lr)
  ref = core.build_reference_round(
      model, core.classification(), core.identity(),
      core.make_optimizer('sgd', args.client_lr), server_opt)
  params = init_params(model, args.seed)
  state = [core.ServerState(params, server_opt.init(params),
                            jnp.zeros((), jnp.int32))]
  rng = jax.random.key(args.seed + 1)

  def run_round(r):
    state[0], _ = ref(state[0], work.cohort(r), jax.random.fold_in(rng, r))
    jax.block_until_ready(state[0].params)

  return Variant(name, run_round, args.rounds,
                 finite=lambda: _finite(state[0].params))


class ServedProcess:
  """A peer in its own venv, one JSON answer per line-request on stdin
  (`round R` -> `{"seconds": ...}`, `info`), first answering `ready`."""

  def __init__(self, name: str, cmd: list[str],
               env_extra: dict | None = None):
    self.name = name
    print(f'[{name}] ' + ' '.join(os.path.relpath(c) if os.path.isabs(c)
                                  else c for c in cmd), flush=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
    env.update(env_extra or {})
    self._stderr = tempfile.TemporaryFile(mode='w+')
    self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self._stderr,
                                  text=True, env=env)
    self._read()  # {"ready": true}

  def _read(self) -> dict:
    line = self._proc.stdout.readline()
    if not line:
      self._stderr.seek(0)
      tail = ' | '.join(self._stderr.read().strip().splitlines()[-5:])
      raise RuntimeError(f'{self.name} process exited {self._proc.poll()}: '
                         f'{tail}')
    out = json.loads(line)
    if 'error' in out:
      raise RuntimeError(out['error'])
    return out

  def request(self, cmd: str) -> dict:
    self._proc.stdin.write(cmd + '\n')
    self._proc.stdin.flush()
    return self._read()

  def close(self):
    if self._proc.poll() is None:
      try:
        self._proc.stdin.close()
        self._proc.wait(timeout=120)
      except (OSError, subprocess.TimeoutExpired):
        self._proc.kill()
        self._proc.wait()
    self._stderr.close()


def served_variant(name: str, proc: ServedProcess, rounds: int
                   ) -> tuple[Variant, dict]:
  """A variant timed by the peer's own clock; `info` fills at the end."""
  info: dict = {}
  times: dict[int, float] = {}

  def run_round(r):
    times[r] = proc.request(f'round {r}')['seconds']

  def finite():
    info.update(proc.request('info'))
    return info.pop('params_finite')

  return Variant(name, run_round, rounds, finite=finite, close=proc.close,
                 own_clock=times), info


def fedjax_variant(args) -> tuple[Variant | None, dict | None, str | None]:
  """(variant, info, None) or (None, None, reason); never raises."""
  try:
    pins = [f'jax=={jax.__version__}',
            f'jaxlib=={importlib.metadata.version("jaxlib")}',
            f'optax=={importlib.metadata.version("optax")}',
            f'numpy=={np.__version__}']
    python = fedjax_shims.ensure_venv(args.fedjax_venv, pins)  # RuntimeError
    proc = ServedProcess('fedjax', [
        python, os.path.join(HERE, 'fedjax_shims.py'), '--serve',
        '--model', args.model,
        '--clients_per_round', str(args.clients_per_round),
        '--examples_per_client', str(args.examples_per_client),
        '--batch_size', str(args.batch_size), '--epochs', str(args.epochs),
        '--client_lr', str(args.client_lr),
        '--server_lr', str(args.server_lr), '--seed', str(args.seed)])
  except Exception as e:  # pylint: disable=broad-except
    return None, None, f'{type(e).__name__}: {e}'
  return (*served_variant('fedjax', proc, args.rounds), None)


def run_interleaved(variants: list[Variant], log=print) -> None:
  """Round 0 (compiles) per variant, then timed rounds round-robin.

  Interleaving (and rotating the order every round) spreads slow spells of
  a shared machine over all variants instead of charging one of them.
  """
  for v in variants:
    try:
      v.first = fedjax_shims.timed(v.run_round, 0)
      log(f'  {v.name:26s} round 0 (compile + run) {v.first:7.2f} s')
    except Exception as e:  # pylint: disable=broad-except
      v.error = f'{type(e).__name__}: {e}'
      log(f'  {v.name:26s} failed: {v.error}')
  live = [v for v in variants if v.error is None]
  r = 1
  while any(v.error is None and len(v.times) < v.rounds for v in live):
    shift = (r - 1) % max(len(live), 1)
    for v in live[shift:] + live[:shift]:
      if v.error is None and len(v.times) < v.rounds:
        try:
          t = fedjax_shims.timed(v.run_round, r)
          v.times.append(v.own_clock.get(r, t))
        except Exception as e:  # pylint: disable=broad-except
          v.error = f'{type(e).__name__}: {e}'
          log(f'  {v.name:26s} failed: {v.error}')
    log(f'  round {r}: ' + '  '.join(
        f'{v.name} {v.times[-1]:.2f}' for v in live
        if v.error is None and len(v.times) == r))
    r += 1


def time_variants(variants: list[Variant]) -> dict[str, dict]:
  """Times `variants` interleaved, then closes them all; per variant that
  ran: its round-time summary and whether its parameters are finite."""
  try:
    run_interleaved(variants, log=lambda m: print(m, flush=True))
    results: dict[str, dict] = {}
    for v in variants:
      if v.error is None:
        try:
          finite = v.finite()
        except Exception as e:  # pylint: disable=broad-except
          finite = f'unknown ({type(e).__name__}: {e})'
        results[v.name] = dict(fedjax_shims.summarize(v.first, v.times),
                               params_finite=finite)
  finally:
    for v in variants:
      v.close()
  return results


def emit_json(summary: dict, out: str | None) -> None:
  """The benchmark's last output line; also written to `out` if given."""
  line = json.dumps(summary)
  if out:
    with open(out, 'w') as f:
      f.write(line + '\n')
  print(line, flush=True)


def machine_info() -> dict:
  cpu = None
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          cpu = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  versions = {p: importlib.metadata.version(p)
              for p in ('jax', 'jaxlib', 'flax', 'optax', 'numpy')}
  versions['fedjax_eff'] = getattr(fedjax_eff, '__version__', None) or (
      importlib.metadata.version('fedjax_eff'))
  return dict(nproc=os.cpu_count(), cpu=cpu, platform=platform.platform(),
              python=platform.python_version(),
              backend=jax.default_backend(),
              devices=[str(d) for d in jax.devices()], versions=versions)


def main(argv=None):
  args = parse_args(argv)
  work = Workload(args)
  k = args.clients_per_round
  print(f'model={args.model} K={k} examples/client={args.examples_per_client} '
        f'batch={args.batch_size} S={work.steps} rounds={args.rounds} '
        f'backend={jax.default_backend()} nproc={os.cpu_count()}', flush=True)

  variants: list[Variant] = []
  for label, c in chunk_sizes(args.chunk_sizes, k):
    variants.append(fedjax_eff_variant(f'fedjax_eff_C{label}', args, work, c))
  lax_conv = args.lax_conv and args.model == 'cnn'
  if lax_conv:
    variants.append(fedjax_eff_variant(
        'fedjax_eff_C1_lax_conv', args, work, 1, use_im2col=False,
        rounds=args.lax_conv_rounds))
  if not args.no_reference:
    variants.append(reference_variant('reference_loop', args, work))
    if lax_conv:
      variants.append(reference_variant('reference_loop_lax_conv', args, work,
                                        use_im2col=False))
  fedjax_error = fedjax_info = None
  if args.with_fedjax:
    fj, fedjax_info, fedjax_error = fedjax_variant(args)
    if fj is None:
      print(f'[fedjax] not timed: {fedjax_error}', flush=True)
    else:
      variants.append(fj)

  results = time_variants(variants)
  for v in variants:
    if v.name == 'fedjax' and v.error is not None:
      fedjax_error = v.error
  if fedjax_info and 'fedjax' in results:
    results['fedjax']['backend'] = fedjax_info.get('backend')

  ours = {n: r for n, r in results.items() if n.startswith('fedjax_eff_')
          and not n.endswith('_lax_conv')}
  if not ours:
    raise SystemExit('no fedjax_eff variant ran: '
                     + json.dumps({v.name: v.error for v in variants}))
  best_name = min(ours, key=lambda n: ours[n]['seconds_per_round'])
  best = ours[best_name]['seconds_per_round']

  def ratios(other):
    if other not in results:
      return None, None
    o = results[other]['seconds_per_round']
    return o / best, {n: o / r['seconds_per_round']
                      for n, r in results.items()
                      if n.startswith('fedjax_eff_')}

  ratio_ref, ratio_ref_per = ratios('reference_loop')
  ratio_fj, ratio_fj_per = ratios('fedjax')

  print()
  print(f'{"variant":28s} {"s/round":>9s} {"min":>8s} {"compile s":>10s} '
        f'{"vs loop":>8s} {"vs fedjax":>10s}')
  for n, r in results.items():
    vl = (results['reference_loop']['seconds_per_round'] /
          r['seconds_per_round'] if 'reference_loop' in results else None)
    vf = (results['fedjax']['seconds_per_round'] / r['seconds_per_round']
          if 'fedjax' in results else None)
    fmt = lambda v: f'{v:.2f}x' if v is not None else '-'
    print(f'{n:28s} {r["seconds_per_round"]:9.3f} {r["min_seconds"]:8.3f} '
          f'{r["compile_seconds"]:10.2f} {fmt(vl):>8s} {fmt(vf):>10s}')
  print(f'pack (host) median {statistics.median(work.pack_seconds) * 1e3:.1f}'
        f' ms/round, included in every fedjax_eff and reference_loop round')
  print(f'best fedjax_eff: {best_name} {best:.3f} s/round')
  if ratio_ref is not None:
    print(f'ratio vs reference loop: {ratio_ref:.2f}x')
  if args.with_fedjax:
    print('ratio vs FedJAX: ' + (
        f'{ratio_fj:.2f}x (issue target: >= 1.5x on the default CNN run)'
        if ratio_fj is not None else f'n/a ({fedjax_error})'))

  summary = dict(
      benchmark='round_throughput',
      config=dict(model=args.model, clients_per_round=k,
                  examples_per_client=args.examples_per_client,
                  batch_size=args.batch_size, epochs=args.epochs,
                  local_steps=work.steps, rounds=args.rounds,
                  client_lr=args.client_lr, server_lr=args.server_lr,
                  chunk_sizes=args.chunk_sizes, seed=args.seed),
      seconds_per_round={n: r['seconds_per_round']
                         for n, r in results.items()},
      min_seconds_per_round={n: r['min_seconds'] for n, r in results.items()},
      round_seconds={n: r['round_seconds'] for n, r in results.items()},
      compile_seconds={n: r['compile_seconds'] for n, r in results.items()},
      pack_seconds_per_round=statistics.median(work.pack_seconds),
      best_fedjax_eff=best_name,
      ratio_vs_reference_loop=ratio_ref,
      ratio_vs_reference_loop_per_variant=ratio_ref_per,
      ratio_vs_fedjax=ratio_fj,
      ratio_vs_fedjax_per_variant=ratio_fj_per,
      fedjax=fedjax_info, fedjax_error=fedjax_error,
      errors={v.name: v.error for v in variants if v.error},
      params_finite={n: r.get('params_finite') for n, r in results.items()},
      machine=machine_info(),
      command=' '.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]))
  emit_json(summary, args.out)


if __name__ == '__main__':
  main()
