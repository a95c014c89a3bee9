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
import time
from typing import Any, Callable

from absl import logging
import tqdm

from fedjax_eff.experiment import metrics as metrics_lib


def run_rounds(config, workdir: str, start: int, *,
               cohort: Callable[[int], Any],
               step: Callable[[int, Any], tuple[dict[str, float], float]],
               evaluate: Callable[[int], dict[str, float]],
               save: Callable[[int], None], progress: bool | None = None,
               desc: str = 'rounds') -> tuple[dict[str, Any], float | None]:
  """Runs rounds `start..config.num_rounds-1`.

  Returns (the last round's record with its `round`, seconds of the first
  round including compilation, None if no round ran).
  """
  writer = metrics_lib.MetricWriter(workdir, resume_round=start,
                                    tensorboard=config.tensorboard)
  show = config.progress if progress is None else progress
  bar = tqdm.tqdm(total=config.num_rounds, initial=start, unit='round',
                  disable=not show, dynamic_ncols=True, desc=desc)
  last: dict[str, Any] = {}
  compile_s = None
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  try:
    pending = (pool.submit(cohort, start)
               if start < config.num_rounds else None)
    for r in range(start, config.num_rounds):
      t_wait = time.time()
      this = pending.result()
      waited = time.time() - t_wait  # the round waiting on host packing
      pending = (pool.submit(cohort, r + 1)
                 if r + 1 < config.num_rounds else None)
      t_round = time.time()
      record, untimed = step(r, this)
      t_round += untimed  # accounting compiles: not the round
      if compile_s is None:
        compile_s = time.time() - t_round
      done = r + 1
      if done % config.eval_every == 0 or done == config.num_rounds:
        record.update(evaluate(done))
      record['round_seconds'] = time.time() - t_round
      record['host_wait_seconds'] = waited
      writer.write(done, record)
      last = {'round': done, **record}
      postfix = {'loss': f"{record['train_loss']:.3f}",
                 'acc': f"{record['train_accuracy']:.3f}"}
      for k in ('test_accuracy', 'heldout_accuracy'):
        if k in last:
          postfix[k.split('_')[0] + '_acc'] = f'{last[k]:.3f}'
      bar.set_postfix(postfix, refresh=False)
      bar.update(1)
      if not show and ('test_accuracy' in record or done == start + 1):
        logging.info('round %d: %s', done, record)
      if done % config.checkpoint_every == 0 or done == config.num_rounds:
        save(done)
  finally:
    pool.shutdown(wait=False, cancel_futures=True)
    bar.close()
    writer.close()
  return last, compile_s
