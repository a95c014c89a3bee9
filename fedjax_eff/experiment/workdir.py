"""A workdir belongs to one run: its lock, its recorded config, whole files.

Three guarantees every mode (federated, local, pretraining) takes from here:

* **One process per workdir.** `RunLock` holds an exclusive `flock` on
  `workdir/.lock` (per process index under `jax.distributed`, so the
  processes of one job share the run); a second run on the same workdir is
  refused with the holder's pid, host and start time. The kernel drops the
  lock when its process dies, even by kill -9, so a crashed run never
  leaves a stale lock behind.
* **One configuration per workdir.** The first start records the config
  in `workdir/config.json`; a resume compares every key and refuses keys
  that change the trajectory (`RESUMABLE_KEYS` lists those that may change
  freely: how long, how often to evaluate or save, how to show progress,
  how to lay the computation out, none of which changes a parameter).
  `allow=` names trajectory keys the user knowingly changes; each such
  change is appended to `workdir/config_changes.jsonl`.
* **Files are whole or absent.** `write_atomic` writes a temporary file in
  the same directory, fsyncs it and renames it over the target, so a kill
  at any moment leaves the old file or the new one, never a torn one.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import time
from typing import Any, Iterable

from fedjax_eff.experiment.errors import RunRefused

# Keys whose value may differ on resume: they do not change what is
# trained. Data placement gives bit-identical models; chunk size and mesh
# the same model up to float summation order (the tests hold them to
# 1e-6), so a resumed run that changes them is not bit-identical to an
# unbroken one.
RESUMABLE_KEYS = (
    'num_rounds', 'eval_every', 'eval_batch_size', 'checkpoint_every',
    'checkpoint_keep', 'progress', 'log_every_seconds', 'tensorboard',
    'accounting',
    'chunk_size', 'client_state_limit_gib', 'data_placement',
    'mesh_clients', 'max_failed_rounds',
    'data.data_dir', 'data.cache_dir', 'submodel_keeps',
    'pretrain.steps', 'pretrain.log_every', 'pretrain.checkpoint_every',
)
CONFIG_FILE = 'config.json'


def write_atomic(path: str, text: str) -> None:
  """Replaces `path` by `text` all at once (temporary file, fsync, rename)."""
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def make_workdir(workdir: str) -> str:
  """Creates `workdir` (and parents); a clear error if it cannot be one."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise RunRefused(f'--workdir={workdir} is a file, not a directory; '
                     'pass a directory (it is created if missing).')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise RunRefused(f'cannot create --workdir={workdir}: '
                     f'{e.strerror or e}.') from e
  return workdir


class RunLock:
  """An exclusive, non-blocking `flock` on `workdir/.lock[.process<i>]`."""

  def __init__(self, workdir: str, process_index: int = 0):
    name = '.lock' if process_index == 0 else f'.lock.process{process_index}'
    self.path = os.path.join(workdir, name)
    self._fd = None

  def acquire(self) -> 'RunLock':
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = ''
      for _ in range(20):  # the holder writes its name just after locking
        holder = os.pread(fd, 4096, 0).decode(errors='replace').strip()
        if holder:
          break
        time.sleep(0.05)
      os.close(fd)
      raise RunRefused(
          f'another run holds {self.path} ({holder or "holder unknown"}); '
          'one run per workdir: wait for it, stop it, or pass another '
          '--workdir.') from None
    os.ftruncate(fd, 0)
    os.write(fd, (f'pid {os.getpid()} on {socket.gethostname()}, started '
                  f'{datetime.datetime.now().isoformat(timespec="seconds")}'
                  ).encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, f'{prefix}.{k}' if prefix else str(k)))
  return out


def config_dict(config) -> dict[str, Any]:
  """The config as plain JSON values (what `config.json` holds)."""
  return json.loads(config.to_json_best_effort())


def config_differences(recorded: dict, current: dict) -> dict[str, tuple]:
  """{dotted key: (old, new)} over keys both configs have.

  A key missing from the record is a knob added after the run started; its
  default is what the run used, so it is not a difference.
  """
  old, new = flatten(recorded), flatten(current)
  return {k: (old[k], new[k]) for k in sorted(new)
          if k in old and old[k] != new[k]}


def _resumable(key: str) -> bool:
  return any(key == k or key.startswith(k + '.') for k in RESUMABLE_KEYS)


def check_config(workdir: str, config, *, resuming: bool,
                 allow: Iterable[str] = ()) -> None:
  """Records `config` at the first start; on resume refuses a config that
  would continue another experiment.

  Raises `RunRefused` naming every differing trajectory key, old -> new.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  current = config_dict(config)
  text = json.dumps(current, indent=2)
  if not resuming or not os.path.exists(path):
    write_atomic(path, text)
    return
  try:
    with open(path) as f:
      recorded = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise RunRefused(f'{path} is unreadable ({e}); the run in {workdir} '
                     'cannot be checked against this config: use a fresh '
                     '--workdir.') from e
  allow = set(allow)
  diffs = config_differences(recorded, current)
  refused = {k: v for k, v in diffs.items()
             if not _resumable(k) and k not in allow}
  if refused:
    listed = '; '.join(f'{k}: {json.dumps(a)} -> {json.dumps(b)}'
                       for k, (a, b) in refused.items())
    raise RunRefused(
        f'{workdir} holds a run with another configuration ({listed}). '
        'Use a fresh --workdir, or pass --allow_config_change='
        f'{",".join(refused)} to continue this run with the new values.')
  if diffs:
    forced = {k: v for k, v in diffs.items() if not _resumable(k)}
    if forced:
      with open(os.path.join(workdir, 'config_changes.jsonl'), 'a') as f:
        f.write(json.dumps({'changed': {k: list(v) for k, v in
                                        forced.items()}}) + '\n')
    write_atomic(path, text)


def has_checkpoints(directory: str) -> bool:
  """Whether `directory` holds any checkpoint step (a resume, not a start)."""
  return os.path.isdir(directory) and any(
      name.isdigit() for name in os.listdir(directory))


def announce_resume(done: int, num_rounds: int, workdir: str) -> None:
  """One line saying where a resumed run stands."""
  if done > num_rounds:
    print(f'{workdir} already holds {done} rounds, more than '
          f'config.num_rounds={num_rounds}: nothing to train; reporting round '
          f'{done} (raise config.num_rounds to train on).', flush=True)
  elif done == num_rounds:
    print(f'{workdir} already finished its {done} rounds; reporting its '
          'final metrics.', flush=True)
  else:
    print(f'resumed from round {done} of {num_rounds} in {workdir}.',
          flush=True)
