"""How a run ends when it does not end well, and the exit status of each.

The launchers turn these into one line on stderr (no traceback):

| error | exit | meaning |
| --- | --- | --- |
| `RunRefused` | 2 | bad input, refused before a round ran: a config key, a workdir that is a file or held by another run, a config that differs from the run recorded in the workdir, a cohort that cannot fit in memory |
| `RunFailed` | 1 | the run started and could not go on: an I/O error (disk full), rounds whose every update was non-finite, out of memory; the last good checkpoint is kept |
| `RunInterrupted` | 128 + signal | SIGTERM or SIGINT: the round in flight finished and was checkpointed; the same command resumes |

`RunRefused` is a `ValueError`, so code that catches bad input keeps
catching it.
"""

from __future__ import annotations

import contextlib
import re
import signal

import jax


class RunRefused(ValueError):
  """Refused before training: the message says what to change."""
  exit_code = 2


class RunFailed(RuntimeError):
  """The run could not go on; what was saved stays valid."""
  exit_code = 1


class RunInterrupted(Exception):
  """Stopped by a signal at a round boundary, after saving that round."""

  def __init__(self, signum: int, round_num: int, workdir: str):
    self.signum, self.round_num, self.workdir = signum, round_num, workdir
    self.exit_code = 128 + signum
    super().__init__(
        f'stopped by {signal.Signals(signum).name} after round {round_num}; '
        f'saved it in {workdir}: run the same command to resume.')


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else type(e).__name__


@contextlib.contextmanager
def translated(workdir: str):
  """Turns what a run meets at run time into `RunFailed` with one line:
  an I/O error (naming its path), and running out of memory (XLA's
  RESOURCE_EXHAUSTED or the host's MemoryError, naming the keys that
  shrink a round)."""
  try:
    yield
  except FileNotFoundError as e:
    if e.filename is None:  # a missing prerequisite: a dataset, espeak-ng
      raise RunRefused(str(e)) from e
    raise RunFailed(f'I/O error on {e.filename}: {e.strerror}.') from e
  except OSError as e:
    where = e.filename or workdir
    raise RunFailed(f'I/O error on {where}: {e.strerror or _first_line(e)}; '
                    'the last good checkpoint is kept.') from e
  except MemoryError as e:
    raise RunFailed(MEMORY_ADVICE.format(
        what='the host ran out of memory')) from e
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    # XLA's own words, e.g. 'Out of memory while trying to allocate
    # 450.02GiB' (on GPU buried in an autotuning NOT_FOUND error).
    found = re.search(r'(Out of memory while trying to allocate [0-9.]+\s*'
                      r'[KMGT]?i?B)', str(e))
    raise RunFailed(MEMORY_ADVICE.format(
        what=f'out of memory ({found.group(1) if found else _first_line(e)}'
             ')')) from e


MEMORY_ADVICE = ('{what}. A round holds chunk_size clients at once, each '
                 'with local_steps x batch_size examples: lower '
                 'config.chunk_size, config.client.batch_size, '
                 'config.client.local_steps (or client.epochs / '
                 'client.max_examples) or config.clients_per_round.')
