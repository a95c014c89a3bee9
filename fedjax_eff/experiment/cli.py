"""What the absl launchers share: one-line errors, checked config overrides.

`launch/train.py` and `launch/pretrain.py` end bad input with a single line
on stderr and exit status 2; a misspelt `--config.KEY` is named before absl
parses the flags (ml_collections would report it less plainly).
"""

from __future__ import annotations

import sys

from absl import flags

from fedjax_eff.experiment.validation import find_unknown_overrides


def fail(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl parsing, with unknown `--config.KEY` overrides named plainly."""
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
