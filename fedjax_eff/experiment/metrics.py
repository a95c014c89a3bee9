"""Metrics out of a run: `metrics.jsonl`, TensorBoard events, a progress bar.

`metrics.jsonl` holds one JSON object per line with `round` (rounds done) and
every metric of that round. On resume the lines of rounds after the restored
checkpoint are dropped, so the file reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np


def to_python(value: Any) -> Any:
  """numpy/jax scalars -> float/int; NaN/inf -> None (valid JSON)."""
  if isinstance(value, Mapping):
    return {k: to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_python(v) for v in value]
  if hasattr(value, 'shape') and np.shape(value) == ():
    value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class MetricWriter:
  """Appends per-round metrics to `workdir/metrics.jsonl` and TensorBoard."""

  def __init__(self, workdir: str, resume_round: int = 0,
               tensorboard: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(self.path):
      kept = []
      with open(self.path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            continue  # a line cut short by a crash
          if record.get('round', 0) <= resume_round:
            kept.append(json.dumps(record))
      with open(self.path, 'w') as f:
        f.writelines(k + '\n' for k in kept)
    self._file = open(self.path, 'a')
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'),
                               purge_step=resume_round + 1)

  def write(self, round_num: int, metrics: Mapping[str, Any]) -> None:
    record = {'round': int(round_num), **to_python(dict(metrics))}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != 'round' and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, round_num)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]
