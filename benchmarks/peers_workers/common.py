"""What every side of `benchmarks/peers.py` shares: data, model shape, protocol.

Imported by the parent (fedjax_eff venv) and by each peer's worker script
running in its own venv (FedJAX, pfl-research, Flower), so it imports only
the standard library and NumPy.

* `client_data(i, ...)`: client i's synthetic CIFAR-10-shaped examples
  (uniform 32x32x3 float32 pixels in [0, 1), 10 random labels), a pure
  function of (seed, i), so every framework trains on the same arrays while
  building only the clients it samples;
* `NUM_PARAMS`: the parameter count of pfl-research's `simple_cnn` on
  32x32x3 / 10 classes, which every framework's model must match;
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


def cnn_num_params(image_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES) -> int:
  """pfl-research `simple_cnn`: conv3x3(32) relu conv3x3(64) relu maxpool2
  dropout(.25) dense(128) relu dropout(.5) dense(num_classes)."""
  h, _, c = image_shape
  flat = ((h - 4) // 2) ** 2 * 64
  return ((3 * 3 * c * 32 + 32) + (3 * 3 * 32 * 64 + 64) +
          (flat * 128 + 128) + (128 * num_classes + num_classes))


NUM_PARAMS = cnn_num_params()


def client_id(i: int) -> str:
  """Zero-padded, so frameworks that sort ids keep index order."""
  return f'{i:06d}'


def client_data(i: int, examples: int, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
  """Client i: `x` [n, 32, 32, 3] float32 uniform [0, 1), `y` [n] int32."""
  rng = np.random.default_rng([seed, 0xC1FA, i])
  x = rng.random((examples,) + IMAGE_SHAPE, dtype=np.float32)
  y = rng.integers(0, NUM_CLASSES, examples).astype(np.int32)
  return x, y


def add_workload_flags(p: argparse.ArgumentParser) -> None:
  """The pfl CIFAR-10 workload, the same flags in the parent and workers."""
  p.add_argument('--num_clients', type=int, default=1000)
  p.add_argument('--clients_per_round', type=int, default=50)
  p.add_argument('--examples_per_client', type=int, default=50)
  p.add_argument('--batch_size', type=int, default=10)
  p.add_argument('--epochs', type=int, default=1)
  p.add_argument('--client_lr', type=float, default=0.1)
  p.add_argument('--server_lr', type=float, default=1.0)


def worker_parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description)
  add_workload_flags(p)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--max_rounds', type=int, default=1000,
                 help='upper bound for frameworks that need a round count '
                 'up front (the parent stops them earlier by EOF).')
  return p


def worker_argv(args) -> list[str]:
  """The parent's workload flags, for a worker's command line."""
  return ['--num_clients', str(args.num_clients),
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
