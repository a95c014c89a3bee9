"""What every side of `benchmarks/peers.py` shares: data, model shape, protocol.

Imported by the parent (fedjax_eff venv) and by each peer's worker script
running in its own venv (FedJAX, pfl-research, Flower), so it imports only
the standard library and NumPy.

* two workloads (`WORKLOADS`, chosen by `--workload`): `cifar10`, the
  compute-bound pfl-research CIFAR-10 shape (pfl-research's `simple_cnn`),
  and `femnist`, an overhead-bound LEAF/FEMNIST shape (3,400 small clients,
  McMahan et al.'s 2NN MLP 784-200-200-62);
* `client_data(i, ...)`: client i's synthetic examples (CIFAR-10-shaped:
  uniform 32x32x3 float32 pixels in [0, 1), 10 random labels; or
  FEMNIST-shaped: 28x28x1, 62 labels), a pure function of (seed, i), so
  every framework trains on the same arrays while building only the clients
  it samples;
* `NUM_PARAMS` / `num_params(workload)`: the parameter count of the
  workload's model, which every framework's model must match;
* `Channel`: the worker's side of the line protocol (`round R` ->
  `{"seconds": t}`, `info` -> dict, EOF -> stop), in two flavours: `serve`
  for frameworks whose round the worker calls (FedJAX), and `begin` /
  `round_done` for frameworks that own the training loop (pfl, Flower),
  called from their end-of-round hook; the hook blocks until the parent
  asks for the next round, so the parent can interleave the peers' rounds
  with its own variants.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

import numpy as np

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)

# name -> shape of the data, the model and the default workload flags.
WORKLOADS = {
    # pfl-research's CIFAR-10 benchmark: compute-bound (1 GFLOP client steps).
    'cifar10': dict(image_shape=(32, 32, 3), num_classes=10, model='cnn',
                    num_clients=1000, clients_per_round=50,
                    examples_per_client=50, batch_size=10, epochs=1,
                    client_lr=0.1, server_lr=1.0),
    # LEAF FEMNIST's shape: 3,400 writers, 62 classes, 28x28x1; here few
    # examples per client (2 local steps) and a 2NN MLP: overhead-bound.
    'femnist': dict(image_shape=(28, 28, 1), num_classes=62, model='mlp',
                    mlp_hidden=(200, 200), num_clients=3400,
                    clients_per_round=100, examples_per_client=20,
                    batch_size=10, epochs=1, client_lr=0.1, server_lr=1.0),
}


def cnn_num_params(image_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES) -> int:
  """pfl-research `simple_cnn`: conv3x3(32) relu conv3x3(64) relu maxpool2
  dropout(.25) dense(128) relu dropout(.5) dense(num_classes)."""
  h, _, c = image_shape
  flat = ((h - 4) // 2) ** 2 * 64
  return ((3 * 3 * c * 32 + 32) + (3 * 3 * 32 * 64 + 64) +
          (flat * 128 + 128) + (128 * num_classes + num_classes))


def mlp_num_params(image_shape, num_classes, hidden=(200, 200)) -> int:
  """McMahan et al.'s 2NN: flatten, dense(200) relu dense(200) relu dense."""
  sizes = [int(np.prod(image_shape)), *hidden, num_classes]
  return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


NUM_PARAMS = cnn_num_params()


def image_shape(workload: str = 'cifar10') -> tuple[int, ...]:
  return WORKLOADS[workload]['image_shape']


def num_classes(workload: str = 'cifar10') -> int:
  return WORKLOADS[workload]['num_classes']


def num_params(workload: str = 'cifar10') -> int:
  w = WORKLOADS[workload]
  if w['model'] == 'cnn':
    return cnn_num_params(w['image_shape'], w['num_classes'])
  return mlp_num_params(w['image_shape'], w['num_classes'], w['mlp_hidden'])


def client_id(i: int) -> str:
  """Zero-padded, so frameworks that sort ids keep index order."""
  return f'{i:06d}'


def client_data(i: int, examples: int, seed: int = 0,
                workload: str = 'cifar10') -> tuple[np.ndarray, np.ndarray]:
  """Client i: `x` [n, *image_shape] float32 uniform [0, 1), `y` [n] int32.

  cifar10: [n, 32, 32, 3], 10 labels; femnist: [n, 28, 28, 1], 62 labels.
  """
  if workload == 'cifar10':  # unchanged stream: the CIFAR runs' arrays
    rng = np.random.default_rng([seed, 0xC1FA, i])
  else:
    rng = np.random.default_rng([seed, 0xFE31, i])
  x = rng.random((examples,) + image_shape(workload), dtype=np.float32)
  y = rng.integers(0, num_classes(workload), examples).astype(np.int32)
  return x, y


_WORKLOAD_FLAGS = (('num_clients', int), ('clients_per_round', int),
                   ('examples_per_client', int), ('batch_size', int),
                   ('epochs', int), ('client_lr', float),
                   ('server_lr', float))


def add_workload_flags(p: argparse.ArgumentParser) -> None:
  """The workload's flags, the same in the parent and workers; unset ones
  take the workload's defaults (`resolve_workload`)."""
  p.add_argument('--workload', choices=tuple(WORKLOADS), default='cifar10',
                 help='cifar10: pfl-research CIFAR-10 shape (compute-'
                 'bound); femnist: LEAF/FEMNIST shape, 2NN MLP, many small '
                 'clients (overhead-bound).')
  for name, kind in _WORKLOAD_FLAGS:
    p.add_argument(f'--{name}', type=kind, default=None,
                   help="default: the workload's ("
                   + ', '.join(f'{w}: {d[name]}' for w, d in WORKLOADS.items())
                   + ').')


def resolve_workload(args) -> None:
  """Fills the workload flags left unset with the workload's defaults."""
  defaults = WORKLOADS[args.workload]
  for name, _ in _WORKLOAD_FLAGS:
    if getattr(args, name) is None:
      setattr(args, name, defaults[name])


def worker_parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description)
  add_workload_flags(p)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--max_rounds', type=int, default=1000,
                 help='upper bound for frameworks that need a round count '
                 'up front (the parent stops them earlier by EOF).')
  return p


def parse_worker_args(description: str):
  args = worker_parser(description).parse_args()
  resolve_workload(args)
  return args


def worker_argv(args) -> list[str]:
  """The parent's workload flags, for a worker's command line."""
  # cifar10 keeps its original command line (the worker's default).
  head = ([] if args.workload == 'cifar10'
          else ['--workload', args.workload])
  return head + ['--num_clients', str(args.num_clients),
          '--clients_per_round', str(args.clients_per_round),
          '--examples_per_client', str(args.examples_per_client),
          '--batch_size', str(args.batch_size), '--epochs', str(args.epochs),
          '--client_lr', str(args.client_lr),
          '--server_lr', str(args.server_lr), '--seed', str(args.seed),
          '--max_rounds', str(args.rounds + 1)]


class Channel:
  """The worker's protocol endpoint on the process's original stdout.

  File descriptor 1 is pointed at stderr, so that whatever a framework (or
  its logging, or its subprocesses) prints cannot corrupt the protocol.
  """

  def __init__(self):
    sys.stdout.flush()
    self._out = os.fdopen(os.dup(1), 'w')
    os.dup2(2, 1)
    self._info: Callable[[], dict] = dict
    self._t0: float | None = None
    self.round_num: int | None = None

  def reply(self, obj: dict) -> None:
    self._out.write(json.dumps(obj) + '\n')
    self._out.flush()

  def set_info(self, info: Callable[[], dict]) -> None:
    self._info = info

  def _next_round(self) -> int | None:
    """Answers `info` until the parent asks for a round; None at EOF."""
    for line in sys.stdin:
      cmd = line.split()
      if cmd[:1] == ['round']:
        return int(cmd[1])
      if cmd[:1] == ['info']:
        try:
          self.reply(self._info())
        except Exception as e:  # pylint: disable=broad-except
          self.reply({'error': f'info: {type(e).__name__}: {e}'})
      else:
        self.reply({'error': f'unknown command {line.strip()!r}'})
    return None

  # Pull style: the worker calls the framework's round.
  def serve(self, run_round: Callable[[int], None]) -> None:
    self.reply({'ready': True})
    while (r := self._next_round()) is not None:
      try:
        t0 = time.perf_counter()
        run_round(r)
        self.reply({'seconds': time.perf_counter() - t0})
      except Exception as e:  # pylint: disable=broad-except
        self.reply({'error': f'round {r}: {type(e).__name__}: {e}'})

  # Push style: the framework owns the loop and calls `round_done` at the
  # end of each round.
  def begin(self) -> bool:
    """Before the framework's loop: waits for `round 0`; False at EOF."""
    self.reply({'ready': True})
    self.round_num = self._next_round()
    self._t0 = time.perf_counter()
    return self.round_num is not None

  def round_done(self) -> bool:
    """Replies the round's seconds; True if the parent wants another."""
    self.reply({'seconds': time.perf_counter() - self._t0})
    self.round_num = self._next_round()
    self._t0 = time.perf_counter()
    return self.round_num is not None

  def fail(self, e: BaseException) -> None:
    self.reply({'error': f'{type(e).__name__}: {e}'})
