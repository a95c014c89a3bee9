"""Orbax checkpoints of the whole run state, with fallback past corruption.

What is saved is everything a resumed run needs to be bit-identical to an
unbroken one: server params and optimizer state, the number of rounds done,
and the run's base PRNG key data and sampler seed (the cohort of round r and
every per-client key are pure functions of these and r). Orbax writes each
step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp


class RunCheckpointer:
  """Saves/restores `{'state': ServerState, 'rng': key data, 'sampler': ...}`.

  Args:
    directory: usually `workdir/checkpoints`.
    max_to_keep: checkpoints kept (>= 2 so a corrupt latest one has a
      predecessor to fall back to).
  """

  def __init__(self, directory: str, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max(2, max_to_keep), create=True,
            enable_async_checkpointing=False, cleanup_tmp_directories=True))

  def save(self, step: int, item: Any) -> None:
    self._manager.save(step, args=ocp.args.StandardSave(item), force=True)
    self._manager.wait_until_finished()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_latest(self, target: Any) -> tuple[Any, int | None]:
    """Restores the newest readable checkpoint into `target`'s structure.

    Returns `(item, step)`, or `(target, None)` when there is none. A
    checkpoint that fails to restore (truncated or corrupt files) is skipped
    with a warning and the next older one is tried.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    bad = []
    result = (target, None)
    for step in reversed(self.all_steps()):
      try:
        item = self._manager.restore(step,
                                     args=ocp.args.StandardRestore(abstract))
        check_structure(item, target)
        result = (item, step)
        break
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint at step %d in %s is unreadable (%s: %s); '
                        'falling back to the previous one.', step,
                        self.directory, type(e).__name__, e)
        print(f'WARNING: checkpoint {step} in {self.directory} is unreadable '
              f'({type(e).__name__}); falling back to the previous one.')
        bad.append(step)
    if bad:
      # Moved aside, not deleted: the run re-creates these steps, and the
      # unreadable files stay available for inspection.
      quarantine = self.directory + '_unreadable'
      os.makedirs(quarantine, exist_ok=True)
      for step in bad:
        dst = os.path.join(quarantine, f'{step}-{int(time.time())}')
        shutil.move(os.path.join(self.directory, str(step)), dst)
        print(f'WARNING: moved unreadable checkpoint {step} to {dst}.')
      self._manager.reload()
    return result

  def close(self) -> None:
    self._manager.close()


def check_structure(item: Any, target: Any) -> None:
  """Raises if the restored tree does not match the expected shapes."""
  a, b = jax.tree.leaves(item), jax.tree.leaves(target)
  if len(a) != len(b) or any(np.shape(x) != np.shape(y)
                             for x, y in zip(a, b)):
    raise ValueError('restored checkpoint does not match the model/optimizer '
                     'structure of this config')
