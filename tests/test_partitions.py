"""Partitions: determinism, exact coverage, and the heterogeneity they claim."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_eff.data import partitions

NUM_CLASSES = 10
# 10 balanced classes of 1,000 rows, in shuffled order.
LABELS = np.random.default_rng(0).permutation(
    np.repeat(np.arange(NUM_CLASSES), 1000))


def _assert_exact_cover(part, n):
  rows = np.concatenate(list(part.values()))
  assert len(rows) == n
  np.testing.assert_array_equal(np.sort(rows), np.arange(n))


def _assert_same(a, b):
  assert list(a) == list(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def _mean_tv(part, labels):
  """Mean total-variation distance of client label histograms to global."""
  glob = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)
  tvs = [0.5 * np.abs(np.bincount(labels[rows], minlength=NUM_CLASSES)
                      / len(rows) - glob).sum() for rows in part.values()]
  return float(np.mean(tvs))


ALL = {
    'iid': lambda seed: partitions.iid(len(LABELS), 37, seed),
    'iid_sized': lambda seed: partitions.iid(
        len(LABELS), 37, seed,
        sizes=partitions.lognormal_sizes(len(LABELS), 37, 1.5, seed)),
    'dirichlet': lambda seed: partitions.dirichlet(LABELS, 37, 0.3, seed),
    'shards': lambda seed: partitions.shards(LABELS, 37, 3, seed),
}


@pytest.mark.parametrize('kind', sorted(ALL))
def test_deterministic_and_exact_cover(kind):
  make = ALL[kind]
  a, b, c = make(0), make(0), make(1)
  _assert_same(a, b)
  assert any(not np.array_equal(a[k], c[k]) for k in a)
  _assert_exact_cover(a, len(LABELS))
  assert list(a) == partitions.client_ids(37)
  assert list(a)[7] == 'client_00007'
  assert all(r.dtype == np.int64 and len(r) >= 1 for r in a.values())
  assert all(np.all(np.diff(r) > 0) for r in a.values())  # sorted, unique


def test_iid_sizes_equal_and_labels_balanced():
  part = partitions.iid(len(LABELS), 20, seed=0)
  sizes = [len(r) for r in part.values()]
  assert max(sizes) - min(sizes) <= 1
  assert _mean_tv(part, LABELS) < 0.1


def test_lognormal_sizes():
  sizes = partitions.lognormal_sizes(10_000, 100, sigma=2.0, seed=0,
                                     min_size=5)
  assert sizes.sum() == 10_000 and sizes.min() >= 5
  assert sizes.max() > 10 * np.median(sizes)  # heavy tail
  flat = partitions.lognormal_sizes(1000, 10, sigma=0.0, seed=0)
  np.testing.assert_array_equal(flat, np.full(10, 100))


def test_dirichlet_skew_follows_alpha():
  skewed = partitions.dirichlet(LABELS, 20, alpha=0.05, seed=0)
  mild = partitions.dirichlet(LABELS, 20, alpha=1000.0, seed=0)
  assert _mean_tv(skewed, LABELS) > 0.5
  assert _mean_tv(mild, LABELS) < 0.15
  # Small alpha: a typical client holds few labels.
  labels_per_client = [len(np.unique(LABELS[r])) for r in skewed.values()]
  assert np.median(labels_per_client) <= 4
  _assert_exact_cover(skewed, len(LABELS))


def test_dirichlet_min_examples_resamples():
  part = partitions.dirichlet(LABELS, 50, alpha=0.1, seed=3, min_examples=10)
  assert min(len(r) for r in part.values()) >= 10
  _assert_exact_cover(part, len(LABELS))


@pytest.mark.parametrize('kwargs, match', [
    (dict(alpha=0.0), 'alpha'),
    (dict(alpha=-1.0), 'alpha'),
    (dict(num_clients=20_000), 'num_clients'),
    (dict(num_clients=0), 'num_clients'),
    (dict(min_examples=1001), 'min_examples'),
])
def test_dirichlet_errors(kwargs, match):
  args = dict(labels=LABELS, num_clients=10, alpha=0.5, seed=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    partitions.dirichlet(**args)


def test_dirichlet_gives_up_clearly():
  with pytest.raises(ValueError, match='larger alpha'):
    partitions.dirichlet(np.repeat([0, 1], 20), 40, alpha=1e-3, seed=0,
                         min_examples=1)


def test_shards_limit_labels_per_client():
  # 100 shards of 100 rows; shards never straddle a label boundary.
  part = partitions.shards(LABELS, num_clients=50, shards_per_client=2, seed=0)
  _assert_exact_cover(part, len(LABELS))
  assert all(len(r) == 200 for r in part.values())
  labels_per_client = [len(np.unique(LABELS[r])) for r in part.values()]
  assert max(labels_per_client) <= 2
  assert _mean_tv(part, LABELS) > 0.75


def test_shards_errors():
  with pytest.raises(ValueError, match='shards'):
    partitions.shards(LABELS[:10], 6, 2, seed=0)
  with pytest.raises(ValueError, match='shards_per_client'):
    partitions.shards(LABELS, 6, 0, seed=0)


def test_natural_groups_by_key():
  keys = np.array([3, 1, 3, 2, 1, 3])
  part = partitions.natural(keys)
  assert list(part) == ['1', '2', '3']
  np.testing.assert_array_equal(part['1'], [1, 4])
  np.testing.assert_array_equal(part['2'], [3])
  np.testing.assert_array_equal(part['3'], [0, 2, 5])
  writers = partitions.natural(np.array(['w_b', 'w_a', 'w_b']))
  assert list(writers) == ['w_a', 'w_b']
  with pytest.raises(ValueError):
    partitions.natural(np.array([]))


def test_from_partition_roundtrip():
  from fedjax_eff.data.federated import FederatedData
  x = np.arange(len(LABELS), dtype=np.float32)
  part = partitions.dirichlet(LABELS, 12, alpha=0.5, seed=0)
  data = FederatedData.from_partition({'x': x, 'y': LABELS}, part)
  assert data.client_ids == list(part)
  assert data.client_sizes.sum() == len(LABELS)
  np.testing.assert_array_equal(data.client('client_00003')['x'],
                                x[part['client_00003']])
