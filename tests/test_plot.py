"""launch/plot.py: curves of runs, legends from config differences."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fedjax_eff import plotting
from fedjax_eff.experiment import train_and_evaluate
from tests.test_experiment import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOT = os.path.join(ROOT, 'launch', 'plot.py')


@pytest.fixture(scope='module')
def two_runs(tmp_path_factory):
  base = tmp_path_factory.mktemp('runs')
  runs = []
  for lr in (0.1, 0.3):
    wd = str(base / f'lr{lr}')
    train_and_evaluate(tiny_config(num_rounds=2, eval_every=1,
                                   tensorboard=False, accounting=False,
                                   **{'client.learning_rate': lr}), wd)
    runs.append(wd)
  return runs


def _plot(*args):
  return subprocess.run([sys.executable, PLOT, *args], capture_output=True,
                        text=True, timeout=60, check=False)


def test_two_runs_one_png_legend_names_the_difference(two_runs, tmp_path):
  out = str(tmp_path / 'both.png')
  r = _plot(*two_runs, '--out', out)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == out
  with open(out, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert plotting.legend_labels(two_runs) == [
      'client.learning_rate=0.1', 'client.learning_rate=0.3']


def test_one_run_defaults_to_its_workdir(two_runs):
  r = _plot(two_runs[0])
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == os.path.join(two_runs[0], 'plot.png')
  assert os.path.getsize(os.path.join(two_runs[0], 'plot.png')) > 1000
  assert plotting.legend_labels(two_runs[:1]) == ['lr0.1']


def test_missing_run_is_one_line_and_exit_2(two_runs, tmp_path):
  r = _plot(two_runs[0], str(tmp_path / 'nope'))
  assert r.returncode == 2
  assert r.stderr.count('\n') == 1
  assert r.stderr.startswith('error: ') and 'nope' in r.stderr
  assert 'metrics.jsonl' in r.stderr


def test_metric_family_upload_and_simulated_time():
  lm = [{'round': 1, 'upload_bits': 10.0, 'num_clients': 3.0,
         'sim_round_seconds': 1800.0},
        {'round': 2, 'upload_bits': None, 'num_clients': 3.0,
         'test_perplexity': 50.0, 'test_accuracy': 0.2}]
  acc = [{'round': 1, 'heldout_accuracy': 0.5}]
  assert plotting.choose_family([lm])[0][0] == 'test_perplexity'
  assert plotting.choose_family([lm, acc])[0][0] == 'test_accuracy'
  assert plotting.choose_family([[{'round': 1}]])[0] == ('train_loss',)
  assert plotting.cumulative_upload_bits(lm) == [30.0, 30.0]
  assert plotting.simulated_hours(lm) == [0.5, 0.5]
  assert plotting.simulated_hours(acc) is None


def test_labels_layout_keys_nested_lists_and_ties():
  cfgs = [{'progress': True, 'techniques': [{'bits': 8}], 'seed': 0},
          {'progress': False, 'techniques': [{'bits': 4}], 'seed': 0},
          {'progress': False, 'techniques': [{'bits': 4}], 'seed': 0}]
  assert plotting.legend_labels(['a/x', 'b/y', 'c/z'], cfgs) == [
      'techniques[0].bits=8', 'techniques[0].bits=4 (y)',
      'techniques[0].bits=4 (z)']
  # Only a layout key differs: it is shown; nothing differs: the names.
  assert plotting.legend_labels(['x', 'y'], cfgs[:2:1][:1] + [
      {'progress': False, 'techniques': [{'bits': 8}], 'seed': 0}]) == [
          'progress=true', 'progress=false']
  assert plotting.legend_labels(['x', 'y'], cfgs[1:]) == ['x', 'y']


def test_benchmark_labels_do_not_overlap(tmp_path):
  """The shared scatter of benchmarks/plots.py on a crowded cluster (two
  coincident points, six within a few pixels): no two label boxes meet."""
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  try:
    import plots  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  pts = {f'variant_{i}': (2.4 + 0.02 * i, 60 + 3 * i) for i in range(6)}
  pts.update(coincident=(2.4, 60.0), far=(0.1, 900.0))
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.scatter(*zip(*pts.values()))
  ax.set_xscale('log')
  ax.margins(x=0.25, y=0.12)
  notes = plots.place_labels(ax, list(pts.values()), list(pts),
                             ['k'] * len(pts))
  fig.canvas.draw()
  # The text's own box (an Annotation's also spans its leader line).
  boxes = [matplotlib.text.Text.get_window_extent(n) for n in notes]
  for i, a in enumerate(boxes):
    assert ax.get_window_extent().contains(a.x0, a.y0)
    for b in boxes[i + 1:]:
      assert not a.overlaps(b), (a, b)
  plt.close(fig)
  assert plots.spans_decades([60, 963]) and not plots.spans_decades([0.9, 1])
  # Arms with the same upload: spread symmetrically on the log axis, the
  # others untouched.
  xy = plots.dodge_equal_x([(8.0, 97.0), (2.0, 70.0), (8.0, 69.0),
                            (8.0, 84.0)], step=1.1)
  np.testing.assert_allclose([x for x, _ in xy],
                             [8.0 / 1.1, 2.0, 8.0, 8.0 * 1.1])
  assert [y for _, y in xy] == [97.0, 70.0, 69.0, 84.0]
  # Up to 20 arms, no two share a colour; up to 10, the usual C0..C9.
  assert plots.distinct_colors(3) == ['C0', 'C1', 'C2']
  rgba = [matplotlib.colors.to_rgba(c) for c in plots.distinct_colors(20)]
  assert len(set(rgba)) == 20
  assert rgba[:10] == [matplotlib.colors.to_rgba(f'C{i}') for i in range(10)]


def test_table_figures_from_results_json(tmp_path):
  r = subprocess.run([sys.executable, os.path.join(
      ROOT, 'benchmarks', 'plot_tables.py'), '--out_dir', str(tmp_path)],
                     capture_output=True, text=True, timeout=60, check=False)
  assert r.returncode == 0, r.stderr
  for name in ('scaling.png', 'device_cost.png'):
    assert os.path.getsize(tmp_path / name) > 1000


def test_labels_prefer_shared_keys_and_cap_their_number():
  a = {f'k{i}': 0 for i in range(6)}
  b = {f'k{i}': 1 for i in range(6)}
  b['added_since'] = True  # an older run's config lacks it
  assert plotting.legend_labels(['a', 'b'], [a, b]) == [
      'k0=0, k1=0, k2=0, k3=0 (+2 more)', 'k0=1, k1=1, k2=1, k3=1 (+2 more)']
