"""Sources and the registry, all offline: sklearn digits, synthetic data, and
TFDS loaders on `tfds.testing.mock_data` (nothing is downloaded)."""

from __future__ import annotations

import os
import socket

import ml_collections
import numpy as np
import pytest

from fedjax_eff.data import registry, sources

tfds = pytest.importorskip('tensorflow_datasets')


@pytest.fixture
def no_network(monkeypatch):
  """Fails any attempt to open a connection, so a download cannot hide."""
  def refuse(*args, **kwargs):
    raise OSError('network access attempted in a test')
  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'create_connection', refuse)


# ----------------------------------------------------------------- digits --

def test_digits_shapes_ranges_and_split():
  train, test = sources.load_digits(test_fraction=0.2, seed=0)
  assert train['x'].shape[1:] == (8, 8, 1) and train['x'].dtype == np.float32
  assert train['y'].dtype == np.int32
  assert len(train['y']) + len(test['y']) == 1797
  assert abs(len(test['y']) - 0.2 * 1797) < 10
  for part in (train, test):
    assert part['x'].min() >= 0.0 and part['x'].max() == 1.0
    assert set(np.unique(part['y'])) == set(range(10))  # stratified
  # Stratified: class proportions agree between the splits.
  p_train = np.bincount(train['y']) / len(train['y'])
  p_test = np.bincount(test['y']) / len(test['y'])
  assert np.abs(p_train - p_test).max() < 0.01


def test_digits_deterministic():
  a_train, a_test = sources.load_digits(0.2, seed=1)
  b_train, b_test = sources.load_digits(0.2, seed=1)
  c_train, _ = sources.load_digits(0.2, seed=2)
  np.testing.assert_array_equal(a_train['x'], b_train['x'])
  np.testing.assert_array_equal(a_test['y'], b_test['y'])
  assert not np.array_equal(a_train['y'], c_train['y'])
  _, empty = sources.load_digits(0.0, seed=0)
  assert empty['x'].shape == (0, 8, 8, 1)


# -------------------------------------------------------------- synthetic --

def test_synthetic_leaf_shapes_labels_sizes():
  data = sources.synthetic_leaf(1.0, 1.0, num_clients=60, seed=0, dim=20,
                                num_classes=7)
  assert data.num_clients == 60 and data.client_ids[3] == 'client_00003'
  sizes = data.client_sizes
  assert sizes.min() >= 50 and sizes.max() <= 1000
  assert sizes.max() > 4 * np.median(sizes)  # lognormal size skew
  c = data.client(0)
  assert c['x'].shape == (sizes[0], 20) and c['x'].dtype == np.float32
  assert c['y'].dtype == np.int32
  all_y = data.concatenated()['y']
  assert all_y.min() >= 0 and all_y.max() < 7


def test_synthetic_leaf_deterministic_and_prefix_stable():
  a = sources.synthetic_leaf(0.5, 0.5, 10, seed=3)
  b = sources.synthetic_leaf(0.5, 0.5, 10, seed=3)
  more = sources.synthetic_leaf(0.5, 0.5, 12, seed=3)
  other = sources.synthetic_leaf(0.5, 0.5, 10, seed=4)
  for i in range(10):
    np.testing.assert_array_equal(a.client(i)['x'], b.client(i)['x'])
    np.testing.assert_array_equal(a.client(i)['y'], more.client(i)['y'])
  assert not np.array_equal(a.client(0)['y'][:50], other.client(0)['y'][:50])


def test_synthetic_heterogeneity_follows_alpha_beta():
  """Label distributions differ more across clients for larger alpha, beta."""
  def spread(alpha, beta, iid=False):
    data = sources.synthetic_leaf(alpha, beta, 40, seed=0, iid=iid)
    hists = np.stack([np.bincount(data.client(i)['y'], minlength=10)
                      / data.client_sizes[i] for i in range(40)])
    return float(np.abs(hists - hists.mean(0)).sum(1).mean() / 2)
  assert spread(1.0, 1.0) > spread(0.0, 0.0, iid=True) + 0.2


def test_synthetic_split():
  train, test = sources.synthetic_leaf_split(1.0, 1.0, 8, seed=0,
                                             test_fraction=0.25)
  full = sources.synthetic_leaf(1.0, 1.0, 8, seed=0)
  assert train.client_ids == test.client_ids == full.client_ids
  np.testing.assert_array_equal(train.client_sizes + test.client_sizes,
                                full.client_sizes)
  assert np.all(test.client_sizes >= 1) and np.all(train.client_sizes >= 1)
  np.testing.assert_allclose(test.client_sizes / full.client_sizes, 0.25,
                             atol=0.02)


# ------------------------------------------------------------------- tfds --

# name -> (image shape, number of classes)
TFDS_CASES = {
    'mnist': ((28, 28, 1), 10),
    'emnist/byclass': ((28, 28, 1), 62),
    'emnist/digits': ((28, 28, 1), 10),
    'cifar10': ((32, 32, 3), 10),
    'cifar100': ((32, 32, 3), 100),
}


@pytest.mark.parametrize('name', sorted(TFDS_CASES))
def test_load_tfds_mock(name, tmp_path, no_network):
  shape, num_classes = TFDS_CASES[name]
  with tfds.testing.mock_data(num_examples=12):
    data = sources.load_tfds(name, 'train', cache_dir=str(tmp_path))
    assert sources.tfds_num_classes(name) == num_classes
  assert data['x'].shape == (12,) + shape and data['x'].dtype == np.float32
  assert data['y'].shape == (12,) and data['y'].dtype == np.int32
  assert 0.0 <= data['x'].min() and data['x'].max() <= 1.0
  assert data['x'].max() > 0.5  # scaled from uint8, not left at 0..255/255^2
  assert 0 <= data['y'].min() and data['y'].max() < num_classes


def test_cifar100_coarse_labels(tmp_path, no_network):
  with tfds.testing.mock_data(num_examples=30):
    fine = sources.load_tfds('cifar100', 'train', cache_dir=str(tmp_path))
    coarse = sources.load_tfds('cifar100', 'train', cache_dir=str(tmp_path),
                               label_key='coarse_label')
    assert sources.tfds_num_classes('cifar100', 'coarse_label') == 20
  np.testing.assert_array_equal(fine['x'], coarse['x'])
  assert coarse['y'].max() < 20


def test_emnist_is_transposed(tmp_path, no_network):
  with tfds.testing.mock_data(num_examples=5):
    upright = sources.load_tfds('emnist/digits', 'train',
                                cache_dir=str(tmp_path))
    raw = sources.load_tfds('emnist/digits', 'train', cache_dir=str(tmp_path),
                            transpose=False)
    mnist = sources.load_tfds('mnist', 'train', cache_dir=str(tmp_path))
    mnist_t = sources.load_tfds('mnist', 'train', cache_dir=str(tmp_path),
                                transpose=True)
  np.testing.assert_array_equal(upright['x'], np.swapaxes(raw['x'], 1, 2))
  assert not np.array_equal(upright['x'], raw['x'])
  np.testing.assert_array_equal(mnist_t['x'], np.swapaxes(mnist['x'], 1, 2))


def test_tfds_npz_cache_hit(tmp_path, monkeypatch, no_network):
  with tfds.testing.mock_data(num_examples=9):
    first = sources.load_tfds('mnist', 'test', cache_dir=str(tmp_path))
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith('.npz')
    assert files[0].startswith('mnist-test-')

    def fail(*args, **kwargs):
      raise AssertionError('cache miss: examples were decoded again')
    monkeypatch.setattr(sources, '_read_examples', fail)
    second = sources.load_tfds('mnist', 'test', cache_dir=str(tmp_path))
  np.testing.assert_array_equal(first['x'], second['x'])
  np.testing.assert_array_equal(first['y'], second['y'])
  assert second['x'].dtype == np.float32


def test_tfds_not_prepared_error(tmp_path, no_network):
  data_dir = tmp_path / 'tfds'
  with pytest.raises(sources.DatasetNotPreparedError) as err:
    sources.load_tfds('mnist', 'train', data_dir=str(data_dir),
                      cache_dir=str(tmp_path / 'cache'))
  msg = str(err.value)
  assert 'mnist' in msg and str(data_dir) in msg and 'tfds build' in msg
  assert isinstance(err.value, FileNotFoundError)
  assert not (tmp_path / 'cache').exists()


class FedjaxEffTinyImages(tfds.core.GeneratorBasedBuilder):
  """A real (non-mock) TFDS dataset, built offline, to exercise the reading
  path mock data skips: ArrayRecord files, batched reads, split slicing.
  (A `Tensor` image feature, since encoding PNGs would need TensorFlow.)"""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(6, 5, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(11),
            'test': self._generate_examples(4)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'image': self.image(i), 'label': i % 3}

  @staticmethod
  def image(i):
    img = np.full((6, 5, 1), 255, np.uint8)
    img[0, 0, 0] = i  # identifies the example after TFDS's shuffling
    img[1, :, 0] = np.arange(5)  # not symmetric, so a transpose shows
    return img


@pytest.fixture(scope='module')
def tiny_data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  FedjaxEffTinyImages(data_dir=data_dir,
                      file_format='array_record').download_and_prepare()
  return data_dir


def test_load_tfds_real_files(tiny_data_dir, tmp_path, monkeypatch,
                              no_network):
  monkeypatch.setattr(sources, '_READ_CHUNK', 4)  # several batched reads
  data = sources.load_tfds('fedjax_eff_tiny_images', 'train',
                           data_dir=tiny_data_dir, cache_dir=str(tmp_path))
  ids = np.round(data['x'][:, 0, 0, 0] * 255).astype(int)
  assert sorted(ids) == list(range(11))
  np.testing.assert_array_equal(data['y'], ids % 3)
  expected = np.stack([FedjaxEffTinyImages.image(i) for i in ids])
  np.testing.assert_allclose(data['x'], expected / 255.0, rtol=1e-6)
  head = sources.load_tfds('fedjax_eff_tiny_images', 'train[:3]',
                           data_dir=tiny_data_dir, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(head['x'], data['x'][:3])  # slicing works
  assert len(os.listdir(tmp_path)) == 2
  bundle = registry.load(_cfg(source='tfds', name='fedjax_eff_tiny_images',
                              data_dir=tiny_data_dir, cache_dir=str(tmp_path),
                              partition='iid', num_clients=3,
                              heldout_clients=1))
  assert bundle.num_classes == 3 and bundle.input_shape == (6, 5, 1)
  assert len(bundle.test['y']) == 4


# --------------------------------------------------------------- registry --

def _cfg(**overrides):
  cfg = registry.default_config()
  cfg.update(overrides)
  return cfg


def test_registry_digits():
  bundle = registry.load(_cfg(num_clients=20, heldout_clients=5))
  assert bundle.train.num_clients == 20 and bundle.heldout.num_clients == 5
  assert not set(bundle.train.client_ids) & set(bundle.heldout.client_ids)
  n = bundle.train.client_sizes.sum() + bundle.heldout.client_sizes.sum()
  assert n + len(bundle.test['y']) == 1797
  assert bundle.num_classes == 10 and bundle.input_shape == (8, 8, 1)
  again = registry.load(_cfg(num_clients=20, heldout_clients=5))
  np.testing.assert_array_equal(again.train.client(3)['y'],
                                bundle.train.client(3)['y'])
  # Shards and iid partitions, no held-out clients, no test set.
  shards = registry.load(_cfg(partition='shards', num_clients=10,
                              heldout_clients=0, test_fraction=0.0))
  assert shards.heldout is None and shards.test is None
  assert shards.train.client_sizes.sum() == 1797
  assert registry.load(_cfg(partition='iid')).train.num_clients == 100


def test_registry_accepts_plain_objects():
  class Cfg:
    source = 'digits'
    partition = 'iid'
    num_clients = 4
    heldout_clients = 1
  bundle = registry.load(Cfg())  # missing fields take the defaults
  assert bundle.train.num_clients == 4 and bundle.heldout.num_clients == 1


def test_registry_synthetic():
  cfg = _cfg(source='synthetic', partition='natural', num_clients=12,
             heldout_clients=3, synthetic_dim=16, synthetic_classes=5,
             test_fraction=0.1)
  bundle = registry.load(cfg)
  assert bundle.train.num_clients == 12 and bundle.heldout.num_clients == 3
  assert bundle.input_shape == (16,) and bundle.num_classes == 5
  full = sources.synthetic_leaf(1.0, 1.0, 15, seed=0, dim=16, num_classes=5)
  np.testing.assert_array_equal(bundle.heldout.client_sizes,
                                full.client_sizes[12:])
  assert (bundle.train.client_sizes.sum() + len(bundle.test['y'])
          == full.client_sizes[:12].sum())
  iid = registry.load(_cfg(source='synthetic', partition='iid',
                           num_clients=4, heldout_clients=0))
  assert iid.heldout is None and iid.train.num_clients == 4


def test_registry_tfds_mock(tmp_path, no_network):
  cfg = _cfg(source='tfds', name='emnist/byclass', cache_dir=str(tmp_path),
             partition='iid', num_clients=8, heldout_clients=2)
  with tfds.testing.mock_data(num_examples=40):
    bundle = registry.load(cfg)
  assert bundle.train.num_clients == 8 and bundle.heldout.num_clients == 2
  assert bundle.num_classes == 62 and bundle.input_shape == (28, 28, 1)
  assert bundle.test['x'].shape == (40, 28, 28, 1)
  cfg.update(dict(name='cifar10', partition='dirichlet', dirichlet_alpha=1.0,
                  num_clients=4, heldout_clients=1))
  with tfds.testing.mock_data(num_examples=60):
    bundle = registry.load(cfg)
  assert bundle.input_shape == (32, 32, 3) and bundle.num_classes == 10
  assert (bundle.train.client_sizes.sum()
          + bundle.heldout.client_sizes.sum()) == 60


@pytest.mark.parametrize('overrides, key', [
    (dict(source='mnist'), 'data.source'),
    (dict(partition='random'), 'data.partition'),
    (dict(partition='natural'), 'data.partition'),
    (dict(source='synthetic', partition='dirichlet'), 'data.partition'),
    (dict(source='tfds', name=''), 'data.name'),
])
def test_registry_errors(overrides, key):
  with pytest.raises(ValueError, match=key):
    registry.load(_cfg(**overrides))


def test_default_config_is_the_contract():
  cfg = registry.default_config()
  assert isinstance(cfg, ml_collections.ConfigDict)
  assert set(cfg.keys()) == {
      'source', 'name', 'data_dir', 'cache_dir', 'partition', 'num_clients',
      'heldout_clients', 'dirichlet_alpha', 'shards_per_client',
      'test_fraction', 'synthetic_alpha', 'synthetic_beta', 'synthetic_dim',
      'synthetic_classes', 'seq_len', 'max_sequences', 'vocab_size',
      'max_modules', 'markov_states', 'markov_concentration',
      'markov_heterogeneity', 'n_mels', 'max_frames', 'classes', 'tasks',
      'pretrain_fraction', 'part', 'seed', 'nan_clients'}


def test_classes_keep_and_relabel():
  cfg = registry.default_config()
  cfg.num_clients, cfg.heldout_clients = 10, 0
  full = registry.load(cfg)
  cfg.classes = [7, 2]
  b = registry.load(cfg)
  assert b.num_classes == 2
  x = b.train.concatenated()
  assert set(np.unique(x['y'])) == {0, 1}
  # Relabelled in the order given: 7 -> 0, 2 -> 1; and no example lost.
  assert (x['y'] == 0).sum() + (b.test['y'] == 0).sum() == (
      (full.train.concatenated()['y'] == 7).sum() + (full.test['y'] == 7).sum())
  with pytest.raises(ValueError, match='data.classes'):
    registry.load(ml_collections.ConfigDict(dict(cfg, classes=[3, 3])))
  with pytest.raises(ValueError, match='data.classes'):
    registry.load(ml_collections.ConfigDict(dict(cfg, classes=[10])))


def test_tasks_union_their_clients():
  cfg = registry.default_config()
  cfg.num_clients, cfg.heldout_clients = 6, 1
  cfg.tasks = [dict(classes=[0, 1, 2]), dict(classes=[5, 6], num_clients=4)]
  b = registry.load(cfg)
  assert b.task_classes == (3, 2) and b.test is None
  assert b.train.num_clients == 10 and b.heldout.num_clients == 2
  np.testing.assert_array_equal(b.client_task, [0] * 6 + [1] * 4)
  for i, cid in enumerate(b.train.client_ids):
    task = b.tasks[b.client_task[i]]
    np.testing.assert_array_equal(b.train.client(i)['y'],
                                  task.train.client(cid.split('/', 1)[1])['y'])
  with pytest.raises(ValueError, match=r'data.tasks\[0\] has unknown keys'):
    registry.load(ml_collections.ConfigDict(dict(cfg, tasks=[dict(clases=[1])])))
