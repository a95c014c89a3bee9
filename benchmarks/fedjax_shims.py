"""FedJAX 0.0.17 on current JAX: the shims it needs, and its side of the bench.

This file serves `benchmarks/round_throughput.py` twice:

* imported by the parent (the fedjax_eff venv): `synthetic_emnist` (the one
  definition of the benchmark's data, so both sides train on identical
  arrays), `time_rounds` (the one definition of how a round is timed) and
  `ensure_venv` (creates `benchmarks/.venvs/fedjax`);
* run as a script with the FedJAX venv's Python: applies the shims, builds
  FedJAX's own FedAvg (`fedjax.algorithms.fed_avg.federated_averaging`) on
  FedJAX's default `for_each_client` backend (the jit backend: one jitted
  call per client step) and prints one JSON line with its timings.

It imports nothing but the standard library and NumPy at module level and
never imports `fedjax_eff`, which is not installed in the FedJAX venv.

Shims (FedJAX 0.0.17 was written against JAX 0.4; JAX 0.10 and NumPy 2
removed names it uses). Each is installed only if the name is missing:

  jax.tree_map   -> jax.tree.map      fedjax.core.tree_util (tree_weight,
                                      tree_zeros_like: FedAvg's aggregation)
                                      and fedjax.core.regularizers
  jnp.NINF       -> -jnp.inf          fedjax.models.{stackoverflow,shakespeare}
                                      (logit masks), not on the EMNIST path
  np.issctype    -> "a NumPy scalar type"
                                      fedjax.core.serialization (msgpack of
                                      NumPy scalars), not on the timed path

Nothing else was needed for FedAvg + EMNIST CNN/MLP on the jit backend with
JAX 0.10.2, dm-haiku 0.0.17, optax 0.2.8 and NumPy 2.4 (see RESULTS.md).

Run by hand (after `round_throughput.py --with-fedjax` made the venv):

  benchmarks/.venvs/fedjax/bin/python benchmarks/fedjax_shims.py \
      --clients_per_round 100 --examples_per_client 32 --batch_size 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import numpy as np

FEDJAX_VERSION = '0.0.17'
# What the FedJAX venv gets besides fedjax itself; jax/jaxlib/optax/numpy are
# pinned by the parent to its own versions so both sides run the same XLA.
FEDJAX_EXTRA_PINS = ('dm-haiku==0.0.17',)
NUM_CLASSES = 62


def synthetic_emnist(num_clients: int, examples_per_client: int,
                     seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """EMNIST-shaped clients: uniform 28x28x1 float32 pixels, 62 labels.

  Client ids are zero-padded strings so that both FedJAX (which sorts ids)
  and fedjax_eff (sorted by default) see the clients in the same order.
  """
  rng = np.random.default_rng(seed)
  clients = {}
  for i in range(num_clients):
    clients[f'{i:06d}'] = {
        'x': rng.random((examples_per_client, 28, 28, 1), dtype=np.float32),
        'y': rng.integers(0, NUM_CLASSES, examples_per_client).astype(
            np.int32),
    }
  return clients


def summarize(first_round_seconds: float, round_seconds: list[float]) -> dict:
  """Median, min and compile time (first round minus the median)."""
  median = statistics.median(round_seconds)
  return dict(seconds_per_round=median, round_seconds=list(round_seconds),
              min_seconds=min(round_seconds),
              first_round_seconds=first_round_seconds,
              compile_seconds=max(first_round_seconds - median, 0.0))


def timed(run_round: Callable[[int], object], round_num: int) -> float:
  """Seconds of `run_round(round_num)`, which must block on its results."""
  t0 = time.perf_counter()
  run_round(round_num)
  return time.perf_counter() - t0


def time_rounds(run_round: Callable[[int], object], rounds: int) -> dict:
  """Round 0 (with compilation) apart, then `rounds` rounds one by one."""
  first = timed(run_round, 0)
  return summarize(first, [timed(run_round, r) for r in range(1, rounds + 1)])


# ---------------------------------------------------------------------------
# Parent side: the FedJAX venv.


def _venv_python(venv: str) -> str:
  return os.path.join(venv, 'bin', 'python')


def _probe(python: str) -> str | None:
  """fedjax's version in that interpreter, or None if it does not import."""
  code = ('import sys; sys.path.insert(0, %r); import fedjax_shims; '
          'fedjax_shims.apply_shims(); import fedjax, importlib.metadata as m;'
          ' print(m.version("fedjax"))' % os.path.dirname(
              os.path.abspath(__file__)))
  try:
    out = subprocess.run([python, '-c', code], capture_output=True,
                         text=True, timeout=300)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def ensure_venv(venv: str, pins: list[str], log=print) -> str:
  """Creates `venv` with fedjax and `pins` unless it already works.

  Returns the venv's python. Raises RuntimeError with the reason on failure.
  No TensorFlow or PyTorch: fedjax 0.0.17 requires absl-py, dm-haiku, jax,
  jaxlib, msgpack, optax, requests and scipy only (about 650 MB, mostly
  jaxlib and scipy), and plain `jax` pulls no CUDA wheels.
  """
  python = _venv_python(venv)
  if os.path.exists(python) and _probe(python) == FEDJAX_VERSION:
    return python
  log(f'[fedjax] creating {venv} (fedjax=={FEDJAX_VERSION}, '
      f'{" ".join(pins)})')
  steps = [
      [sys.executable, '-m', 'venv', '--clear', venv],
      [python, '-m', 'pip', 'install', '--quiet', '--disable-pip-version-check',
       f'fedjax=={FEDJAX_VERSION}', *FEDJAX_EXTRA_PINS, *pins],
  ]
  for cmd in steps:
    try:
      out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
      raise RuntimeError(f'{" ".join(cmd[:4])}... failed: {e}') from e
    if out.returncode != 0:
      tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
      raise RuntimeError(f'{" ".join(cmd[:4])}... exited {out.returncode}: '
                         + ' | '.join(tail))
  version = _probe(python)
  if version != FEDJAX_VERSION:
    raise RuntimeError(f'fedjax does not import in {venv} (got {version!r}).')
  return python


# ---------------------------------------------------------------------------
# Child side: runs inside the FedJAX venv.


def apply_shims() -> list[str]:
  """Restores the names FedJAX 0.0.17 uses; returns the ones it added."""
  import jax
  import jax.numpy as jnp

  added = []
  if not hasattr(jax, 'tree_map'):
    jax.tree_map = jax.tree.map
    added.append('jax.tree_map = jax.tree.map')
  if not hasattr(jnp, 'NINF'):
    jnp.NINF = -jnp.inf
    added.append('jnp.NINF = -jnp.inf')
  if not hasattr(np, 'issctype'):
    np.issctype = lambda rep: isinstance(rep, type) and issubclass(
        rep, np.generic)
    added.append('np.issctype = issubclass(rep, np.generic)')
  return added


def fedavg_runner(model, clients, args, shims: list[str]
                  ) -> tuple[Callable[[int], None], Callable[[], dict]]:
  """FedJAX's own FedAvg (jit backend) of `model` over `clients` (id ->
  {'x', 'y'}): (run_round(r), info()). Shared with peers_workers/."""
  import importlib.metadata as md
  import jax
  import fedjax
  from fedjax.algorithms import fed_avg

  fd = fedjax.InMemoryFederatedData(clients)
  algorithm = fed_avg.federated_averaging(
      grad_fn=fedjax.model_grad(model),
      client_optimizer=fedjax.optimizers.sgd(args.client_lr),
      server_optimizer=fedjax.optimizers.sgd(args.server_lr),
      client_batch_hparams=fedjax.ShuffleRepeatBatchHParams(
          batch_size=args.batch_size, num_epochs=args.epochs,
          seed=args.seed))
  sampler = fedjax.client_samplers.UniformGetClientSampler(
      fd, num_clients=args.clients_per_round, seed=args.seed)
  state = [algorithm.init(model.init(jax.random.PRNGKey(args.seed)))]

  def run_round(r):
    sampler.set_round_num(r)
    state[0], _ = algorithm.apply(state[0], sampler.sample())
    jax.block_until_ready(state[0].params)

  def info():
    leaves = jax.tree.leaves(state[0].params)
    return dict(
        framework='fedjax',
        backend=type(fedjax.get_for_each_client_backend()).__name__,
        shims=shims, python=platform.python_version(),
        versions={p: md.version(p) for p in (
            'fedjax', 'dm-haiku', 'jax', 'jaxlib', 'optax', 'numpy')},
        params_finite=all(bool(np.all(np.isfinite(np.asarray(x))))
                          for x in leaves),
        num_params=int(sum(np.size(x) for x in leaves)))

  return run_round, info


def build_fedjax(args) -> tuple[Callable[[int], None], Callable[[], dict]]:
  """FedJAX's FedAvg on the synthetic data: (run_round(r), info())."""
  shims = apply_shims()
  from fedjax.models import emnist

  if args.model == 'cnn':
    model = emnist.create_conv_model(only_digits=False)
  else:
    model = emnist.create_dense_model(only_digits=False, hidden_units=200)
  return fedavg_runner(
      model, synthetic_emnist(args.clients_per_round,
                              args.examples_per_client, args.seed),
      args, shims)


def serve(args):
  """Line protocol for the parent: `round R` -> {"seconds": t}; `info`; EOF.

  Lets the parent interleave FedJAX rounds with its own variants, so that a
  slow spell of a shared machine hits every variant alike.
  """
  def reply(obj):
    sys.stdout.write(json.dumps(obj) + '\n')
    sys.stdout.flush()

  try:
    run_round, info = build_fedjax(args)
  except Exception as e:  # pylint: disable=broad-except
    reply({'error': f'setup: {type(e).__name__}: {e}'})
    return
  reply({'ready': True})
  for line in sys.stdin:
    cmd = line.split()
    try:
      if cmd[:1] == ['round']:
        reply({'seconds': timed(run_round, int(cmd[1]))})
      elif cmd[:1] == ['info']:
        reply(info())
      else:
        reply({'error': f'unknown command {line.strip()!r}'})
    except Exception as e:  # pylint: disable=broad-except
      reply({'error': f'{cmd[0]}: {type(e).__name__}: {e}'})


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', choices=('cnn', 'mlp'), default='cnn')
  p.add_argument('--clients_per_round', type=int, default=100)
  p.add_argument('--examples_per_client', type=int, default=32)
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--epochs', type=int, default=1)
  p.add_argument('--client_lr', type=float, default=0.1)
  p.add_argument('--server_lr', type=float, default=1.0)
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--serve', action='store_true',
                 help='answer `round R` / `info` lines on stdin (parent).')
  args = p.parse_args(argv)
  if args.serve:
    serve(args)
    return
  run_round, info = build_fedjax(args)
  print(json.dumps(dict(time_rounds(run_round, args.rounds), **info())))


if __name__ == '__main__':
  main()
