"""Figures of two RESULTS.md tables, drawn from the JSON in results/.

  python benchmarks/plot_tables.py        # writes results/scaling.png and
                                          # results/device_cost.png

scaling.png: cohort scaling, clients/s and memory per client against
clients per round K (log-log), from `results/accelerator_suite.json`
(`benchmarks/accelerator_suite.py`, one NVIDIA H200, C = 128: device
allocator peak / K, the resident data included) and every
`results/scaling*.json` that `benchmarks/scaling.py --out` writes (CPU,
C = 1: host peak RSS above setup / K, what the cohort adds beyond the data
set).

device_cost.png: what one device pays per round under each layer technique
(compiled peak memory, FLOPs, upload), from the JSON line that ends each
`results/device_cost_*.txt` (`benchmarks/device_cost.py`); by default the
12-layer ViT 'base' (at the tiny preset padding dominates, see
`accounting`'s caveats).

Nothing is run: the figures are redrawn from the files.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import plots

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'results')


def _machine(d: dict) -> str:
  if d.get('device_kind'):
    return d['device_kind']
  m = d.get('machine') or {}
  return f"{d.get('backend', 'cpu').upper()} ({m.get('cpu', '?')})"


def scaling_series(suite: dict | None, cpu: list[dict]) -> list[dict]:
  """One series per (machine, model): K, clients/s, memory per client."""
  series = []
  if suite:
    for model, by_k in suite.get('scaling', {}).items():
      ks = sorted(by_k, key=int)
      series.append(dict(
          label=f"{_machine(suite)} {model}, C = "
          f"{suite.get('best_chunk', {}).get(model, '?')}",
          k=[int(k) for k in ks],
          clients_per_second=[by_k[k]['clients_per_second'] for k in ks],
          memory=[by_k[k]['memory_per_client_bytes'] for k in ks],
          data=[by_k[k]['data_bytes'] / int(k) for k in ks],
          memory_kind='device peak / K'))
  for d in cpu:
    above = d.get('peak_rss_above_setup_bytes', {})
    for model, by_k in d.get('clients_per_second', {}).items():
      ks = sorted(by_k, key=int)
      series.append(dict(
          label=f"{_machine(d)} {model}, C = "
          f"{d.get('config', {}).get('chunk_size', '?')}",
          k=[int(k) for k in ks], clients_per_second=[by_k[k] for k in ks],
          memory=[above[model][k] / int(k) if k in above.get(model, {})
                  else None for k in ks],
          data=None, memory_kind='host RSS above setup / K'))
  return series


def plot_scaling(series: list[dict], path: str) -> None:
  plt = plots._pyplot()  # pylint: disable=protected-access
  if plt is None:
    return
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.3))
  for i, s in enumerate(series):
    gpu = s['data'] is not None
    style = dict(color=f'C{i}', marker='o' if gpu else 's', ms=4, lw=1.3,
                 ls='-' if gpu else '--')
    ax_t.plot(s['k'], s['clients_per_second'], **style, label=s['label'])
    pts = [(k, m) for k, m in zip(s['k'], s['memory']) if m]
    if pts:
      ax_m.plot(*zip(*pts), **style,
                label=f"{s['label']}: {s['memory_kind']}")
  data = next((s for s in series if s['data']), None)
  if data:
    ax_m.plot(data['k'], data['data'], ':', color='0.4', lw=1.2,
              label=f"resident data per client "
              f"({data['data'][0] / 1e3:.1f} KB)")
  for ax, ylabel in ((ax_t, 'clients / s (end to end)'),
                     (ax_m, 'memory per client (bytes)')):
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('clients per round K')
    ax.set_ylabel(ylabel)
    ax.grid(True, which='both', alpha=0.3, lw=0.5)
  ax_t.set_title('Cohort scaling: throughput', fontsize=9)
  ax_m.set_title('Cohort scaling: memory per client', fontsize=9)
  handles, labels = ax_m.get_legend_handles_labels()
  fig.legend(handles, labels, loc='lower center', ncol=2, fontsize=7.5,
             frameon=False)
  fig.tight_layout()
  fig.canvas.draw()
  legend_h = fig.legends[0].get_window_extent().height / fig.bbox.height
  fig.subplots_adjust(bottom=fig.subplotpars.bottom + legend_h)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f'plot: {path}')


def read_device_cost(path: str) -> dict:
  """The JSON line that ends a `benchmarks/device_cost.py` output."""
  with open(path) as f:
    lines = [l for l in f if l.startswith('{')]
  if not lines:
    raise SystemExit(f'error: {path}: no JSON line (device_cost.py output?)')
  return json.loads(lines[-1])


COST_COLUMNS = (('device_peak_bytes', 'device peak memory (MB)', 1e6),
                ('device_flops_per_round', 'GFLOPs per round', 1e9),
                ('upload_bits', 'upload per round (MB)', 8e6))


def plot_device_cost(cost: dict, path: str) -> None:
  plt = plots._pyplot()  # pylint: disable=protected-access
  if plt is None:
    return
  rows = cost['variants']
  names = list(rows)[::-1]  # 'full' on top
  fig, axes = plt.subplots(1, len(COST_COLUMNS), sharey=True,
                           figsize=(11, 0.32 * len(names) + 1.6))
  base = rows.get('full')
  for ax, (key, title, unit) in zip(axes, COST_COLUMNS):
    vals = [rows[n][key] / unit if rows[n][key] is not None else 0.0
            for n in names]
    ax.barh(names, vals, color=['C3' if n == 'full' else 'C0'
                                for n in names], height=0.6)
    top = max(vals)
    for y, (n, v) in enumerate(zip(names, vals)):
      ratio = (f'  ÷{base[key] / rows[n][key]:.1f}'
               if base and n != 'full' and rows[n][key] else '')
      shown = f'{v:,.0f}' if v >= 100 else f'{v:.3g}'
      ax.text(v + top * 0.01, y, shown + ratio, va='center', fontsize=7)
    ax.set_xlim(0, top * 1.35)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis='x', alpha=0.3, lw=0.5)
  fig.suptitle(f"What one device pays per round: {cost['model']} "
               f"({cost['num_params']:,} parameters), jax "
               f"{cost.get('jax', '?')} on {cost.get('backend', '?')}; "
               '÷: less than full', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f'plot: {path}')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--suite', default=os.path.join(
      RESULTS, 'accelerator_suite.json'))
  parser.add_argument('--scaling', nargs='*', default=None,
                      help='scaling.py JSON files (default: '
                      'results/scaling*.json)')
  parser.add_argument('--device_cost', default=os.path.join(
      RESULTS, 'device_cost_base.txt'))
  parser.add_argument('--out_dir', default=RESULTS)
  args = parser.parse_args(argv)
  suite = None
  if os.path.exists(args.suite):
    with open(args.suite) as f:
      suite = json.load(f)
  cpu = []
  for p in (args.scaling if args.scaling is not None else
            sorted(glob.glob(os.path.join(RESULTS, 'scaling*.json')))):
    with open(p) as f:
      d = json.load(f)
    if d.get('benchmark') == 'scaling':
      cpu.append(d)
  plot_scaling(scaling_series(suite, cpu),
               os.path.join(args.out_dir, 'scaling.png'))
  plot_device_cost(read_device_cost(args.device_cost),
                   os.path.join(args.out_dir, 'device_cost.png'))


if __name__ == '__main__':
  main()
