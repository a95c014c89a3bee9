"""A study: the cross product of config values x seeds, one workdir a cell.

`launch/sweep.py --config=... --grid KEY=V1,V2 [--grid ...] --seeds N
--workdir=DIR` is `run_sweep`: each cell (one value per swept key, one
seed) runs `train_and_evaluate(config, DIR/<cell name>)` in this process,
one after the other, so each cell is an ordinary run (metrics.jsonl,
summary.json, checkpoints) and an interrupted sweep resumes: a finished
cell (its summary.json has `rounds == num_rounds` and its config is the
cell's) is skipped, an unfinished one resumes through the run's own resume.
A cell that is refused or fails (`RunRefused`, `RunFailed`, bad input) is
recorded in the `status` column and the sweep goes on.

Then `write_outputs` writes `DIR/summary.csv` (a row per cell: the swept
keys, seed, status, every final metric, the device cost of the first
(stage, tier), the wall time), `DIR/summary.md` (mean ± sd over seeds per
grid point) and `DIR/<metric>_vs_<key>.png` (the headline metrics and the
training loss against each swept key of two values or more, error bars over seeds, the other
swept keys as separate lines).

Everything but `run_sweep` and `plot_metric` is a pure function.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import math
import os
import re
import time
from typing import Any, Callable, Sequence

from fedjax_eff.experiment import callbacks as callbacks_lib
from fedjax_eff.experiment import errors
from fedjax_eff.experiment import validation
from fedjax_eff.experiment import workdir as workdir_lib

SEED = 'seed'
# Device costs copied from summary['device_cost'][0] (per client).
COST_KEYS = ('device_peak_bytes', 'device_flops_per_round', 'upload_bits')


class SweepError(ValueError):
  """Bad sweep input (one line, exit 2 on the command line)."""


def _parse_value(key: str, text: str, current: Any) -> Any:
  """`text` as the type of the config's `current` value of `key`."""
  text = text.strip()
  where = f'--grid {key}: value {text!r}'
  if isinstance(current, bool):
    low = text.lower()
    if low in ('true', '1', 'yes'):
      return True
    if low in ('false', '0', 'no'):
      return False
    raise SweepError(f'{where} is not a boolean (true/false).')
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise SweepError(f'{where} is not an integer.') from None
  if isinstance(current, float):
    try:
      value = float(text)
    except ValueError:
      raise SweepError(f'{where} is not a number.') from None
    if not math.isfinite(value):
      raise SweepError(f'{where} is not a finite number.')
    return value
  if isinstance(current, str):
    if not text:
      raise SweepError(f'{where} is empty.')
    return text
  if current is None:  # an unset knob: a number if it reads as one
    for kind in (int, float):
      try:
        return kind(text)
      except ValueError:
        pass
    return text
  raise SweepError(f'--grid {key}: a {type(current).__name__} value '
                   'cannot be swept (numbers, booleans and strings can).')


def get_value(config, key: str) -> Any:
  """config's value at dotted `key` (`a.b`, `a[0].b`)."""
  from ml_collections.config_flags import config_path  # pylint: disable=g-import-not-at-top
  return config_path.get_value(key, config)


def parse_grid(specs: Sequence[str], config, seeds: int | None = None
               ) -> list[tuple[str, list[Any]]]:
  """`['KEY=V1,V2', ...]` -> `[(KEY, [v1, v2]), ...]` with each value of the
  type of `config`'s existing value; `seeds`: N adds `('seed', [0..N-1])`.
  Raises `SweepError` naming the bad key (with the closest existing one)
  or value."""
  grid: list[tuple[str, list[Any]]] = []
  for spec in specs:
    key, sep, values = spec.partition('=')
    key = key.strip()
    if key.startswith('config.'):
      key = key[len('config.'):]
    if not sep or not key or not values.strip():
      raise SweepError(f'--grid {spec!r}: expected KEY=V1,V2,... '
                       '(e.g. client.learning_rate=0.01,0.1).')
    if not validation._has_key(config, key):  # pylint: disable=protected-access
      close = validation.suggest(key, validation.dotted_keys(config))
      raise SweepError(f'--grid: unknown config key config.{key}' + (
          f' (did you mean config.{close}?)' if close else '') +
                       '; see fedjax_eff/experiment/defaults.py.')
    if any(key == k for k, _ in grid):
      raise SweepError(f'--grid {key} is given twice; list all its values '
                       'in one --grid.')
    if key == SEED and seeds:
      raise SweepError('--grid seed=... and --seeds both set the seed; '
                       'use one.')
    current = get_value(config, key)
    parsed = [_parse_value(key, v, current) for v in values.split(',')]
    if len(set(map(repr, parsed))) != len(parsed):
      raise SweepError(f'--grid {spec!r}: a value is listed twice.')
    grid.append((key, parsed))
  if seeds is not None:
    if seeds < 1:
      raise SweepError(f'--seeds={seeds} must be at least 1.')
    grid.append((SEED, list(range(seeds))))
  if not grid:
    raise SweepError('nothing to sweep: pass --grid KEY=V1,V2 and/or '
                     '--seeds N.')
  return grid


def cells(grid: Sequence[tuple[str, Sequence[Any]]]) -> list[dict[str, Any]]:
  """The cross product, first key slowest: `[{key: value, ...}, ...]`."""
  keys = [k for k, _ in grid]
  return [dict(zip(keys, combo))
          for combo in itertools.product(*(v for _, v in grid))]


def show(value: Any) -> str:
  """A value as a cell name or table shows it (0.03, true, fedadam)."""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, float):
    return repr(value)
  return str(value)


def cell_name(cell: dict[str, Any]) -> str:
  """`client.learning_rate=0.03,clients_per_round=10,seed=1`: a safe file
  name (characters other than letters, digits and `._=,+-` become `_`)."""
  name = ','.join(f'{k}={show(v)}' for k, v in cell.items())
  return re.sub(r'[^A-Za-z0-9._=,+\-]', '_', name)


def cell_config(config, cell: dict[str, Any]):
  """A copy of `config` with the cell's values set."""
  from ml_collections.config_flags import config_path  # pylint: disable=g-import-not-at-top
  c = copy.deepcopy(config)
  for key, value in cell.items():
    config_path.set_value(key, c, value)
  return c


def read_summary(workdir: str) -> dict[str, Any] | None:
  """workdir/summary.json, or None."""
  try:
    with open(os.path.join(workdir, 'summary.json')) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def finished(workdir: str, config) -> dict[str, Any] | None:
  """The cell's summary when `workdir` holds its finished run: summary.json
  with `rounds == config.num_rounds` and no trajectory key changed."""
  summary = read_summary(workdir)
  if summary is None or summary.get('rounds') != config.num_rounds:
    return None
  changed = workdir_lib.config_differences(summary.get('config') or {},
                                           workdir_lib.config_dict(config))
  if any(not workdir_lib._resumable(k) for k in changed):  # pylint: disable=protected-access
    return None
  return summary


def _number(v: Any) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v))


def row(cell: dict[str, Any], summary: dict[str, Any] | None,
        status: str) -> dict[str, Any]:
  """One line of summary.csv: the cell's values, `status`, the final
  metrics, the first device cost, the run's wall time."""
  out = dict(cell)
  out['status'] = status
  if summary is None:
    return out
  out.update(summary.get('final_metrics') or {})
  costs = summary.get('device_cost') or []
  if costs:
    for k in COST_KEYS:  # upload_bits: the final round's, if recorded
      out.setdefault(k, costs[0].get(k))
  out['wall_time_seconds'] = summary.get('wall_time_seconds')
  return out


def columns(rows: Sequence[dict[str, Any]], keys: Sequence[str]
            ) -> list[str]:
  """The swept keys, status, then every other column in first-seen order
  (round first among them)."""
  cols = list(keys) + ['status']
  rest = []
  for r in rows:
    rest += [k for k in r if k not in cols and k not in rest]
  front = [k for k in ('round',) if k in rest]
  return cols + front + [k for k in rest if k not in front]


def to_csv(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
  cols = columns(rows, keys)
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator='\n')
  w.writerow(cols)
  for r in rows:
    w.writerow(['' if r.get(c) is None else
                show(r[c]) if c in keys else r[c] for c in cols])
  return buf.getvalue()


def metric_keys(rows: Sequence[dict[str, Any]], keys: Sequence[str]
                ) -> list[str]:
  """Numeric result columns (not the swept keys, not `round`)."""
  skip = set(keys) | {'status', 'round'}
  return [c for c in columns(rows, keys) if c not in skip and any(
      _number(r.get(c)) for r in rows)]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value)."""
  n = len(values)
  mean = sum(values) / n
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 \
      else 0.0
  return mean, sd


def aggregate(rows: Sequence[dict[str, Any]], keys: Sequence[str]
              ) -> list[dict[str, Any]]:
  """One entry per grid point (the swept keys but the seed), over the
  cells that finished: `{key: value, ..., 'n': seeds, 'failed': k,
  metric: (mean, sd), ...}` in the grid's order."""
  point_keys = [k for k in keys if k != SEED]
  metrics = metric_keys(rows, keys)
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for r in rows:
    groups.setdefault(tuple(repr(r.get(k)) for k in point_keys), []).append(r)
  out = []
  for members in groups.values():
    ok = [r for r in members if r.get('status') == 'ok']
    entry = {k: members[0].get(k) for k in point_keys}
    entry['n'] = len(ok)
    entry['failed'] = len(members) - len(ok)
    for m in metrics:
      vals = [float(r[m]) for r in ok if _number(r.get(m))]
      entry[m] = mean_sd(vals) if vals else None
    out.append(entry)
  return out


def _fmt(v: float) -> str:
  return f'{v:.4g}'


def to_markdown(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
  """The aggregate as a markdown table: mean ± sd over seeds."""
  point_keys = [k for k in keys if k != SEED]
  metrics = metric_keys(rows, keys)
  groups = aggregate(rows, keys)
  head = point_keys + ['n seeds'] + metrics
  lines = ['| ' + ' | '.join(head) + ' |',
           '|' + '|'.join(' --- ' for _ in head) + '|']
  for g in groups:
    n = str(g['n']) + (f' ({g["failed"]} failed)' if g['failed'] else '')
    cells_ = [show(g[k]) for k in point_keys] + [n] + [
        '' if g[m] is None else
        f'{_fmt(g[m][0])} ± {_fmt(g[m][1])}' for m in metrics]
    lines.append('| ' + ' | '.join(cells_) + ' |')
  return '\n'.join(lines) + '\n'


def plotted_metrics(rows: Sequence[dict[str, Any]]) -> list[str]:
  """The headline metrics (`callbacks.headline`: perplexity, CER/WER or
  accuracy, test and held-out) the cells report, and the training loss."""
  found: list[str] = []
  for r in rows:
    if r.get('status') == 'ok':
      found += [k for k in callbacks_lib.headline(r) if k not in found]
  if any(_number(r.get('train_loss')) for r in rows):
    found.append('train_loss')
  return found


def series(rows: Sequence[dict[str, Any]], keys: Sequence[str], x_key: str,
           metric: str) -> dict[str, list[tuple[Any, float, float]]]:
  """{label of the other swept keys: [(x, mean, sd), ...]} for a plot of
  `metric` against `x_key`, x in the grid's order."""
  others = [k for k in keys if k not in (x_key, SEED)]
  out: dict[str, list[tuple[Any, float, float]]] = {}
  for g in aggregate(rows, keys):
    if g.get(metric) is None:
      continue
    label = ', '.join(f'{k}={show(g[k])}' for k in others)
    out.setdefault(label, []).append((g[x_key], *g[metric]))
  return out


def plot_metric(rows, keys, x_key: str, metric: str, path: str) -> bool:
  """Draws `metric` against `x_key` to `path`; False without matplotlib or
  without points."""
  from fedjax_eff import plotting  # pylint: disable=g-import-not-at-top
  lines = series(rows, keys, x_key, metric)
  if not lines:
    return False
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  xs = [x for pts in lines.values() for x, _, _ in pts]
  numeric = all(_number(x) for x in xs)
  order = list(dict.fromkeys(xs))  # categorical positions, grid order
  fig, ax = plt.subplots(figsize=(5.2, 3.8))
  for label, pts in lines.items():
    x = [p[0] if numeric else order.index(p[0]) for p in pts]
    ax.errorbar(x, [p[1] for p in pts], yerr=[p[2] for p in pts],
                marker='o', markersize=4, capsize=3, label=label or None)
  if numeric and plotting._spans_decades([float(x) for x in xs]):  # pylint: disable=protected-access
    ax.set_xscale('log')
    ax.set_xticks(order, [show(x) for x in order])  # the grid's values
    ax.minorticks_off()
  if not numeric:
    ax.set_xticks(range(len(order)), [show(x) for x in order])
  ax.set_xlabel(x_key)
  ax.set_ylabel(metric + ' (mean ± sd over seeds)')
  ax.grid(True, alpha=0.3)
  if any(lines):
    ax.legend(fontsize=7, frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def write_outputs(workdir: str, rows: Sequence[dict[str, Any]],
                  keys: Sequence[str]) -> list[str]:
  """summary.csv, summary.md and the plots; returns the paths written."""
  written = []
  for name, text in (('summary.csv', to_csv(rows, keys)),
                     ('summary.md', to_markdown(rows, keys))):
    path = os.path.join(workdir, name)
    workdir_lib.write_atomic(path, text)
    written.append(path)
  swept = [k for k in keys if k != SEED and len({repr(r.get(k))
                                                  for r in rows}) > 1]
  for metric in plotted_metrics(rows):
    for key in swept:
      path = os.path.join(workdir, f'{metric}_vs_{key}.png')
      if plot_metric(rows, keys, key, metric, path):
        written.append(path)
  return written


def _duration(seconds: float) -> str:
  s = int(round(seconds))
  return (f'{s // 3600}h{s % 3600 // 60:02d}m' if s >= 3600 else
          f'{s // 60}m{s % 60:02d}s' if s >= 60 else f'{s}s')


# What a cell may end with and the sweep goes on.
CELL_ERRORS = (errors.RunRefused, errors.RunFailed, ValueError)


def run_as_replicas(config, todo, workdir: str, log) -> dict[str, int]:
  """Runs the unfinished cells that differ only in replica values (seeds,
  learning rates, FedProx μ, server optimizer constants, technique knobs
  that keep shapes: `replicas.shape_key`) as replicas of one program, a group
  at a time (`replicas.run_replicas`); returns {cell name: replicas in
  its program}. A group that cannot run so is left to the cell loop."""
  from fedjax_eff.experiment import replicas  # pylint: disable=g-import-not-at-top
  groups: dict[str, list] = {}
  for cell in todo:
    cfg = cell_config(config, cell)
    cell_dir = os.path.join(workdir, cell_name(cell))
    if finished(cell_dir, cfg) is None and not os.path.exists(
        os.path.join(cell_dir, 'checkpoints')):
      groups.setdefault(replicas.shape_key(cfg), []).append(
          (cell_name(cell), cfg, cell_dir))
  ran = {}
  for group in groups.values():
    cfgs = [g[1] for g in group]
    if len(group) < 2 or not replicas.can_replicate(cfgs):
      continue
    names = [g[0] for g in group]
    log(f'replicas: {len(group)} cells in one program: {", ".join(names)}')
    t0 = time.time()
    try:
      replicas.run_replicas(cfgs, [g[2] for g in group], log=log)
    except (*CELL_ERRORS,) as e:
      log(f'replicas: {" ".join(str(e).split())}; the cells run one by one')
      continue
    log(f'replicas: done in {_duration(time.time() - t0)}')
    ran.update({n: len(group) for n in names})
  return ran


def run_sweep(config, grid: Sequence[tuple[str, Sequence[Any]]],
              workdir: str, *, run: Callable[..., dict[str, Any]] | None = None,
              log: Callable[[str], None] = print, replicas: bool = True
              ) -> tuple[list[dict[str, Any]], list[str]]:
  """Runs every cell of `grid` on `config` in `workdir/<cell name>` (one
  after the other; finished cells skipped) and writes the sweep's outputs.
  `run(config, workdir)`: `train_and_evaluate` by default. With `replicas`
  (and the default `run`), unfinished cells that differ only in replica
  values (`replicas.shape_key`) first run as replicas of one program
  (`run_as_replicas`). Returns (rows, names of the failed cells). A signal
  (`RunInterrupted`) ends the sweep after its cell saved; the same command
  resumes."""
  default_run = run is None
  if run is None:
    from fedjax_eff.experiment import train_and_evaluate  # pylint: disable=g-import-not-at-top
    run = train_and_evaluate
  from fedjax_eff.data.sources import DatasetNotPreparedError  # pylint: disable=g-import-not-at-top
  keys = [k for k, _ in grid]
  todo = cells(grid)
  workdir_lib.make_workdir(workdir)
  as_replicas = (run_as_replicas(config, todo, workdir, log)
                 if replicas and default_run else {})
  rows, failed, ran_seconds, ran = [], [], 0.0, 0
  for i, cell in enumerate(todo, start=1):
    name = cell_name(cell)
    cfg = cell_config(config, cell)
    cell_dir = os.path.join(workdir, name)
    tag = f'[cell {i}/{len(todo)}] {name}'
    summary = finished(cell_dir, cfg)
    if summary is not None:
      how = (f'ran as one of {as_replicas[name]} replicas'
             if name in as_replicas else 'finished before, skipped')
      log(f'{tag}: {how}')
      rows.append(row(cell, summary, 'ok'))
      continue
    log(f'{tag}: start')
    t0 = time.time()
    try:
      run(cfg, cell_dir)
      # As written (JSON numbers): a rerun that skips the cell reads the same.
      summary, status = read_summary(cell_dir), 'ok'
    except (*CELL_ERRORS, DatasetNotPreparedError) as e:
      summary = None
      kind = 'failed' if isinstance(e, errors.RunFailed) else 'refused'
      status = f'{kind}: ' + ' '.join(str(e).split())
      failed.append(name)
    seconds = time.time() - t0
    ran_seconds, ran = ran_seconds + seconds, ran + 1
    left = len(todo) - i
    eta = f', ETA {_duration(ran_seconds / ran * left)}' if left else ''
    shown = ''
    if summary is not None:
      final = summary.get('final_metrics') or {}
      head = dict(callbacks_lib.headline(final))
      if 'train_loss' in final:
        head['train_loss'] = final['train_loss']
      shown = ' ' + ', '.join(
          f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
          for k, v in head.items())
    log(f'{tag}: {"done" if status == "ok" else status} in '
        f'{_duration(seconds)}{shown}{eta}')
    rows.append(row(cell, summary, status))
  write_outputs(workdir, rows, keys)
  return rows, failed
