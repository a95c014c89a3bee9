"""The round loop federated and local runs share.

Prefetches round r+1's cohort while round r runs (and records how long each
round still waited for it, `host_wait_seconds`), times rounds (accounting
compiles excluded), evaluates every `eval_every` rounds and at the end,
writes one metrics line per round, shows progress, and checkpoints every
`checkpoint_every` rounds and at the end. What a round *does* is the
caller's: `step(r, cohort) -> (record, untimed_seconds)`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
import tqdm

from fedjax_eff.experiment import callbacks as callbacks_lib
from fedjax_eff.experiment import metrics as metrics_lib
from fedjax_eff.experiment.errors import RunFailed, RunInterrupted


@contextlib.contextmanager
def stop_signals():
  """SIGTERM and SIGINT set `flag['signum']` instead of killing the run, so
  the loop can finish and save the round in flight; a second signal stops
  at once (as the signal's default would)."""
  flag: dict[str, int | None] = {'signum': None}
  if threading.current_thread() is not threading.main_thread():
    yield flag  # handlers can only be set from the main thread
    return
  previous = {}

  def handler(signum, frame):
    del frame
    if flag['signum'] is not None:  # the second one: stop now
      signal.signal(signum, previous[signum])
      signal.raise_signal(signum)
      return
    flag['signum'] = signum
    print(f'{signal.Signals(signum).name}: finishing the round in flight, '
          'saving it, then stopping (send it again to stop at once).',
          flush=True)

  for sig in (signal.SIGTERM, signal.SIGINT):
    previous[sig] = signal.signal(sig, handler)
  try:
    yield flag
  finally:
    for sig, h in previous.items():
      signal.signal(sig, h)


def stop_requested(flag: dict[str, int | None]) -> int | None:
  """The signal to stop on after this round, agreed by every process of
  a `jax.distributed` job (one stops, all stop at the same round, so their
  checkpoint barriers match); a collective per round only when there are
  several processes."""
  if jax.process_count() == 1:
    return flag['signum']
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  seen = np.ravel(multihost_utils.process_allgather(
      np.int32(flag['signum'] or 0)))
  return next((int(x) for x in seen if x), None)


def failed_round(record: dict[str, Any]) -> bool:
  """No client update reached the server, or its step was non-finite."""
  loss = record.get('train_loss')
  no_update = (record.get('num_dropped', 0) > 0
               and not (isinstance(loss, float) and math.isfinite(loss)))
  return no_update or record.get('server_step_skipped', 0) > 0


def run_rounds(config, workdir: str, start: int, *,
               cohort: Callable[[int], Any],
               step: Callable[[int, Any], tuple[dict[str, float], float]],
               evaluate: Callable[[int], dict[str, float]],
               save: Callable[[int], None], progress: bool | None = None,
               desc: str = 'rounds', callbacks: Sequence[Any] = (),
               tensorboard: bool | None = None,
               num_rounds: int | None = None
               ) -> tuple[dict[str, Any], float | None]:
  """Runs rounds `start..num_rounds-1` (`num_rounds`: default
  `config.num_rounds`; fewer when a privacy budget ends the run).

  Progress: a bar when `progress` (default `config.progress`) is on and
  stderr is a terminal; otherwise a line every `config.log_every_seconds`
  (`callbacks_lib.ProgressLog`; 0 = none). `callbacks`: see
  `experiment/callbacks.py`.

  Returns (the last round's record with its `round`, seconds of the first
  round including compilation, None if no round ran).
  """
  total = config.num_rounds if num_rounds is None else num_rounds
  writer = metrics_lib.MetricWriter(
      workdir, resume_round=start,
      tensorboard=config.tensorboard if tensorboard is None else tensorboard,
      config=config)
  show = config.progress if progress is None else progress
  bar_on = bool(show) and sys.stderr.isatty()
  bar = tqdm.tqdm(total=total, initial=start, unit='round',
                  disable=not bar_on, dynamic_ncols=True, desc=desc)
  callbacks = list(callbacks)
  every = config.get('log_every_seconds', 30.0)
  if not bar_on and every > 0 and progress is not False:
    callbacks.insert(0, callbacks_lib.ProgressLog(start, total,
                                                  every))
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  last: dict[str, Any] = {}
  compile_s = None
  failed_in_a_row = 0
  limit = config.get('max_failed_rounds', 0)
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  signals = stop_signals()
  stop = signals.__enter__()
  try:
    pending = (pool.submit(cohort, start)
               if start < total else None)
    for r in range(start, total):
      t_wait = time.time()
      this = pending.result()
      waited = time.time() - t_wait  # the round waiting on host packing
      pending = (pool.submit(cohort, r + 1)
                 if r + 1 < total else None)
      t_round = time.time()
      record, untimed = step(r, this)
      t_round += untimed  # accounting compiles: not the round
      if compile_s is None:
        compile_s = time.time() - t_round
      done = r + 1
      if done % config.eval_every == 0 or done == total:
        evaluated = evaluate(done)
        record.update(evaluated)
        callbacks_lib.call(callbacks, 'on_evaluate', done, evaluated)
      record['round_seconds'] = time.time() - t_round
      record['host_wait_seconds'] = waited
      writer.write(done, record)
      last = {'round': done, **record}
      callbacks_lib.call(callbacks, 'on_round_end', done,
                         metrics_lib.to_python(record))
      postfix = {'loss': f"{record['train_loss']:.3f}",
                 'acc': f"{record['train_accuracy']:.3f}"}
      for k in ('test_accuracy', 'heldout_accuracy'):
        if k in last:
          postfix[k.split('_')[0] + '_acc'] = f'{last[k]:.3f}'
      bar.set_postfix(postfix, refresh=False)
      bar.update(1)
      saved = done % config.checkpoint_every == 0 or done == total
      if saved:
        save(done)
        callbacks_lib.call(callbacks, 'on_checkpoint', done, ckpt_dir)
      if failed_round(record):
        failed_in_a_row += 1
        print(f'WARNING: round {done}: no client update was finite '
              f"({record.get('num_dropped', 0):g} dropped) or the server "
              'step was non-finite and skipped; the model did not change.',
              flush=True)
        if limit and failed_in_a_row >= limit:
          raise RunFailed(
              f'{failed_in_a_row} rounds in a row (to round {done}) changed '
              'nothing: every client update or the server step was '
              'non-finite. Likely a learning rate too high (config.client.'
              f'learning_rate={config.client.learning_rate}, config.server.'
              f'learning_rate={config.server.learning_rate}) or NaN/inf in '
              'the data; see num_dropped in metrics.jsonl '
              '(config.max_failed_rounds sets this limit).')
      else:
        failed_in_a_row = 0
      signum = stop_requested(stop)
      if signum is not None:
        if not saved:
          save(done)
          callbacks_lib.call(callbacks, 'on_checkpoint', done, ckpt_dir)
        raise RunInterrupted(signum, done, workdir)
  finally:
    signals.__exit__(None, None, None)
    pool.shutdown(wait=False, cancel_futures=True)
    bar.close()
    writer.close()
  return last, compile_s
