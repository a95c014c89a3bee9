"""The one plot the benchmarks share: labelled points on a log-x scatter.

Imported by the scripts next to it (`python benchmarks/X.py` puts this
directory on `sys.path`). matplotlib is optional: without it, no plot.

Labels do not overlap each other, the points or the frame: each is placed
at the first free spot on rings of growing radius around its point (right,
above, below, left, the diagonals), with a thin leader line when it had to
move away; a point with seeds carries an error bar.
"""

from __future__ import annotations

import math

from fedjax_eff.plotting import plain_log_ticks

# Offsets tried for a label, in pixels: rings of growing radius, at angles
# (degrees) from the right going round both ways.
_RADII = (7, 16, 28, 42, 58, 76, 96, 120)
_ANGLES = (0, 30, -30, 90, -90, 150, -150, 180, 60, -60, 120, -120)


def _pyplot():
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print('matplotlib is not installed: no plot')
    return None
  return plt


def spans_decades(values) -> bool:
  """True when positive `values` span a factor of 10 or more: a log axis."""
  vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
  return bool(vals) and max(vals) / min(vals) >= 10


def _overlap(a, b) -> float:
  """Area shared by boxes (x0, y0, x1, y1)."""
  w = min(a[2], b[2]) - max(a[0], b[0])
  h = min(a[3], b[3]) - max(a[1], b[1])
  return w * h if w > 0 and h > 0 else 0.0


def place_labels(ax, xy, labels, colors, fontsize=7) -> list:
  """Annotates point i (data coordinates `xy[i]`) with `labels[i]` at the
  first offset where its box meets no placed label, no point and stays in
  the axes (else the least-overlapping one). Call after the axes' limits
  and scales are final. Returns the annotations."""
  fig = ax.figure
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  to_px = ax.transData.transform
  px = [tuple(to_px(p)) for p in xy]
  frame = ax.get_window_extent(renderer)
  pad = 2.0
  taken = [(x - 5, y - 5, x + 5, y + 5) for x, y in px]  # the markers
  scale = fig.dpi / 72.0  # points -> pixels
  out = []
  order = sorted(range(len(xy)), key=lambda i: (-px[i][1], px[i][0]))
  for i in order:
    probe = ax.text(0, 0, labels[i], fontsize=fontsize)
    ext = probe.get_window_extent(renderer)
    probe.remove()
    w, h = ext.width + 2 * pad, ext.height + 2 * pad
    best = None
    for r in _RADII:
      for a in _ANGLES:
        dx, dy = r * math.cos(math.radians(a)), r * math.sin(math.radians(a))
        # The label's box hangs off the offset on the side facing away.
        x0 = px[i][0] + dx - (w if dx < -1e-6 else
                              0 if dx > 1e-6 else w / 2)
        y0 = px[i][1] + dy - (h if dy < -1e-6 else
                              0 if dy > 1e-6 else h / 2)
        box = (x0, y0, x0 + w, y0 + h)
        outside = (max(0, frame.x0 - box[0]) + max(0, box[2] - frame.x1) +
                   max(0, frame.y0 - box[1]) + max(0, box[3] - frame.y1))
        cost = sum(_overlap(box, t) for j, t in enumerate(taken)
                   if j != i) + 50 * outside * h
        if best is None or cost < best[0] - 1e-9:
          best = (cost, box, dx, dy, r)
        if cost == 0:
          break
      if best[0] == 0:
        break
    _, box, dx, dy, r = best
    taken.append(box)
    ha = 'left' if dx > 1e-6 else 'right' if dx < -1e-6 else 'center'
    va = 'bottom' if dy > 1e-6 else 'top' if dy < -1e-6 else 'center'
    arrow = (dict(arrowstyle='-', color=colors[i], lw=0.6, alpha=0.8,
                  shrinkA=0, shrinkB=3) if r > _RADII[0] else None)
    out.append(ax.annotate(
        labels[i], xy[i], textcoords='offset points',
        xytext=(dx / scale, dy / scale), ha=ha, va=va, fontsize=fontsize,
        color=colors[i], arrowprops=arrow))
  return out


def dodge_equal_x(xy: list, step: float = 1.05) -> list:
  """Points that share an x (e.g. arms with the same upload) spread over
  factors step^(i - (k-1)/2) on a log x axis, so their error bars do not
  hide each other; other points stay where they are."""
  groups = {}
  for i, (x, _) in enumerate(xy):
    groups.setdefault(x, []).append(i)
  out = list(xy)
  for members in groups.values():
    for j, i in enumerate(members):
      x, y = xy[i]
      out[i] = (x * step ** (j - (len(members) - 1) / 2), y)
  return out


def distinct_colors(n: int) -> list:
  """`n` colours, no two alike for n <= 20: matplotlib's ten 'C0'..'C9'
  first, then tab20's lighter partner of each (tab20 interleaves dark and
  light: the even entries are the C colours, the odd ones their tints)."""
  if n <= 10:
    return [f'C{i}' for i in range(n)]
  from matplotlib import colormaps
  tab20 = colormaps['tab20']
  order = list(range(0, 20, 2)) + list(range(1, 20, 2))
  return [tab20(order[i % 20]) for i in range(n)]


def labelled_scatter(points: dict[str, tuple], path: str, *,
                     xlabel: str, ylabel: str, title: str,
                     square=lambda name: False, logy='auto') -> None:
  """`points`: label -> (x, y) or (x, y, yerr); x on a log scale, y too
  when `logy` is True (or 'auto' and y spans a decade); `square(label)`
  picks a square marker (e.g. the baselines). Points at the same x are
  dodged a little apart (`dodge_equal_x`)."""
  plt = _pyplot()
  if plt is None:
    return
  names = list(points)
  xy = dodge_equal_x([tuple(points[n][:2]) for n in names])
  err = [points[n][2] if len(points[n]) > 2 else None for n in names]
  colors = distinct_colors(len(names))
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  for (x, y), e, c, n in zip(xy, err, colors, names):
    if e:
      ax.errorbar(x, y, yerr=e, fmt='none', ecolor=c, elinewidth=1,
                  capsize=3)
    ax.scatter(x, y, marker='s' if square(n) else 'o', color=c, zorder=3,
               s=28)
  ax.set_xscale('log')
  plain_log_ticks(ax.xaxis, [x for x, _ in xy])
  if logy is True or (logy == 'auto' and spans_decades([y for _, y in xy])):
    ax.set_yscale('log')
    plain_log_ticks(ax.yaxis, [y for _, y in xy])
  # Room for labels: a margin inside the frame on every side.
  ax.margins(x=0.25, y=0.12)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(True, alpha=0.3, which='both', lw=0.5)
  fig.tight_layout()
  place_labels(ax, xy, names, colors)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f'plot: {path}')
