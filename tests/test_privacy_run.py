"""Privacy as a user runs it: epsilon in every metrics line and in
summary.json, equal to dp-accounting's for the schedule; a resumed run
reports what an unbroken one does; target_epsilon ends training before it
is exceeded; bad settings are one clear error."""

import json

import ml_collections
import numpy as np
import pytest

from fedjax_eff.experiment import train as train_lib
from fedjax_eff.experiment.defaults import base_config
from fedjax_eff.experiment.metrics import read_metrics
from fedjax_eff.privacy import accounting


def _config(**privacy):
  c = base_config()
  c.num_rounds = 4
  c.clients_per_round = 10
  c.data.num_clients, c.data.heldout_clients = 100, 0
  c.model.name = 'logreg'
  c.client.local_steps = 2
  c.client.batch_size = 8
  c.client.weighting = 'uniform'
  c.sampling = 'poisson'
  c.privacy.mechanism = 'gaussian'
  c.privacy.noise_multiplier = 1.2
  c.privacy.clip_norm = 0.5
  c.privacy.target_quantile = 0.5
  # σ_b: K / 20 = 0.5 (the default) would need a total z below 1.
  c.privacy.count_noise_multiplier = 2.0
  for k, v in privacy.items():
    if k in ('sampling', 'num_rounds'):
      c[k] = v
    else:
      c.privacy[k] = v
  c.eval_every = 2
  c.checkpoint_every = 2
  c.accounting = False
  c.tensorboard = False
  c.progress = False
  return c


def _schedule(c):
  """The schedule by hand: with adaptive clipping the configured z is the
  total, the update's z_Δ composes with the count's 2 σ_b to it."""
  k = c.clients_per_round
  count = ((c.privacy.count_noise_multiplier or k / 20)
           if c.privacy.target_quantile else 0.0)
  z = c.privacy.noise_multiplier
  z_update = (z ** -2 - (2 * count) ** -2) ** -0.5 if count else z
  return accounting.PrivacySchedule(
      noise_multiplier=z_update, sampling=c.sampling,
      population=c.data.num_clients, clients_per_round=k,
      delta=c.privacy.delta, accountant=c.privacy.accountant,
      count_noise_multiplier=count)


def test_epsilon_every_round_resume_and_summary(tmp_path):
  c = _config()
  straight = train_lib.train_and_evaluate(c, str(tmp_path / 'a'))
  rows = read_metrics(str(tmp_path / 'a'))
  eps = [r['epsilon'] for r in rows]
  want = [accounting.epsilon(_schedule(c), r) for r in range(1, 5)]
  np.testing.assert_allclose(eps, want, rtol=1e-9)
  assert all(a < b for a, b in zip(eps, eps[1:]))
  # Poisson: cohorts of varying size, all within the slots.
  sizes = [r['num_clients'] for r in rows]
  assert all(0 <= s <= 30 for s in sizes) and len(set(sizes)) > 1
  # Bits: the mean over the clients drawn (fp32 model + the count's 32).
  assert all(r['upload_bits'] == 32 * (64 * 10 + 10) + 32 for r in rows)
  assert all(r['clip_norm'] > 0 for r in rows)
  p = straight['privacy']
  assert p['epsilon'] == pytest.approx(want[-1], rel=1e-9)
  assert p['delta'] == 1e-5 and p['rounds'] == 4
  assert p['sampling_probability'] == pytest.approx(0.1)
  assert p['effective_noise_multiplier'] == pytest.approx(1.2, rel=1e-9)
  assert p['noise_multiplier'] > 1.2 and p['accountant'] == 'rdp'
  # Two rounds, then resumed to four: the same model and the same epsilon.
  half = ml_collections.ConfigDict(c.to_dict())
  half.num_rounds = 2
  train_lib.train_and_evaluate(half, str(tmp_path / 'b'))
  resumed = train_lib.train_and_evaluate(c, str(tmp_path / 'b'),
                                         allow_config_change=('num_rounds',))
  assert resumed['resumed_from_round'] == 2
  assert resumed['params_sha256'] == straight['params_sha256']
  assert resumed['privacy']['epsilon'] == p['epsilon']
  assert resumed['privacy']['clip_norm'] == p['clip_norm']
  assert [r['epsilon'] for r in read_metrics(str(tmp_path / 'b'))] == eps


def test_target_epsilon_ends_training_before_it_is_exceeded(tmp_path,
                                                              capsys):
  c = _config()
  s = _schedule(c)
  c.privacy.target_epsilon = (accounting.epsilon(s, 2)
                              + accounting.epsilon(s, 3)) / 2
  summary = train_lib.train_and_evaluate(c, str(tmp_path))
  assert summary['rounds'] == 2
  assert summary['privacy']['epsilon'] <= c.privacy.target_epsilon
  assert 'stops after round 2 of 4' in capsys.readouterr().out
  # A target one round already exceeds: refused up front.
  c.privacy.target_epsilon = accounting.epsilon(s, 1) / 2
  with pytest.raises(Exception, match='exceeded by one round'):
    train_lib.train_and_evaluate(c, str(tmp_path / 'x'))


def test_banded_dp_ftrl_runs_with_cyclic_sampling(tmp_path):
  c = _config(mechanism='banded', sampling='cyclic', target_quantile=0.0,
              noise_multiplier=2.0)
  summary = train_lib.train_and_evaluate(c, str(tmp_path))
  rows = read_metrics(str(tmp_path))
  assert [r['num_clients'] for r in rows] == [10] * 4
  assert summary['privacy']['mechanism'] == 'banded'
  assert 0 < summary['privacy']['epsilon'] < float('inf')
  assert np.isfinite(summary['final_metrics']['test_accuracy'])


@pytest.mark.parametrize('change, message', [
    (dict(weighting='num_examples'), "weighting='uniform'"),
    (dict(mechanism='banded'), "sampling='cyclic'"),
    (dict(sampling='cyclic'), 'amplification'),
    (dict(delta=2.0), 'delta'),
    (dict(mechanism='laplace'), 'mechanism'),
    (dict(mechanism='distributed', sampling='fixed'), 'secure_aggregation'),
    (dict(profiles='parametric', sampling='fixed'), 'online'),
])
def test_bad_settings_are_one_line(tmp_path, change, message):
  c = _config()
  if 'weighting' in change:
    c.client.weighting = change.pop('weighting')
  for k, v in change.items():
    if k == 'sampling':
      c.sampling = v
    elif k == 'profiles':
      c.devices.profiles = v
    else:
      c.privacy[k] = v
  with pytest.raises(Exception, match=message) as e:
    train_lib.train_and_evaluate(c, str(tmp_path))
  assert '\n' not in str(e.value)
  json.dumps(str(e.value))


def test_distributed_discrete_gaussian_under_secure_aggregation(tmp_path):
  """No central noise: SecAgg's clients clip and add the discrete
  Gaussian; epsilon per round is Kairouz et al.'s bound for the run's K
  and model size (secagg.ddg_epsilon), every round composed."""
  from fedjax_eff.privacy import secagg
  c = _config(mechanism='distributed', sampling='fixed', target_quantile=0.0)
  knobs = dict(bits=16, scale=2.0 ** 8, clip_norm=1.0, noise_stddev=0.05)
  c.techniques = [ml_collections.ConfigDict(dict(name='secure_aggregation',
                                                 **knobs))]
  summary = train_lib.train_and_evaluate(c, str(tmp_path))
  rows = read_metrics(str(tmp_path))
  want = [secagg.ddg_epsilon(clip_norm=1.0, scale=2.0 ** 8,
                             noise_stddev=0.05, clients=10, dim=650,
                             rounds=r, delta=1e-5) for r in range(1, 5)]
  np.testing.assert_allclose([r['epsilon'] for r in rows], want, rtol=1e-12)
  assert all(r['upload_bits'] == 16 * 650 for r in rows)
  p = summary['privacy']
  assert p['mechanism'] == 'distributed_discrete_gaussian'
  assert p['epsilon'] == pytest.approx(want[-1])
  assert rows[-1]['train_loss'] < rows[0]['train_loss'] - 0.2  # it learns
  # Central DP cannot read SecAgg's updates: refused.
  c.privacy.mechanism = 'gaussian'
  with pytest.raises(Exception, match='cannot read updates'):
    train_lib.train_and_evaluate(c, str(tmp_path / 'x'))


def test_pld_accountant_in_a_run(tmp_path):
  c = _config(accountant='pld')
  c.num_rounds = 2
  train_lib.train_and_evaluate(c, str(tmp_path))
  s = _schedule(c)
  assert s.accountant == 'pld'
  np.testing.assert_allclose(
      [r['epsilon'] for r in read_metrics(str(tmp_path))],
      [accounting.epsilon(s, r) for r in (1, 2)], rtol=1e-9)
