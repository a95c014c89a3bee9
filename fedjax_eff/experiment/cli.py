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

from fedjax_eff.experiment.validation import find_unknown_overrides


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


def parse_flags(argv):
  """absl parsing, with unknown `--config.KEY` overrides named plainly."""
  for i, arg in enumerate(argv[1:], start=1):
    path = (arg.split('=', 1)[1] if arg.startswith('--config=') else
            argv[i + 1] if arg == '--config' and i + 1 < len(argv) else None)
    if path is not None and not os.path.isfile(path.partition(':')[0]):
      fail(f'--config={path}: no such config file (see configs/ for the '
           'shipped ones).')
  unknown = find_unknown_overrides(argv)
  if unknown:
    fail('unknown config key(s): ' + ', '.join(
        f'config.{k}' for k in unknown) + '; see fedjax_eff/experiment/'
         'defaults.py for the keys a config has.')
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A config file that raises (e.g. a bad ':spec') arrives with its
    # traceback in the message: keep the flag and the final error line.
    lines = [line for line in str(e).splitlines() if line.strip()]
    fail(lines[0] if len(lines) == 1 else f'{lines[0]} {lines[-1]}')
