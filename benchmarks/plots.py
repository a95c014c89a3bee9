"""The one plot the benchmarks share: labelled points on a log-x scatter.

Imported by the scripts next to it (`python benchmarks/X.py` puts this
directory on `sys.path`). matplotlib is optional: without it, no plot.
"""

from __future__ import annotations


def labelled_scatter(points: dict[str, tuple[float, float]], path: str, *,
                     xlabel: str, ylabel: str, title: str,
                     square=lambda name: False) -> None:
  """`points`: label -> (x, y); x on a log scale; `square(label)` picks a
  square marker (e.g. the baselines)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print('matplotlib is not installed: no plot')
    return
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for name, (x, y) in points.items():
    ax.scatter(x, y, marker='s' if square(name) else 'o')
    ax.annotate(name, (x, y), textcoords='offset points', xytext=(4, 3),
                fontsize=7)
  ax.set_xscale('log')
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f'plot: {path}')
