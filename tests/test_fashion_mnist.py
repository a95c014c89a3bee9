"""The Fashion-MNIST source: the IDX reader on files the tests write, the
registry's partitions and central test set over them, and (only where
Debian's dataset-fashion-mnist package is installed) the real files."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from fedjax_eff.data import registry, sources

pytestmark = pytest.mark.usefixtures('fast_compiles')  # the config test

_STEMS = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
          't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')


def _idx_bytes(a: np.ndarray) -> bytes:
  code = {np.dtype('u1'): 0x08, np.dtype('>i4'): 0x0C,
          np.dtype('>f4'): 0x0D}[a.dtype]
  header = bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, '>u4').tobytes()
  return header + a.tobytes()


def _write(path, a: np.ndarray, gz: bool):
  data = _idx_bytes(a)
  with open(path, 'wb') as f:
    f.write(gzip.compress(data) if gz else data)


@pytest.fixture
def tiny(tmp_path):
  """50 train + 20 test 28x28 images, train files gzipped, test plain (the
  loader must take either), with the arrays written."""
  rng = np.random.default_rng(0)
  arrays = {'train': (rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
                      np.arange(50, dtype=np.uint8) % 10),
            'test': (rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
                     rng.integers(0, 10, 20).astype(np.uint8))}
  flat = arrays['train'] + arrays['test']
  for stem, a, gz in zip(_STEMS, flat, (True, True, False, False)):
    _write(tmp_path / (stem + ('.gz' if gz else '')), a, gz)
  return tmp_path, arrays


def _cfg(data_dir, **overrides):
  cfg = registry.default_config()
  cfg.update(dict(source='fashion_mnist', data_dir=str(data_dir),
                  partition='iid', num_clients=4, heldout_clients=1))
  cfg.update(overrides)
  return cfg


def test_read_idx_formats_and_errors(tmp_path):
  a = (np.arange(24).reshape(2, 3, 4) - 5).astype('>i4')
  for gz in (False, True):
    _write(tmp_path / 'a', a, gz)
    out = sources.read_idx(str(tmp_path / 'a'), ndim=3)
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, a)
  f = np.linspace(-1, 1, 6, dtype='>f4')
  _write(tmp_path / 'f', f, gz=False)
  np.testing.assert_array_equal(sources.read_idx(str(tmp_path / 'f')), f)
  _write(tmp_path / 'b', np.zeros((2, 2), np.uint8), gz=True)
  with pytest.raises(ValueError, match='2 dimensions, expected 1'):
    sources.read_idx(str(tmp_path / 'b'), ndim=1)
  (tmp_path / 'bad').write_bytes(b'\x12\x34\x08\x01' + bytes(8))
  with pytest.raises(ValueError, match='not an IDX file'):
    sources.read_idx(str(tmp_path / 'bad'))
  (tmp_path / 'short').write_bytes(_idx_bytes(np.zeros(10, np.uint8))[:-1])
  with pytest.raises(ValueError, match='needs 18 bytes, the file holds 17'):
    sources.read_idx(str(tmp_path / 'short'))
  (tmp_path / 'cut').write_bytes(bytes([0, 0, 8, 3, 0, 0]))
  with pytest.raises(ValueError, match='header cut short'):
    sources.read_idx(str(tmp_path / 'cut'))


def test_registry_fashion_mnist(tiny):
  data_dir, arrays = tiny
  bundle = registry.load(_cfg(data_dir, test_fraction=0.5))
  assert bundle.num_classes == 10 and bundle.input_shape == (28, 28, 1)
  assert bundle.train.num_clients == 4 and bundle.heldout.num_clients == 1
  # The official test split, whole: test_fraction does not apply.
  test_x, test_y = arrays['test']
  assert bundle.test['x'].shape == (20, 28, 28, 1)
  assert bundle.test['x'].dtype == np.float32
  assert bundle.test['y'].dtype == np.int32
  np.testing.assert_array_equal(bundle.test['x'][..., 0] * 255, test_x)
  np.testing.assert_array_equal(bundle.test['y'], test_y)
  # Every training image in exactly one client, pixels in [0, 1].
  clients = [bundle.train.client(i) for i in range(4)] + [
      bundle.heldout.client(0)]
  x = np.concatenate([c['x'] for c in clients])
  y = np.concatenate([c['y'] for c in clients])
  assert x.shape == (50, 28, 28, 1) and x.dtype == np.float32
  assert y.dtype == np.int32 and 0.0 <= x.min() and x.max() <= 1.0
  assert sorted(bundle.train.client_sizes) == [10, 10, 10, 10]
  written = {im.tobytes(): int(label) for im, label in zip(*arrays['train'])}
  read = {(im[..., 0] * 255).round().astype(np.uint8).tobytes(): int(label)
          for im, label in zip(x, y)}
  assert read == written
  for partition in ('dirichlet', 'shards'):
    b = registry.load(_cfg(data_dir, partition=partition, num_clients=5,
                           heldout_clients=0))
    assert b.heldout is None and b.train.client_sizes.sum() == 50


def test_fashion_mnist_classes(tiny):
  data_dir, arrays = tiny
  bundle = registry.load(_cfg(data_dir, classes=[7, 3], num_clients=2))
  assert bundle.num_classes == 2
  sizes = bundle.train.client_sizes.sum() + bundle.heldout.client_sizes.sum()
  assert sizes == 10  # five of each class among the 50
  test_y = arrays['test'][1]
  expected = np.where(test_y[np.isin(test_y, [7, 3])] == 7, 0, 1)
  np.testing.assert_array_equal(bundle.test['y'], expected)


def test_fashion_mnist_not_prepared(tiny):
  data_dir, _ = tiny
  os.remove(data_dir / 't10k-labels-idx1-ubyte')
  with pytest.raises(sources.DatasetNotPreparedError) as err:
    registry.load(_cfg(data_dir))
  message = str(err.value)
  assert 't10k-labels-idx1-ubyte' in message and '\n' not in message
  assert 'apt-get install dataset-fashion-mnist' in message
  assert '--config.data.data_dir' in message


@pytest.mark.skipif(
    not os.path.exists(os.path.join(sources.FASHION_MNIST_DIR,
                                    't10k-labels-idx1-ubyte.gz')),
    reason='Debian package dataset-fashion-mnist not installed')
def test_debian_fashion_mnist():
  train, test = sources.load_fashion_mnist()
  assert train['x'].shape == (60_000, 28, 28, 1)
  assert test['x'].shape == (10_000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(train['y']), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(test['y']), [1000] * 10)
  # Published statistics of the training pixels (/255): mean 0.2860,
  # std 0.3530.
  assert abs(float(train['x'].mean()) - 0.2860) < 5e-4
  assert abs(float(train['x'].std()) - 0.3530) < 5e-4


def test_config_end_to_end_on_tiny_idx(tiny):
  """configs/fashion_mnist.py as written, shrunk, on the tiny IDX files."""
  from fedjax_eff.experiment import train_and_evaluate
  from fedjax_eff.experiment.defaults import load_config_module
  data_dir, _ = tiny
  c = load_config_module(os.path.join(os.path.dirname(__file__), '..',
                                      'configs', 'x.py'),
                         'fashion_mnist').get_config()
  assert c.data.source == 'fashion_mnist' and c.model.name == 'cnn'
  c.data.data_dir = str(data_dir)
  c.num_rounds, c.clients_per_round, c.eval_every = 2, 2, 2
  c.data.num_clients, c.data.heldout_clients = 4, 1
  c.client.local_steps = 2
  c.model.kwargs.features, c.model.kwargs.hidden = (4, 8), 16
  c.progress, c.tensorboard = False, False
  summary = train_and_evaluate(c, str(data_dir / 'run'))
  assert summary['rounds'] == 2
  assert 0.0 <= summary['final_metrics']['test_accuracy'] <= 1.0
  assert np.isfinite(summary['final_metrics']['train_loss'])
