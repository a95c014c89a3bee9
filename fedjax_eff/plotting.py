"""Curves of finished or running workdirs, several runs overlaid.

`plot_runs([workdir, ...], out)` draws one figure of up to three panels:
the run's quality metric against the round, against the cumulative upload
of the whole federation (sum over rounds of `upload_bits` x `num_clients`,
log x) and, where a run records it, against simulated device time
(`sim_hours`, or the running sum of `sim_round_seconds`). The legend names
each run by the config keys in which the runs differ
(`client.learning_rate=0.1`), or by its workdir when they do not differ.

The metric is the first family every run has: perplexity (language models),
character error rate (speech), accuracy (classification, and the linear
probe of federated SSL), else the training loss. The central test set is a
solid line, held-out clients a dashed one.

Reads `metrics.jsonl` and `config.json` (or `summary.json['config']`) with
numpy and matplotlib only: importing this module starts no JAX.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from typing import Any, Sequence

# Keys that change how a run is laid out, saved or shown, never what it
# learns: left out of legends unless they are all that differs.
LAYOUT_KEYS = frozenset({
    'progress', 'tensorboard', 'checkpoint_every', 'checkpoint_keep',
    'eval_batch_size', 'accounting', 'chunk_size', 'data_placement',
    'mesh_clients', 'max_failed_rounds', 'data.cache_dir',
    'pretrain.log_every', 'pretrain.checkpoint_every'})

MAX_LABEL_KEYS = 4  # then '(+N more)'
# Legend lines wrap at this many characters.
LABEL_WIDTH = 80

# (family, metric keys: solid then dashed line, axis label)
FAMILIES = (
    ('perplexity', ('test_perplexity', 'heldout_perplexity'), 'perplexity'),
    ('cer', ('test_cer', 'heldout_cer'), 'character error rate'),
    ('accuracy', ('test_accuracy', 'heldout_accuracy'), 'accuracy'),
    ('train_loss', ('train_loss',), 'training loss (cohort)'),
)


class RunError(ValueError):
  """A workdir that cannot be plotted (one line, for the command line)."""


def read_records(workdir: str) -> list[dict[str, Any]]:
  """`workdir/metrics.jsonl`, each round once (its first readable line),
  sorted by round. A torn line is skipped."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise RunError(f'{workdir}: no metrics.jsonl (not a run directory, or '
                   'the run has not finished a round yet)')
  by_round: dict[int, dict[str, Any]] = {}
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(rec, dict) and isinstance(rec.get('round'), int):
        by_round.setdefault(rec['round'], rec)
  if not by_round:
    raise RunError(f'{workdir}: metrics.jsonl holds no round yet')
  return [by_round[r] for r in sorted(by_round)]


def read_config(workdir: str) -> dict[str, Any]:
  """The run's config as recorded at its first start (`config.json`), else
  the one in `summary.json`; {} if neither is there."""
  for name, pick in (('config.json', lambda d: d),
                     ('summary.json', lambda d: d.get('config', {}))):
    path = os.path.join(workdir, name)
    if os.path.isfile(path):
      try:
        with open(path) as f:
          return pick(json.load(f)) or {}
      except (OSError, json.JSONDecodeError):
        continue
  return {}


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """Nested dicts and lists -> {'client.learning_rate': 0.1,
  'techniques[0].bits': 8, ...}."""
  if isinstance(tree, dict):
    items = [(f'{prefix}.{k}' if prefix else str(k), v)
             for k, v in tree.items()]
  elif isinstance(tree, list) and tree:
    items = [(f'{prefix}[{i}]', v) for i, v in enumerate(tree)]
  else:
    return {prefix: tree}
  out: dict[str, Any] = {}
  for key, value in items:
    out.update(flatten(value, key))
  return out


def _show(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, str):
    return value
  return json.dumps(value)


def run_name(workdir: str) -> str:
  return os.path.basename(os.path.normpath(workdir)) or workdir


def legend_labels(workdirs: Sequence[str],
                  configs: Sequence[dict[str, Any]] | None = None
                  ) -> list[str]:
  """One label per run: `key=value` for each config key whose value is not
  the same in every run (layout keys only when nothing else differs), in
  sorted key order; the workdir's name for a single run, for runs whose
  configs do not differ, and appended where two labels would be equal."""
  if configs is None:
    configs = [read_config(w) for w in workdirs]
  names = [run_name(w) for w in workdirs]
  if len(workdirs) < 2:
    return names
  flat = [flatten(c) for c in configs]
  keys = sorted(set().union(*flat))
  differ = [k for k in keys
            if len({json.dumps(f[k], default=str) if k in f else None
                    for f in flat}) > 1]
  # Keys every run has, then the rest (a key an older run lacks is usually
  # a default added since); layout keys only when nothing else differs.
  everywhere = [k for k in differ if all(k in f for f in flat)]
  shown = ([k for k in everywhere if k not in LAYOUT_KEYS] or
           [k for k in differ if k not in LAYOUT_KEYS] or differ)
  if not shown:
    return names
  more = len(shown) - MAX_LABEL_KEYS
  labels = [', '.join(f'{k}={_show(f[k]) if k in f else "unset"}'
                      for k in shown[:MAX_LABEL_KEYS]) +
            (f' (+{more} more)' if more > 0 else '') for f in flat]
  return [f'{label} ({name})' if labels.count(label) > 1 else label
          for label, name in zip(labels, names)]


def choose_family(runs: Sequence[list[dict[str, Any]]]
                  ) -> tuple[tuple[str, ...], str]:
  """(metric keys, axis label) of the first family in `FAMILIES` that every
  run has at least one value of."""
  for _, keys, label in FAMILIES:
    if all(any(isinstance(r.get(keys[0]), (int, float)) or
               isinstance(r.get(keys[-1]), (int, float)) for r in recs)
           for recs in runs):
      return keys, label
  return FAMILIES[-1][1], FAMILIES[-1][2]


def cumulative_upload_bits(records: list[dict[str, Any]],
                           default_clients: float = 0.0) -> list[float]:
  """Running sum over rounds of `upload_bits` (mean per client) x
  `num_clients` (the cohort), one value per record."""
  total, out = 0.0, []
  for r in records:
    bits = r.get('upload_bits') or 0.0
    total += float(bits) * float(r.get('num_clients') or default_clients)
    out.append(total)
  return out


def simulated_hours(records: list[dict[str, Any]]) -> list[float] | None:
  """Simulated device time at the end of each round, in hours: the
  records' `sim_hours`, else the running sum of `sim_round_seconds`;
  None if the run has neither."""
  if any('sim_hours' in r for r in records):
    return [float(r['sim_hours']) if r.get('sim_hours') is not None
            else math.nan for r in records]
  if any('sim_round_seconds' in r for r in records):
    total, out = 0.0, []
    for r in records:
      total += float(r.get('sim_round_seconds') or 0.0)
      out.append(total / 3600)
    return out
  return None


def plain_log_ticks(axis, values) -> None:
  """Ticks at 1, 2, 5 x 10^k on a log axis (10^k only when `values` span
  more than 2 decades), written plainly (50, 0.2)."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  vals = [v for v in values if v > 0]
  decades = math.log10(max(vals) / min(vals)) if vals else 0.0
  subs = (1.0, 2.0, 5.0) if decades <= 2 else (1.0,)
  axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
  axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f'{v:g}'))
  axis.set_minor_formatter(ticker.NullFormatter())


def _spans_decades(values: list[float]) -> bool:
  vals = [v for v in values if v > 0 and math.isfinite(v)]
  return bool(vals) and max(vals) / min(vals) >= 10


def plot_runs(workdirs: Sequence[str], out: str | None = None
              ) -> tuple[str, list[str]]:
  """Draws the runs' curves to `out` (default: WORKDIR/plot.png for one
  run, plot.png otherwise). Returns (path written, legend labels). Raises
  `RunError` for a workdir without metrics."""
  if not workdirs:
    raise RunError('no run given')
  runs = [read_records(w) for w in workdirs]
  configs = [read_config(w) for w in workdirs]
  labels = legend_labels(workdirs, configs)
  keys, ylabel = choose_family(runs)
  task = configs[0].get('task')
  if isinstance(task, dict) and task.get('name') == 'contrastive':
    ylabel = 'linear-probe ' + ylabel
  if out is None:
    out = (os.path.join(workdirs[0], 'plot.png') if len(workdirs) == 1
           else 'plot.png')

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top

  xs = {'round': [[float(r['round']) for r in recs] for recs in runs],
        'upload': [cumulative_upload_bits(
            recs, float(c.get('clients_per_round') or 0))
                   for recs, c in zip(runs, configs)],
        'sim': [simulated_hours(recs) for recs in runs]}
  panels = [('round', 'round', False),
            ('upload', 'cumulative upload, all clients (bits)', True)]
  if any(x is not None for x in xs['sim']):
    panels.append(('sim', 'simulated time (hours)', False))
  fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6),
                           squeeze=False)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  all_y: list[float] = []
  for ax, (panel, xlabel, logx) in zip(axes[0], panels):
    shown_x: list[float] = []
    for i, recs in enumerate(runs):
      x = xs[panel][i]
      if x is None:
        continue
      for key, style in zip(keys, ('-', '--')):
        pts = [(xv, float(r[key])) for xv, r in zip(x, recs)
               if isinstance(r.get(key), (int, float)) and
               math.isfinite(float(r[key])) and math.isfinite(xv) and
               (xv > 0 or not logx)]
        if pts:
          all_y += [p[1] for p in pts]
          shown_x += [p[0] for p in pts]
          ax.plot(*zip(*pts), style, color=colors[i % len(colors)],
                  marker='.' if len(pts) < 30 else None, markersize=4)
    ax.set_xlabel(xlabel)
    if panel == 'round':
      ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if logx:
      ax.set_xscale('log')
      plain_log_ticks(ax.xaxis, shown_x)
    ax.grid(True, alpha=0.3)
  for ax in axes[0]:
    if _spans_decades(all_y):
      ax.set_yscale('log')
  split = (' (solid: test set, dashed: held-out clients)'
           if len(keys) > 1 and any(
               isinstance(r.get(keys[1]), (int, float))
               for recs in runs for r in recs) else '')
  axes[0][0].set_ylabel(ylabel)
  fig.suptitle(ylabel + split, fontsize=10)
  handles = [matplotlib.lines.Line2D([], [], color=colors[i % len(colors)])
             for i in range(len(runs))]
  wrapped = [textwrap.fill(l, LABEL_WIDTH, subsequent_indent='  ')
             for l in labels]
  ncol = 1 if max(map(len, labels)) > 40 else min(len(labels), 3)
  legend = fig.legend(handles, wrapped, loc='lower center', ncol=ncol,
                      fontsize=8, frameon=False)
  fig.tight_layout()
  # Room under the panels for the legend's rows.
  fig.canvas.draw()
  legend_h = legend.get_window_extent().height / fig.bbox.height
  fig.subplots_adjust(bottom=min(0.6, fig.subplotpars.bottom + legend_h))
  directory = os.path.dirname(os.path.abspath(out))
  os.makedirs(directory, exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out, labels
