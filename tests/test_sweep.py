"""launch/sweep.py: a study's cells, its tables and plots, resume, bad input."""

import csv
import os
import subprocess
import sys

import ml_collections
import pytest

from fedjax_eff.experiment import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(ROOT, 'launch', 'sweep.py')
TINY = ['--config=configs/default.py', '--config.num_rounds=2',
        '--config.model.name=mlp', '--config.data.num_clients=20',
        '--config.data.heldout_clients=3', '--config.clients_per_round=4',
        '--config.client.local_steps=1', '--config.tensorboard=false',
        '--config.accounting=false', '--config.progress=false']
GRID = ['--grid', 'client.learning_rate=0.05,0.5',
        '--grid', 'clients_per_round=4', '--seeds', '2']


def run_sweep(*args):
  return subprocess.run([sys.executable, SWEEP, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def outputs(d):
  return {n: open(d / n, 'rb').read() for n in sorted(os.listdir(d))
          if os.path.isfile(d / n)}


def test_sweep_cells_tables_plots_and_resume(tmp_path):
  d = tmp_path / 'study'
  r = run_sweep(*TINY, *GRID, f'--workdir={d}')
  assert r.returncode == 0, r.stderr
  names = [f'client.learning_rate={lr},clients_per_round=4,seed={s}'
           for lr in ('0.05', '0.5') for s in (0, 1)]
  for n in names:
    assert os.path.isfile(d / n / 'summary.json')
    assert os.path.isfile(d / n / 'metrics.jsonl')
  # Cells that differ in the learning rate and seed: one program.
  assert 'replicas: 4 cells in one program' in r.stdout
  assert '[cell 4/4]' in r.stdout
  assert r.stdout.count('ran as one of 4 replicas') == 4
  rows = list(csv.DictReader(open(d / 'summary.csv')))
  assert len(rows) == 4
  assert list(rows[0])[:4] == ['client.learning_rate', 'clients_per_round',
                               'seed', 'status']
  for col in ('test_accuracy', 'train_loss', 'wall_time_seconds'):
    assert col in rows[0]
  assert [r_['status'] for r_ in rows] == ['ok'] * 4
  # The md table's mean over the 2 seeds is the mean of the two cells.
  md = open(d / 'summary.md').read().splitlines()
  head = [c.strip() for c in md[0].strip('|').split('|')]
  line = [c.strip() for c in md[2].strip('|').split('|')]
  assert line[0] == '0.05' and line[head.index('n seeds')] == '2'
  mean = float(line[head.index('test_accuracy')].split(' ± ')[0])
  cells = [float(r_['test_accuracy']) for r_ in rows[:2]]
  assert mean == pytest.approx(sum(cells) / 2, rel=1e-3)
  assert os.path.getsize(d / 'test_accuracy_vs_client.learning_rate.png')
  # A clients_per_round of one value is not plotted against.
  assert not os.path.exists(d / 'test_accuracy_vs_clients_per_round.png')
  before = outputs(d)

  again = run_sweep(*TINY, *GRID, f'--workdir={d}')
  assert again.returncode == 0, again.stderr
  assert again.stdout.count('finished before, skipped') == 4
  assert ': start' not in again.stdout
  assert outputs(d) == before


def test_bad_grid_key_and_value_one_line(tmp_path):
  for grid, said in (('client.lerning_rate=0.1,0.2',
                      'did you mean config.client.learning_rate?'),
                     ('clients_per_round=4,many', 'is not an integer')):
    r = run_sweep(*TINY, '--grid', grid, f'--workdir={tmp_path / "w"}')
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr
    assert said in lines[0]
  assert not os.path.exists(tmp_path / 'w')


def test_pure_parts():
  c = ml_collections.ConfigDict({'seed': 0, 'lr': 0.1, 'on': True,
                                 'opt': 'sgd', 'client': {'steps': 2}})
  grid = sweep.parse_grid(['lr=0.01,1e-3', 'on=false', 'client.steps=1,5',
                           'config.opt=adam'], c, seeds=2)
  assert grid == [('lr', [0.01, 0.001]), ('on', [False]),
                  ('client.steps', [1, 5]), ('opt', ['adam']),
                  ('seed', [0, 1])]
  cells = sweep.cells(grid)
  assert len(cells) == 8
  assert sweep.cell_name(cells[-1]) == (
      'lr=0.001,on=false,client.steps=5,opt=adam,seed=1')
  assert sweep.cell_name({'data.data_dir': '/a b/c'}) == 'data.data_dir=_a_b_c'
  assert sweep.cell_config(c, cells[-1]).client.steps == 5
  assert c.client.steps == 2
  with pytest.raises(sweep.SweepError, match='given twice'):
    sweep.parse_grid(['lr=1', 'lr=2'], c)
  with pytest.raises(sweep.SweepError, match='both set the seed'):
    sweep.parse_grid(['seed=1,2'], c, seeds=2)
  rows = [{'lr': 0.1, 'seed': s, 'status': st, 'acc': a}
          for s, st, a in ((0, 'ok', 0.5), (1, 'ok', 0.7),
                           (2, 'failed: x', None))]
  (g,) = sweep.aggregate(rows, ['lr', 'seed'])
  assert g['n'] == 2 and g['failed'] == 1
  assert g['acc'][0] == pytest.approx(0.6)
  assert g['acc'][1] == pytest.approx(0.1414, abs=1e-4)
  assert '2 (1 failed)' in sweep.to_markdown(rows, ['lr', 'seed'])


def test_refused_cell_recorded_and_exit_1(tmp_path):
  d = tmp_path / 's'
  r = run_sweep(*TINY, '--grid', 'client.learning_rate=5000,1e4',
                f'--workdir={d}')
  assert r.returncode == 1
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and '2 of 2 cells did not finish' in lines[0]
  rows = list(csv.DictReader(open(d / 'summary.csv')))
  assert [r_['client.learning_rate'] for r_ in rows] == ['5000.0', '10000.0']
  assert all(r_['status'].startswith('refused: config.client.learning_rate')
             for r_ in rows)


def test_unfinished_cell_resumes(tmp_path):
  d = tmp_path / 'r'
  args = [a for a in TINY if not a.startswith('--config.num_rounds')]
  grid = ['--grid', 'client.learning_rate=0.1', f'--workdir={d}']
  assert run_sweep(*args, '--config.num_rounds=1', *grid).returncode == 0
  r = run_sweep(*args, '--config.num_rounds=2', *grid)
  assert r.returncode == 0, r.stderr
  assert 'resumed from round 1' in r.stdout
  (row,) = csv.DictReader(open(d / 'summary.csv'))
  assert row['round'] == '2' and row['status'] == 'ok'


def test_cells_one_by_one_without_replicas(tmp_path):
  d = tmp_path / 'study'
  r = run_sweep(*TINY, '--grid', 'client.learning_rate=0.05,0.5',
                '--noreplicas', f'--workdir={d}')
  assert r.returncode == 0, r.stderr
  assert 'replicas' not in r.stdout
  assert r.stdout.count(': start') == 2 and 'ETA' in r.stdout
