"""The `npz` source: a user's own arrays, one file per client or one file
with a client_id column, through `registry.load` and a short training run."""

import json
import os

import numpy as np
import pytest

from fedjax_eff.data import registry
from fedjax_eff.experiment import train_and_evaluate

from test_experiment import tiny_config


def _cfg(path, **overrides):
  cfg = registry.default_config()
  cfg.source, cfg.data_dir = 'npz', str(path)
  cfg.num_clients, cfg.heldout_clients = 1000, 2
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _client(rng, n, shape=(4, 3)):
  return dict(x=rng.normal(size=(n,) + shape),  # float64: becomes float32
              y=rng.integers(0, 5, n),          # int64: becomes int32
              w=np.arange(n, dtype=np.float32))  # any other feature


def write_dir(tmp_path, ids=('3', '10', '2', '1', '7'), test=True):
  rng = np.random.default_rng(0)
  d = tmp_path / 'clients'
  d.mkdir()
  data = {}
  for k, cid in enumerate(ids):
    data[cid] = _client(rng, 6 + k)
    np.savez(d / f'{cid}.npz', **data[cid])
  if test:
    test_arrays = _client(rng, 9)
    test_arrays['y'][0] = 6  # a label only the test set has
    np.savez(d / 'test.npz', **test_arrays)
  (d / 'README.txt').write_text('not a client')
  return d, data


def write_file(tmp_path, test=True):
  rng = np.random.default_rng(1)
  ids = np.array(['bob', 'ann', 'bob', 'cat', 'ann', 'dan', 'cat', 'bob'])
  arrays = dict(client_id=ids, x=rng.normal(size=(8, 5)).astype(np.float32),
                y=np.array([0, 1, 2, 3, 1, 0, 2, 2], np.int32))
  if test:
    arrays.update(x_test=np.zeros((3, 5), np.float32),
                  y_test=np.array([0, 1, 1], np.int32))
  path = tmp_path / 'all.npz'
  np.savez(path, **arrays)
  return path, arrays


def test_directory_layout(tmp_path):
  d, data = write_dir(tmp_path)
  b = registry.load(_cfg(d))
  # Integer ids sort numerically; the last two are held out.
  assert b.train.client_ids == ['1', '2', '3']
  assert b.heldout.client_ids == ['7', '10']
  for cid in ('1', '10'):
    part = b.train if cid in b.train.client_ids else b.heldout
    got = part.client(cid)
    assert got['x'].dtype == np.float32 and got['y'].dtype == np.int32
    assert got['w'].dtype == np.float32
    np.testing.assert_allclose(got['x'], data[cid]['x'].astype(np.float32))
    np.testing.assert_array_equal(got['y'], data[cid]['y'])
  assert b.input_shape == (4, 3)
  assert sorted(b.test) == ['w', 'x', 'y'] and len(b.test['y']) == 9
  assert b.num_classes == 7  # the test set's label 6
  # num_clients caps the training clients; no test.npz: no test set.
  assert registry.load(_cfg(d, num_clients=2)).train.client_ids == ['1', '2']


def test_single_file_layout(tmp_path):
  path, arrays = write_file(tmp_path)
  b = registry.load(_cfg(path, heldout_clients=1))
  assert b.train.client_ids == ['ann', 'bob', 'cat']
  assert b.heldout.client_ids == ['dan']
  bob = b.train.client('bob')
  rows = np.flatnonzero(arrays['client_id'] == 'bob')
  np.testing.assert_array_equal(bob['x'], arrays['x'][rows])
  np.testing.assert_array_equal(bob['y'], arrays['y'][rows])
  assert 'client_id' not in bob
  assert list(b.train.client_sizes) == [2, 3, 2]
  np.testing.assert_array_equal(b.test['y'], arrays['y_test'])
  assert b.input_shape == (5,) and b.num_classes == 4
  # Integer ids, no test arrays, nothing held out.
  path2 = tmp_path / 'ints.npz'
  np.savez(path2, client_id=np.array([10, 9, 10, 2]), x=np.ones((4, 2)),
           y=np.array([0, 1, 0, 1]))
  b = registry.load(_cfg(path2, heldout_clients=0))
  assert b.train.client_ids == ['2', '9', '10']
  assert b.heldout is None and b.test is None


def test_no_test_set(tmp_path):
  d, _ = write_dir(tmp_path, test=False)
  b = registry.load(_cfg(d, heldout_clients=0))
  assert b.test is None and b.heldout is None and b.num_classes == 5


@pytest.mark.parametrize('case, match', [
    ('unset', r'data\.data_dir must name'),
    ('missing', r'data\.data_dir=.*does not exist'),
    ('empty_dir', r'data\.data_dir=.*no <client id>\.npz'),
    ('no_y', r"data\.data_dir: .*has no 'y' array"),
    ('no_x_file', r"data\.data_dir: .*has no 'x' array"),
    ('unequal', r'data\.data_dir: .*unequal length'),
    ('unequal_file', r'data\.data_dir: .*unequal length'),
    ('client_id_length', r'data\.data_dir: .*client_id .*one entry per row'),
    ('no_client_id', r'data\.data_dir: .*no client_id array'),
    ('float_labels', r'data\.data_dir: .*labels must be integers'),
    ('features_differ', r'data\.data_dir: client .* same features'),
    ('all_heldout', r'data\.heldout_clients=5 leaves no training'),
    ('not_npz', r'data\.data_dir: cannot read'),
])
def test_errors_name_the_key(tmp_path, case, match):
  d = tmp_path / 'd'
  d.mkdir()
  x, y = np.zeros((3, 2), np.float32), np.zeros(3, np.int32)
  path, overrides = d, {}
  if case == 'unset':
    path = ''
  elif case == 'missing':
    path = tmp_path / 'nope'
  elif case == 'no_y':
    np.savez(d / 'a.npz', x=x)
  elif case == 'no_x_file':
    path = tmp_path / 'f.npz'
    np.savez(path, client_id=np.zeros(3), y=y)
  elif case == 'unequal':
    np.savez(d / 'a.npz', x=x, y=y[:2])
  elif case == 'unequal_file':
    path = tmp_path / 'f.npz'
    np.savez(path, client_id=np.zeros(3), x=x, y=y, w=y[:1])
  elif case == 'client_id_length':
    path = tmp_path / 'f.npz'
    np.savez(path, client_id=np.zeros(4), x=x, y=y)
  elif case == 'no_client_id':
    path = tmp_path / 'f.npz'
    np.savez(path, x=x, y=y)
  elif case == 'float_labels':
    np.savez(d / 'a.npz', x=x, y=y.astype(np.float32))
  elif case == 'features_differ':
    np.savez(d / 'a.npz', x=x, y=y)
    np.savez(d / 'b.npz', x=np.zeros((3, 4), np.float32), y=y)
  elif case == 'all_heldout':
    for c in 'abcde':
      np.savez(d / f'{c}.npz', x=x, y=y)
    overrides = dict(heldout_clients=5)
  elif case == 'not_npz':
    (d / 'a.npz').write_text('not a zip file')
  with pytest.raises(ValueError, match=match):
    registry.load(_cfg(path, **{'heldout_clients': 0, **overrides}))


def test_train_two_rounds_on_npz(tmp_path):
  d, _ = write_dir(tmp_path, ids=tuple(str(i) for i in range(8)))
  c = tiny_config(num_rounds=2, eval_every=1, clients_per_round=3)
  c.data.source, c.data.data_dir = 'npz', str(d)
  c.data.num_clients, c.data.heldout_clients = 1000, 2
  c.tensorboard, c.accounting = False, False
  summary = train_and_evaluate(c, str(tmp_path / 'run'))
  final = summary['final_metrics']
  assert final['round'] == 2
  assert np.isfinite(final['train_loss'])
  assert 'test_accuracy' in final and 'heldout_accuracy' in final
  lines = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  assert [l['round'] for l in lines] == [1, 2]


def test_config_file_loads(tmp_path):
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      'npz_config', os.path.join(root, 'configs', 'npz.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  assert c.data.source == 'npz' and c.data.data_dir is None
  c.data.data_dir = str(tmp_path)  # the type the CLI override needs


def test_cli_missing_path_is_one_line(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run(
      [sys.executable, os.path.join(root, 'launch', 'train.py'),
       '--config=' + os.path.join(root, 'configs', 'npz.py'),
       f'--workdir={tmp_path / "w"}',
       f'--config.data.data_dir={tmp_path / "nope"}'],
      capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      f'error: data.data_dir={tmp_path / "nope"} does not exist (a directory '
      'of <client id>.npz files, or one .npz file).']
