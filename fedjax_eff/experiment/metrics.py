"""Metrics out of a run: `metrics.jsonl`, TensorBoard events, a progress bar.

`metrics.jsonl` holds one JSON object per line with `round` (rounds done) and
every metric of that round. On resume the lines of rounds after the restored
checkpoint are dropped, so the file reads as if the run had never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, Mapping

import numpy as np

from fedjax_eff.experiment.workdir import config_dict, flatten, write_atomic


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
  """Appends per-round metrics to `workdir/metrics.jsonl` and TensorBoard.

  On resume the file is rewritten (atomically) to rounds `1..resume_round`,
  each once: lines of later rounds, torn lines and repeats are dropped.
  Every write is flushed; an I/O error (a full disk) raises in the caller's
  thread, TensorBoard's included.
  """

  def __init__(self, workdir: str, resume_round: int = 0,
               tensorboard: bool = True, config=None):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(self.path):
      kept = [json.dumps(r) for r in read_metrics(workdir)
              if r['round'] <= resume_round]
      write_atomic(self.path, ''.join(k + '\n' for k in kept))
    self._file = open(self.path, 'a')
    self._tb = None
    if tensorboard:
      self._tb = TensorBoardWriter(os.path.join(workdir, 'tensorboard'),
                                   purge_step=resume_round + 1)
      if config is not None and resume_round == 0:
        with _naming(self._tb.path):
          self._tb.config(config)

  def write(self, round_num: int, metrics: Mapping[str, Any]) -> None:
    record = {'round': int(round_num), **to_python(dict(metrics))}
    with _naming(self.path):
      self._file.write(json.dumps(record) + '\n')
      self._file.flush()
    if self._tb is not None:
      with _naming(self._tb.path):
        self._tb.scalars(round_num, {k: v for k, v in record.items()
                                     if k != 'round'})

  def close(self) -> None:
    try:
      with _naming(self.path):
        self._file.close()
    finally:
      if self._tb is not None:
        with _naming(self._tb.path):
          self._tb.close()


_TAG_GROUPS = (
    ('train/', ('train_', 'num_clients', 'num_dropped', 'server_step')),
    ('eval/', ('test_', 'heldout_', 'keep', 'task', 'probe_')),
    ('cost/', ('upload_bits', 'download_bits', 'device_', 'tier', 'sim_')),
    ('time/', ('round_seconds', 'host_wait_seconds')),
)


def tensorboard_tag(key: str) -> str:
  """`train/`, `eval/`, `cost/` or `time/` + the metrics.jsonl key (other
  keys under `other/`), so TensorBoard groups them in sections."""
  for group, prefixes in _TAG_GROUPS:
    if key.startswith(prefixes):
      return group + key
  return 'other/' + key


@contextlib.contextmanager
def _naming(path: str):
  """An OSError without a file name (a failed write) gets `path`."""
  try:
    yield
  except OSError as e:
    if e.filename:
      raise
    raise OSError(e.errno, e.strerror or str(e), path) from e


class TensorBoardWriter:
  """Scalars into a TensorBoard event file, written in the caller's thread.

  tensorboardX's `SummaryWriter` writes from a thread fed by a bounded
  queue; when that thread dies (a full disk) the next `add_scalar` blocks
  forever. Written synchronously, the error reaches the round loop. Events
  of steps >= `purge_step` from an earlier, crashed attempt are hidden by
  TensorBoard (a SessionLog START at `purge_step`, as SummaryWriter does).
  """

  def __init__(self, logdir: str, purge_step: int | None = None):
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._summary, self._pb = summary, event_pb2
    os.makedirs(logdir, exist_ok=True)
    self._writer = EventsWriter(os.path.join(logdir, 'events'))
    self.path = self._writer._file_name  # pylint: disable=protected-access
    if purge_step is not None:
      self._writer.write_event(event_pb2.Event(
          step=purge_step, session_log=event_pb2.SessionLog(
              status=event_pb2.SessionLog.START)))
    self._writer.flush()

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    """Each number under its group's tag (`tensorboard_tag`)."""
    for k, v in values.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        self._writer.write_event(self._pb.Event(
            wall_time=time.time(), step=int(step),
            summary=self._summary.scalar(tensorboard_tag(k), float(v))))
    self._writer.flush()

  def config(self, config) -> None:
    """The config as text (TEXT tab) and as hparams (HPARAMS tab, against
    the headline eval metrics), once at a run's first start."""
    flat = flatten(config_dict(config))
    text = '\n'.join(f'    {k} = {v!r}' for k, v in sorted(flat.items()))
    hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
               for k, v in flat.items() if v is not None}
    metrics = {tensorboard_tag(k): 0.0 for k in (
        'test_accuracy', 'heldout_accuracy', 'test_perplexity', 'test_cer',
        'train_loss')}
    summaries = [self._summary.text('config', text),
                 *self._summary.hparams(hparams, metrics)]
    for summary in summaries:
      self._writer.write_event(self._pb.Event(wall_time=time.time(),
                                              summary=summary))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The readable records of `workdir/metrics.jsonl`, in order, each round
  once (its first line); a torn or foreign line is skipped."""
  records, seen = [], set()
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return records
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a crash
      if isinstance(record, dict) and isinstance(record.get('round'), int):
        if record['round'] not in seen:
          seen.add(record['round'])
          records.append(record)
  return records


def complete_rounds(workdir: str) -> int:
  """The largest k such that metrics.jsonl holds every round 1..k: a resume
  must restart at or before the first round whose line is missing."""
  have = {r['round'] for r in read_metrics(workdir)}
  k = 0
  while k + 1 in have:
    k += 1
  return k
