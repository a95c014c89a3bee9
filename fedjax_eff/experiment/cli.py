"""What the absl launchers share: one-line errors, checked config overrides.

`launch/train.py` and `launch/pretrain.py` end bad input with a single line
on stderr and exit status 2; a misspelt `--config.KEY` is named before absl
parses the flags (ml_collections would report it less plainly).
"""

from __future__ import annotations

import os
import sys

from absl import flags
from absl import logging

from fedjax_eff.experiment import validation

# The shipped configs (`configs/*.py`, `configs/lm/*.py`), for suggestions.
CONFIGS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))), 'configs')


def fail(message: str, code: int = 2, hard: bool = False):
  """One line on stderr, then exit `code` (2: bad input; see
  `experiment.errors` for the others); `hard`: without interpreter
  shutdown (after a failed write, whose library threads are still up)."""
  # Library threads still winding down (orbax's writers after a failed
  # save) would log their own tracebacks after this line: silence them.
  logging.set_verbosity(logging.FATAL)
  print(f'error: {" ".join(message.split())}', file=sys.stderr, flush=True)
  if hard:  # skip interpreter shutdown, where such threads print too
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def suggest_config_file(path: str) -> str | None:
  """A config file whose name is close to the missing `path` (same folder
  as typed first, then `configs/` and `configs/lm/`), as the user would
  type it, or None."""
  file, sep, spec = path.partition(':')
  folder, name = os.path.split(file)
  candidates = {}  # displayed path -> file name
  folders = [folder or '.', CONFIGS_DIR, os.path.join(CONFIGS_DIR, 'lm')]
  for d in folders:
    try:
      names = sorted(os.listdir(d))
    except OSError:
      continue
    for n in names:
      full = os.path.join(d, n)
      if not n.endswith('.py') or n.startswith('_') or not os.path.isfile(
          full):
        continue
      if d == (folder or '.'):
        shown = os.path.join(folder, n)
      else:
        shown = os.path.relpath(full)
        if shown.startswith('..'):
          shown = full
      candidates.setdefault(shown, n)
  stem = lambda n: n[:-len('.py')] if n.endswith('.py') else n
  best = validation.suggest(stem(name), {stem(n) for n in candidates.values()})
  if best is None:
    return None
  shown = next(s for s, n in candidates.items() if stem(n) == best)
  return shown + sep + spec


def parse_flags(argv):
  """absl parsing, with a missing config file or an unknown `--config.KEY`
  override named plainly, with the closest existing one."""
  for i, arg in enumerate(argv[1:], start=1):
    path = (arg.split('=', 1)[1] if arg.startswith('--config=') else
            argv[i + 1] if arg == '--config' and i + 1 < len(argv) else None)
    if path is not None and not os.path.isfile(path.partition(':')[0]):
      close = suggest_config_file(path)
      fail(f'--config={path}: no such config file ' + (
          f'(did you mean --config={close}?)' if close else
          '(see configs/ for the shipped ones).'))
  unknown = validation.unknown_overrides(argv)
  if unknown:
    fail(f'unknown config key{"s" if len(unknown) > 1 else ""} ' + ', '.join(
        f'config.{k}' + (f' (did you mean config.{close}?)' if close else '')
        for k, close in unknown) + '; see fedjax_eff/experiment/'
         'defaults.py for the keys a config has.')
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A config file that raises (e.g. a bad ':spec') arrives with its
    # traceback in the message: keep the flag and the final error line.
    lines = [line for line in str(e).splitlines() if line.strip()]
    fail(lines[0] if len(lines) == 1 else f'{lines[0]} {lines[-1]}')
