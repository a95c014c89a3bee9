"""Cohort sampling and packing into static shapes."""

import numpy as np
import pytest

from fedjax_eff.data import CohortSampler, FederatedData, pack
from tests import helpers


def test_sampler_is_reproducible_without_replacement():
  s = CohortSampler(num_clients=50, clients_per_round=10, seed=3)
  a, b = s.sample(4), CohortSampler(50, 10, 3).sample(4)
  np.testing.assert_array_equal(a, b)
  assert len(set(a.tolist())) == 10
  assert not np.array_equal(s.sample(4), s.sample(5))
  assert not np.array_equal(s.sample(4), CohortSampler(50, 10, 4).sample(4))
  # Over many rounds every client gets sampled at a similar rate.
  counts = np.bincount(np.concatenate([s.sample(r) for r in range(500)]),
                       minlength=50)
  assert counts.min() > 60 and counts.max() < 140  # mean 100


def test_sampler_rejects_impossible_cohorts():
  with pytest.raises(ValueError, match='clients_per_round'):
    CohortSampler(5, 6, 0)
  with pytest.raises(ValueError, match='clients_per_round'):
    CohortSampler(5, 0, 0)


def test_pack_pads_small_and_subsamples_large_clients():
  data = helpers.ragged_clients(sizes=(3, 40, 12))
  c = pack(data, np.arange(3), steps=3, batch_size=4, seed=0, round_num=0)
  assert c.batches['x'].shape == (3, 3, 4, 6, 6, 1)
  assert c.mask.shape == (3, 3, 4)
  np.testing.assert_array_equal(c.mask.reshape(3, -1).sum(1), [3, 12, 12])
  np.testing.assert_array_equal(c.weight, [3, 12, 12])
  # Real examples come first; padding is zeros.
  assert c.mask[0].reshape(-1)[:3].all() and not c.mask[0].reshape(-1)[3:].any()
  assert np.all(c.batches['x'][0].reshape(12, -1)[3:] == 0)
  # The large client's subset differs between rounds, is reproducible.
  c1 = pack(data, np.arange(3), steps=3, batch_size=4, seed=0, round_num=1)
  c0 = pack(data, np.arange(3), steps=3, batch_size=4, seed=0, round_num=0)
  np.testing.assert_array_equal(c0.batches['x'], c.batches['x'])
  assert not np.array_equal(c1.batches['x'][1], c.batches['x'][1])
  # Every packed example of the large client is one of its own.
  own = {tuple(r) for r in data.client(1)['x'].reshape(40, -1).round(6)}
  assert all(tuple(r) in own
             for r in c.batches['x'][1].reshape(12, -1).round(6))


def test_pack_policies_and_errors():
  data = helpers.ragged_clients(sizes=(3, 40))
  c = pack(data, np.arange(2), steps=2, batch_size=4, seed=0, round_num=0,
           policy_small='repeat', weighting='uniform')
  np.testing.assert_array_equal(c.mask.reshape(2, -1).sum(1), [8, 8])
  np.testing.assert_array_equal(c.weight, [1, 1])
  c = pack(data, np.arange(2), steps=2, batch_size=4, seed=0, round_num=0,
           policy_small='repeat')
  np.testing.assert_array_equal(c.weight, [3, 8])
  with pytest.raises(ValueError, match='policy_large'):
    pack(data, np.arange(2), steps=2, batch_size=4, seed=0, round_num=0,
         policy_large='error')
  with pytest.raises(ValueError, match='batch_size'):
    pack(data, np.arange(2), steps=2, batch_size=0, seed=0, round_num=0)


def test_federated_data_sizes_can_differ_by_1000x():
  rng = np.random.default_rng(0)
  d = FederatedData({'a': {'x': rng.normal(size=(2, 3))},
                     'b': {'x': rng.normal(size=(2000, 3))}})
  assert d.client_sizes.tolist() == [2, 2000]
  c = pack(d, np.arange(2), steps=4, batch_size=8, seed=0, round_num=0)
  np.testing.assert_array_equal(c.weight, [2, 32])
  with pytest.raises(ValueError, match='unequal length'):
    FederatedData({'a': {'x': np.zeros(3), 'y': np.zeros(2)}})

