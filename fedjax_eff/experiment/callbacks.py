"""Hooks into the round loop for the user's own tools, and progress lines.

A callback is any object with some of these methods (a `Callback` subclass
gets no-op defaults for the rest), in the spirit of pfl's callbacks and
clu's periodic actions:

| method | called | with |
| --- | --- | --- |
| `on_round_end(round, metrics)` | after each round's line is written to metrics.jsonl | `round` = rounds done, `metrics` = that line |
| `on_evaluate(round, metrics)` | after each evaluation | the evaluation's metrics only |
| `on_checkpoint(round, directory)` | after a checkpoint of `round` is saved | the checkpoint directory |
| `on_run_end(summary)` | once, when the run ends (also a run already finished) | summary.json's content |

Pass them as `train_and_evaluate(config, workdir, callbacks=[...])`, or
from the command line as `--callbacks=FILE.py:FACTORY` (or
`package.module:FACTORY`), where `FACTORY(workdir, config)` returns the
callback: `examples/csv_logger.py` writes every round to a CSV file
without touching the library. An exception in a callback ends the run
like any other (what was saved stays saved).
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import os
import time
from typing import Any, Callable, Mapping, Sequence


class Callback:
  """No-op defaults: override the hooks you need."""

  def on_round_end(self, round_num: int, metrics: Mapping[str, Any]) -> None:
    pass

  def on_evaluate(self, round_num: int, metrics: Mapping[str, Any]) -> None:
    pass

  def on_checkpoint(self, round_num: int, directory: str) -> None:
    pass

  def on_run_end(self, summary: Mapping[str, Any]) -> None:
    pass


def call(callbacks: Sequence[Any], hook: str, *args) -> None:
  """`hook(*args)` on every callback that has it."""
  for cb in callbacks:
    fn = getattr(cb, hook, None)
    if fn is not None:
      fn(*args)


# What a progress line shows after the rate: the first of these present.
HEADLINE_KEYS = (
    ('test_perplexity', 'heldout_perplexity'),
    ('test_cer', 'test_wer', 'heldout_cer', 'heldout_wer'),
    ('test_accuracy', 'heldout_accuracy'),
)


def headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """The task's headline metrics among `metrics`: perplexity for language
  models, CER/WER for speech, accuracy otherwise (for SSL, the linear
  probe's)."""
  for group in HEADLINE_KEYS:
    found = {k: metrics[k] for k in group if metrics.get(k) is not None}
    if found:
      return found
  return {}


def _fmt(v: Any) -> str:
  return f'{v:.4f}' if isinstance(v, float) else str(v)


class ProgressLog(Callback):
  """One line per `every_seconds` (and at the first round, at each
  evaluation and at the end): rounds done, rate, ETA, loss, headline
  metrics. Meant for logs and non-interactive runs, where a progress bar
  would fill the file with carriage returns.

  `unit` names the steps ('round' or 'step'), `total` is how many.
  """

  def __init__(self, start: int, total: int, every_seconds: float = 30.0,
               unit: str = 'round',
               write: Callable[[str], None] = lambda s: print(s, flush=True)):
    self.start, self.total, self.every = start, total, every_seconds
    self.unit, self.write = unit, write
    self.t0 = time.time()
    self.last_line = None

  def on_round_end(self, round_num: int, metrics: Mapping[str, Any]) -> None:
    now = time.time()
    evaluated = bool(headline(metrics))
    if not (self.last_line is None or evaluated or round_num == self.total
            or now - self.last_line >= self.every):
      return
    self.last_line = now
    done = round_num - self.start
    rate = done / max(now - self.t0, 1e-9)
    eta = (self.total - round_num) / rate if rate > 0 else 0.0
    parts = [f'{self.unit} {round_num}/{self.total} '
             f'({100 * round_num / self.total:.0f}%)',
             f'{rate:.2f} {self.unit}s/s',
             f'ETA {datetime.timedelta(seconds=round(eta))}']
    shown = {k: metrics[k] for k in ('train_loss',) if k in metrics}
    shown.update(headline(metrics))
    self.write(', '.join(parts) + ' | ' + ' '.join(
        f'{k}={_fmt(v)}' for k, v in shown.items()))


def load(spec: str, workdir: str, config) -> Any:
  """The callback `FACTORY(workdir, config)` named by `FILE.py:FACTORY` or
  `package.module:FACTORY`; a `ValueError` naming the spec otherwise."""
  where, sep, name = spec.rpartition(':')
  if not sep or not where or not name:
    raise ValueError(f'--callbacks={spec!r} must be FILE.py:FACTORY or '
                     'package.module:FACTORY.')
  try:
    if where.endswith('.py'):
      if not os.path.isfile(where):
        raise ValueError(f'--callbacks={spec!r}: no such file {where}.')
      module_spec = importlib.util.spec_from_file_location(
          f'_fedjax_eff_callback_{abs(hash(where))}', where)
      module = importlib.util.module_from_spec(module_spec)
      module_spec.loader.exec_module(module)
    else:
      module = importlib.import_module(where)
  except ImportError as e:
    raise ValueError(f'--callbacks={spec!r}: cannot import {where} '
                     f'({e}).') from e
  factory = getattr(module, name, None)
  if factory is None:
    raise ValueError(f'--callbacks={spec!r}: {where} has no {name!r}.')
  return factory(workdir, config)
