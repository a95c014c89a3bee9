"""The run skeleton every mode shares: workdir, lock, resume, rounds, summary.

`session(config, workdir, body)` is what each mode's entry point runs:
validate the config, create and lock the workdir, refuse a workdir of
another mode, check the recorded config, translate failures into
`errors.Run*`, call `body()`, then the callbacks' `on_run_end`.

`run_rounds(config, workdir, mode)` is the body of the round-based modes
(federated `train.py`, `local.py`): one `Experiment`, a `RoundMode` built
from it, its checkpoint restored (`resume_point`), the shared round loop
(`loop.run_rounds`), and `summary.json` (the fields every mode records plus
the mode's own). `pretrain.py` runs steps, not rounds, inside `session`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Protocol

import jax
import ml_collections
import numpy as np

from fedjax_eff.experiment import build
from fedjax_eff.experiment import callbacks as callbacks_lib
from fedjax_eff.experiment import checkpoints
from fedjax_eff.experiment import errors
from fedjax_eff.experiment import loop as loop_lib
from fedjax_eff.experiment import metrics as metrics_lib
from fedjax_eff.experiment import workdir as workdir_lib
from fedjax_eff.experiment.validation import validate_config


def check_workdir_mode(workdir: str, mode: str) -> None:
  """A workdir holds one kind of run: e.g. federated checkpoints (server
  state) are not client stacks, and restoring one as the other would be
  read as corruption."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path) or not os.path.isdir(
      os.path.join(workdir, 'checkpoints')):
    return
  try:
    with open(path) as f:
      previous = json.load(f).get('mode', 'federated')
  except (OSError, ValueError, AttributeError):
    return
  if previous != mode:
    raise ValueError(f'{workdir} holds a config.mode={previous!r} run; '
                     f'config.mode={mode} needs a fresh --workdir.')


def session(config: ml_collections.ConfigDict, workdir: str,
            body: Callable[[], dict[str, Any]], *,
            allow_config_change: tuple[str, ...] = (),
            callbacks: tuple[Any, ...] = (), mode: str | None = None
            ) -> dict[str, Any]:
  """Runs `body() -> summary` in `workdir`, with the workdir guarantees.

  The config is validated before anything touches the workdir; the workdir
  is locked for the run (`workdir_lib.RunLock`), must not hold a run of
  another `mode` (default `config.mode`), and its recorded config must
  match (`workdir_lib.check_config`; `allow_config_change` names
  trajectory keys the caller knowingly changes). Ends with
  `errors.RunRefused` (bad input), `RunFailed` (I/O, memory, a run that
  stopped learning) or `RunInterrupted` (a signal, after saving).
  `callbacks`: the user's hooks (`experiment/callbacks.py`).
  """
  validate_config(config)
  workdir_lib.make_workdir(workdir)
  with workdir_lib.RunLock(workdir, jax.process_index()):
    with errors.translated(workdir):
      check_workdir_mode(workdir, mode or config.mode)
      if jax.process_index() == 0:
        workdir_lib.check_config(
            workdir, config, resuming=workdir_lib.has_checkpoints(
                os.path.join(workdir, 'checkpoints')),
            allow=allow_config_change)
      summary = body()
  callbacks_lib.call(callbacks, 'on_run_end', summary)
  return summary


def resume_point(workdir: str, ckpt: checkpoints.RunCheckpointer,
                 target: Any) -> tuple[Any, int | None]:
  """The newest good checkpoint whose rounds metrics.jsonl holds in full
  (a torn or lost line is re-run from the step before it); newer
  checkpoints are removed, the run re-creates them."""
  complete = metrics_lib.complete_rounds(workdir)
  steps = ckpt.all_steps()
  restored, step = ckpt.restore_latest(target, max_step=complete)
  if steps and steps[-1] > (step or 0):
    if steps[-1] > complete:
      print(f'WARNING: metrics.jsonl holds rounds 1..{complete} only; '
            f'resuming from round {step or 0} and re-running the rest.',
            flush=True)
    ckpt.delete_after(step or 0)
  elif complete > (step or 0):
    # Rounds logged after the newest checkpoint: killed between the two, or
    # a checkpoint missing (deleted, moved aside as unreadable).
    print(f'WARNING: no checkpoint after round {step or 0}, but '
          f'metrics.jsonl holds rounds to {complete}: re-running rounds '
          f'{(step or 0) + 1}..{complete} (deterministic: same results).',
          flush=True)
  return restored, step


class RoundMode(Protocol):
  """What a round-based mode supplies to `run_rounds`.

  desc: the progress bar's unit label.
  state(): the checkpoint tree of a fresh run (`{'state': ...}` plus
    whatever the mode must match on resume).
  restore(restored) -> first round: adopts a restored checkpoint, raising
    `errors.RunRefused` if it is not this run's.
  cohort(r): round `r`'s input (prefetched on a thread).
  step(r, input) -> (metrics record, untimed seconds).
  evaluate(done) -> metrics after `done` rounds.
  checkpoint(done): the checkpoint tree after `done` rounds.
  finish(last, rounds, history) -> summary fields: completes `last` (the
    final metrics, in place) and returns the mode's own summary fields
    (`history`: every round's metrics line).
  """
  desc: str

  def state(self) -> dict[str, Any]: ...
  def restore(self, restored: dict[str, Any]) -> int: ...
  def cohort(self, round_num: int) -> Any: ...
  def step(self, round_num: int, this: Any
           ) -> tuple[dict[str, float], float]: ...
  def evaluate(self, done: int) -> dict[str, float]: ...
  def checkpoint(self, done: int) -> dict[str, Any]: ...
  def finish(self, last: dict[str, Any], rounds: int,
             history: list[dict[str, Any]]) -> dict[str, Any]: ...


def run_rounds(config: ml_collections.ConfigDict, workdir: str,
               make_mode: Callable[[build.Experiment], RoundMode], *,
               progress: bool | None = None,
               callbacks: tuple[Any, ...] = ()) -> dict[str, Any]:
  """Builds the experiment and the mode, resumes, runs the rounds, and
  writes `summary.json`; returns the summary. Checkpoints hold the mode's
  tree plus the seed's key (`rng`) and the sampler position; a checkpoint
  of another seed is refused. Under `jax.distributed` only process 0
  reports (the others write to `workdir/process<i>`)."""
  t0 = time.time()
  exp = build.Experiment(config)
  mode = make_mode(exp)
  ckpt = checkpoints.RunCheckpointer(os.path.join(workdir, 'checkpoints'),
                                     config.checkpoint_keep)
  main_workdir = workdir
  if jax.process_index() > 0:  # under jax.distributed: process 0 reports
    workdir = os.path.join(workdir, f'process{jax.process_index()}')
    os.makedirs(workdir, exist_ok=True)
  rng = np.asarray(jax.random.key_data(exp.base_key))

  def tree(state, done):
    return {**state, 'rng': rng,
            'sampler': np.asarray([config.seed, done], np.int64)}

  restored, saved_round = resume_point(main_workdir, ckpt,
                                       tree(mode.state(), 0))
  start = 0
  if saved_round is not None:
    if not np.array_equal(np.asarray(restored['rng']), rng):
      raise errors.RunRefused(
          f'The checkpoint in {workdir} was written with another '
          'config.seed; use a fresh --workdir.')
    start = mode.restore(restored)
    workdir_lib.announce_resume(start, config.num_rounds, workdir)
  try:
    last, compile_s = loop_lib.run_rounds(
        config, workdir, start, cohort=mode.cohort, step=mode.step,
        evaluate=mode.evaluate,
        save=lambda done: ckpt.save(done, tree(mode.checkpoint(done), done)),
        progress=progress, desc=mode.desc, callbacks=callbacks,
        num_rounds=getattr(mode, 'num_rounds', None),
        # under jax.distributed only process 0 writes events
        tensorboard=config.tensorboard and jax.process_index() == 0)
  finally:
    ckpt.close()
  rounds = last.get('round', start)
  history = metrics_lib.read_metrics(workdir)
  if not last and history:  # resumed a finished run: report its last round
    last = dict(history[-1])
  if config.accounting and not exp.cost_table():  # resumed a finished run
    for t in range(exp.num_tiers):
      exp.program_cost(max(rounds - 1, 0), t)
  fields = mode.finish(last, rounds, history)
  summary = {
      'final_metrics': metrics_lib.to_python(last),
      'rounds': rounds,
      'resumed_from_round': start,
      'wall_time_seconds': time.time() - t0,
      'first_round_seconds_incl_compile': compile_s,
      'train_wall_time_seconds_total': float(sum(
          h.get('round_seconds', 0.0) for h in history)),
      **fields,
      'config': json.loads(config.to_json_best_effort()),
      'versions': build.versions(),
  }
  workdir_lib.write_atomic(os.path.join(workdir, 'summary.json'),
                           json.dumps(summary, indent=2))
  return summary
