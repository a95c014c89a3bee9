"""Orbax checkpoints of the whole run state that prove their content.

What is saved is everything a resumed run needs to be bit-identical to an
unbroken one: server params and optimizer state, the number of rounds done,
and the run's base PRNG key data and sampler seed (the cohort of round r and
every per-client key are pure functions of these and r). Orbax writes each
step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact.

Beside each step, `<step>/fedjax_eff_digest.json` holds the SHA-256 of
every saved leaf (paths, dtypes, shapes, bytes). A restore recomputes it:
a checkpoint whose bytes changed on disk (bit rot, a partial copy, a
hostile edit) is as unreadable as a truncated one. Unreadable steps are
skipped with a one-line warning, moved to `checkpoints_unreadable/`, and
the previous step is restored. A checkpoint of *another shape* is not
corruption: it belongs to another config, and restoring raises
`RunRefused` without touching it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from fedjax_eff.experiment.errors import RunFailed, RunRefused
from fedjax_eff.experiment.workdir import write_atomic

DIGEST_FILE = 'fedjax_eff_digest.json'


def tree_sha256(tree: Any) -> str:
  """SHA-256 of a pytree's leaves: key paths, dtypes, shapes and bytes, in
  sorted-path order (so a dict's insertion order does not matter)."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    leaf = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(leaf.dtype).encode() + str(leaf.shape).encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()


def shapes_of(tree: Any) -> dict[str, list[int]]:
  return {jax.tree_util.keystr(p): list(np.shape(x))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


_OS_REASONS = ('No space left on device', 'Disk quota exceeded',
               'Read-only file system', 'Permission denied',
               'Input/output error')


def io_reason(e: BaseException) -> str:
  """A short reason for a failed write: the OS's phrase if it names one
  (orbax and tensorstore bury it in a long spec), else the first 160
  characters of the first line."""
  text = str(e)
  for reason in _OS_REASONS:
    if reason in text:
      return reason.lower()
  first = text.strip().splitlines()[0] if text.strip() else ''
  return f'{type(e).__name__}: {first[:160]}'


def _closed_loop_filter(previous):
  """An unraisable-exception hook that drops orbax's 'Event loop is closed'
  errors (its writer callbacks, once a save has failed) and passes on the
  rest."""
  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and 'Event loop is closed' in str(unraisable.exc_value)):
      previous(unraisable)
  return hook


@contextlib.contextmanager
def _orbax_quiet():
  """While orbax writes: absl logging at FATAL only (its threads log
  tracebacks of a failed write, which the run reports in one line), and
  the closed-loop errors of its callbacks dropped, for good if the save
  fails (they keep arriving after it has)."""
  level = logging.get_verbosity()
  hook = sys.unraisablehook
  logging.set_verbosity(logging.FATAL)
  sys.unraisablehook = _closed_loop_filter(hook)
  try:
    yield
  finally:
    logging.set_verbosity(level)
  sys.unraisablehook = hook  # reached on success only


class CorruptCheckpoint(Exception):
  """The step's bytes do not hash to its recorded digest."""


class RunCheckpointer:
  """Saves/restores `{'state': ServerState, 'rng': key data, 'sampler': ...}`.

  Args:
    directory: usually `workdir/checkpoints`.
    max_to_keep: checkpoints kept (>= 2 so a corrupt latest one has a
      predecessor to fall back to).
  """

  def __init__(self, directory: str, max_to_keep: int = 3):
    if max_to_keep < 1:
      raise RunRefused(f'config.checkpoint_keep={max_to_keep} must be >= 1 '
                       '(at least 2 are kept, so a corrupt newest checkpoint '
                       'has a predecessor).')
    self.directory = os.path.abspath(directory)
    try:
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=max(2, max_to_keep), create=True,
              enable_async_checkpointing=False,
              cleanup_tmp_directories=True))
    except OSError as e:
      raise RunFailed(f'cannot use the checkpoint directory {self.directory}:'
                      f' {e.strerror or e}.') from e

  def save(self, step: int, item: Any) -> None:
    """Saves `item` as `step` with its digest; I/O errors raise `RunFailed`
    naming the directory (the previous steps stay valid)."""
    try:
      with _orbax_quiet():  # its writer threads log tracebacks: we report
        self._manager.save(step, args=ocp.args.StandardSave(item),
                           force=True)
        self._manager.wait_until_finished()
      write_atomic(os.path.join(self.directory, str(step), DIGEST_FILE),
                   json.dumps({'sha256': tree_sha256(item),
                               'shapes': shapes_of(item)}))
    except Exception as e:  # pylint: disable=broad-except
      raise RunFailed(f'could not write checkpoint {step} to '
                      f'{self.directory}: {io_reason(e)} (the previous '
                      'checkpoint is kept).') from e

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def _check_shapes(self, step: int, target: Any) -> None:
    """Raises `RunRefused` if `step` holds another structure than
    `target` (from its digest, or orbax's metadata for older steps)."""
    want = shapes_of(target)
    digest = self._digest(step)
    if digest is not None:
      have = digest['shapes']
      differ = sorted(k for k in set(have) | set(want)
                      if have.get(k) != want.get(k))
      example = (f', e.g. {differ[0]}: {have.get(differ[0])} saved, '
                 f'{want.get(differ[0])} now') if differ else ''
    else:  # older steps: orbax's metadata, compared as a multiset of shapes
      try:
        meta = self._manager.item_metadata(step)
      except Exception:  # pylint: disable=broad-except
        return  # unreadable metadata: restoring will say so
      have = sorted(tuple(getattr(x, 'shape', ()) or ())
                    for x in jax.tree.leaves(
                        meta, is_leaf=lambda x: hasattr(x, 'shape')))
      if not have:
        return
      differ = have != sorted(tuple(v) for v in want.values())
      example = ''
    if differ:
      raise RunRefused(
          f'checkpoint {step} in {self.directory} holds a model or '
          f'optimizer of another shape{example}: it belongs to another '
          'config. Use a fresh --workdir.')

  def _digest(self, step: int) -> dict | None:
    path = os.path.join(self.directory, str(step), DIGEST_FILE)
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, json.JSONDecodeError):
      return None  # saved before digests, or killed before it was written

  def restore_latest(self, target: Any, max_step: int | None = None
                     ) -> tuple[Any, int | None]:
    """Restores the newest good checkpoint (<= `max_step`) into `target`'s
    structure.

    Returns `(item, step)`, or `(target, None)` when there is none. A
    checkpoint that fails to restore (truncated or missing files) or whose
    bytes differ from its digest is skipped with a warning, moved aside,
    and the next older one is tried. One of another shape raises
    `RunRefused`.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    bad = []
    result = (target, None)
    for step in reversed(self.all_steps()):
      if max_step is not None and step > max_step:
        continue
      self._check_shapes(step, target)
      try:
        item = self._manager.restore(step,
                                     args=ocp.args.StandardRestore(abstract))
        check_structure(item, target)
        digest = self._digest(step)
        if digest is not None and tree_sha256(item) != digest['sha256']:
          raise CorruptCheckpoint('its bytes differ from the digest saved '
                                  'with it')
        result = (item, step)
        break
      except Exception as e:  # pylint: disable=broad-except
        self._check_shapes(step, target)
        why = str(e).splitlines()[0][:200] if str(e) else ''
        logging.warning('Checkpoint %d in %s is unreadable (%s: %s).', step,
                        self.directory, type(e).__name__, why)
        print(f'WARNING: checkpoint {step} in {self.directory} is unreadable '
              f'({type(e).__name__}: {why}); falling back to the previous '
              'one.', flush=True)
        bad.append(step)
    # Moved aside, not deleted: the run re-creates these steps, and the
    # unreadable files stay available for inspection. Under jax.distributed
    # every process restores in lockstep (orbax's restore ends in a
    # barrier) and finds the same steps unreadable: only process 0 moves
    # them, and the others wait for it before re-listing.
    if bad and jax.process_index() == 0:
      quarantine = self.directory + '_unreadable'
      os.makedirs(quarantine, exist_ok=True)
      for step in bad:
        dst = os.path.join(quarantine, f'{step}-{time.time_ns()}')
        try:  # atomic on one file system; never a copy
          os.rename(os.path.join(self.directory, str(step)), dst)
        except FileNotFoundError:
          continue  # already moved aside (by another restorer)
        print(f'WARNING: moved unreadable checkpoint {step} to {dst}.',
              flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('fedjax_eff:checkpoint_quarantine')
    if bad:
      self._manager.reload()
    return result

  def delete_after(self, step: int) -> None:
    """Removes checkpoints newer than `step` (a resume from an older step
    re-creates them; left in place they would be restored next time)."""
    for s in self.all_steps():
      if s > step:
        self._manager.delete(s)
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()


def check_structure(item: Any, target: Any) -> None:
  """Raises if the restored tree does not match the expected shapes."""
  a, b = jax.tree.leaves(item), jax.tree.leaves(target)
  if len(a) != len(b) or any(np.shape(x) != np.shape(y)
                             for x, y in zip(a, b)):
    raise ValueError('restored checkpoint does not match the model/optimizer '
                     'structure of this config')
