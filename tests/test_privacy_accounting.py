"""Privacy accounting: ε equals dp-accounting's for the run's event, the
calibrations land on their targets, Andrew et al.'s composition, the banded
sensitivity, the accountant's state, and launch/noise_multiplier.py."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import dp_accounting
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp
import numpy as np
import pytest

from fedjax_eff.privacy import accounting as acc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, 'launch', 'noise_multiplier.py')
REL = dp_accounting.NeighboringRelation
DELTA = 1e-5


def schedule(**kw):
  base = dict(noise_multiplier=1.0, sampling='poisson', population=10_000,
              clients_per_round=100, delta=DELTA)
  base.update(kw)
  return acc.PrivacySchedule(**base)


def banded(**kw):
  # N // K = 10 blocks: min_sep 10; 35 rounds: at most 4 participations.
  return schedule(**dict(dict(sampling='cyclic', population=100,
                              clients_per_round=10, mechanism='banded',
                              bands=3, num_rounds=35), **kw))


def direct(accountant, event):
  return accountant.compose(event).get_epsilon(DELTA)


# ---------------------------------------------------------------- epsilon


@pytest.mark.parametrize('kind', ['rdp', 'pld'])
def test_poisson_equals_dp_accounting(kind):
  s = schedule(noise_multiplier=0.8, accountant=kind)
  event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      0.01, dp_accounting.GaussianDpEvent(0.8)), 500)
  want = direct(dp_rdp.RdpAccountant() if kind == 'rdp' else
                dp_pld.PLDAccountant(value_discretization_interval=1e-3),
                event)
  assert 1 < want < 20
  assert acc.epsilon(s, 500) == want
  # The accountant's cached path (one round's RDP curve / PLD, scaled).
  assert acc.Accountant(s).epsilon(500) == pytest.approx(want, rel=1e-9)
  assert acc.epsilon(s, 0) == 0.0 and acc.Accountant(s).epsilon(0) == 0.0


def test_fixed_is_replace_one_with_twice_the_sensitivity():
  s = schedule(sampling='fixed', population=1000, clients_per_round=10,
               noise_multiplier=2.0)
  want = direct(dp_rdp.RdpAccountant(neighboring_relation=REL.REPLACE_ONE),
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.SampledWithoutReplacementDpEvent(
                        1000, 10, dp_accounting.GaussianDpEvent(1.0)), 200))
  assert 0.5 < want < 20
  assert acc.epsilon(s, 200) == want
  assert acc.Accountant(s).epsilon(200) == pytest.approx(want, rel=1e-12)
  # Poisson at the same q and z is cheaper in ε (add/remove, sensitivity C).
  assert acc.epsilon(schedule(sampling='poisson', population=1000,
                              clients_per_round=10, noise_multiplier=2.0),
                     200) < want


def test_fixed_pld_is_refused():
  with pytest.raises(ValueError, match="accountant='rdp' or poisson"):
    schedule(sampling='fixed', accountant='pld')


@pytest.mark.parametrize('kind', ['rdp', 'pld'])
def test_banded_whole_run_is_one_gaussian_of_z(kind):
  s = banded(noise_multiplier=3.0, accountant=kind)
  fresh = (dp_rdp.RdpAccountant if kind == 'rdp' else
           lambda: dp_pld.PLDAccountant(value_discretization_interval=1e-3))
  want = direct(fresh(), dp_accounting.GaussianDpEvent(3.0))
  assert acc.epsilon(s, 35) == want
  # After 12 rounds a client took part at most ceil(12 / 10) = 2 times of
  # the 4 the noise is sized for: Gaussian(3 * sqrt(4) / sqrt(2)).
  prefix = direct(fresh(), dp_accounting.GaussianDpEvent(3.0 * math.sqrt(2)))
  assert acc.epsilon(s, 12) == pytest.approx(prefix, rel=1e-12)
  assert prefix < want
  assert acc.dp_event(s, 12) == dp_accounting.GaussianDpEvent(
      pytest.approx(3.0 * math.sqrt(2)))
  with pytest.raises(ValueError, match='num_rounds=35'):
    acc.epsilon(s, 36)


def test_cyclic_gaussian_composes_the_participations():
  s = schedule(sampling='cyclic', population=100, clients_per_round=10,
               noise_multiplier=2.0)
  assert s.sampling_probability == pytest.approx(0.1)
  want = direct(dp_rdp.RdpAccountant(), dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(2.0), 3))          # ceil(25 / 10)
  assert acc.epsilon(s, 25) == acc.Accountant(s).epsilon(25) == want
  assert acc.epsilon(s, 21) == want > acc.epsilon(s, 20)


@pytest.mark.parametrize('kind', ['rdp', 'pld'])
def test_monotone_in_rounds_and_noise(kind):
  s = schedule(accountant=kind)
  by_rounds = [acc.epsilon(s, r) for r in (1, 10, 100, 1000)]
  assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
  by_z = [acc.epsilon(dataclasses.replace(s, noise_multiplier=z), 100)
          for z in (0.7, 1.0, 2.0)]
  assert by_z[0] > by_z[1] > by_z[2] > 0


@pytest.mark.parametrize('kind', ['rdp', 'pld'])
def test_noise_multiplier_for_lands_on_the_target(kind):
  s = schedule(accountant=kind, noise_multiplier=123.0)  # ignored
  z = acc.noise_multiplier_for(4.0, s, 300)
  at = lambda z: acc.epsilon(dataclasses.replace(s, noise_multiplier=z), 300)
  assert 0.99 * 4.0 <= at(z) <= 4.0
  assert at(0.999 * z) > 4.0   # the smallest such z
  assert 0.5 < z < 2


def test_noise_multiplier_for_banded():
  s = banded(accountant='pld')
  z = acc.noise_multiplier_for(2.0, s, 35)
  # The whole banded run is Gaussian(z): the analytic Gaussian mechanism's
  # sigma (Balle & Wang 2018), which PLD approaches from above.
  want = dp_accounting.get_sigma_gaussian(2.0, DELTA)
  assert want <= z <= 1.01 * want
  assert acc.epsilon(dataclasses.replace(s, noise_multiplier=z), 35) <= 2.0


# ------------------------------------------------------ adaptive clipping


def test_andrew_et_al_composition():
  # Andrew et al.'s default sigma_b = K / 20: K = 100 gives 5; a total
  # z = 1 needs z_update = (1 - (2 * 5)^-2)^(-1/2) = 1 / sqrt(0.99).
  assert acc.update_noise_multiplier(1.0, 5.0) == pytest.approx(
      1 / math.sqrt(0.99), rel=1e-12)
  assert acc.effective_noise_multiplier(1 / math.sqrt(0.99), 5.0) == (
      pytest.approx(1.0, rel=1e-12))
  for z, zb in ((0.3, 0.2), (1.7, 40.0), (5.0, 2.6)):
    assert acc.effective_noise_multiplier(
        acc.update_noise_multiplier(z, zb), zb) == pytest.approx(z, rel=1e-12)
    assert acc.update_noise_multiplier(
        acc.effective_noise_multiplier(z, zb), zb) == pytest.approx(
            z, rel=1e-9)
  # Equal parts: z_update = 2 sigma_b = z sqrt(2).
  assert acc.effective_noise_multiplier(2.0, 1.0) == pytest.approx(
      math.sqrt(2))
  # A fixed clip releases no count.
  assert acc.effective_noise_multiplier(1.3, 0.0) == 1.3
  assert acc.update_noise_multiplier(1.3, 0.0) == 1.3
  with pytest.raises(ValueError, match='too small') as e:
    acc.update_noise_multiplier(1.0, 0.5)    # 2 sigma_b = z
  assert '\n' not in str(e.value)


def test_count_noise_is_composed_into_the_epsilon():
  s = schedule(noise_multiplier=1.2, count_noise_multiplier=3.0)
  z = acc.effective_noise_multiplier(1.2, 3.0)
  assert z < 1.2
  assert acc.epsilon(s, 100) == acc.epsilon(
      schedule(noise_multiplier=z), 100)
  # Banded: the count's noise is per round, composed per participation.
  b = banded(count_noise_multiplier=4.0)
  want = direct(dp_rdp.RdpAccountant(), dp_accounting.ComposedDpEvent([
      dp_accounting.GaussianDpEvent(1.0), dp_accounting.SelfComposedDpEvent(
          dp_accounting.GaussianDpEvent(8.0), 4)]))
  assert acc.epsilon(b, 35) == pytest.approx(want, rel=1e-12)
  # noise_multiplier_for calibrates the update's z around the count.
  zu = acc.noise_multiplier_for(3.0, s, 100)
  assert acc.epsilon(dataclasses.replace(s, noise_multiplier=zu), 100) == (
      pytest.approx(3.0, rel=0.01))
  with pytest.raises(ValueError, match='clipped count alone'):
    acc.noise_multiplier_for(3.0, dataclasses.replace(
        s, count_noise_multiplier=0.05), 100)


# ------------------------------------------------------ banded sensitivity


def test_banded_sensitivity():
  # One band is the identity: k participations have sensitivity sqrt(k).
  for k in (1, 2, 3, 5):
    assert acc.banded_sensitivity(20, 1, 4, k) == pytest.approx(math.sqrt(k))
  # min_sep 4 in 20 rounds allows 5 at most.
  assert acc.banded_sensitivity(20, 1, 4, None) == pytest.approx(
      math.sqrt(5))
  assert acc.banded_sensitivity(20, 1, 4, 9) == pytest.approx(math.sqrt(5))
  # Column-normalised: one participation has sensitivity 1, any bands.
  assert acc.banded_sensitivity(20, 3, 3, 1) == pytest.approx(1.0)
  assert acc.banded_sensitivity(20, 3, 20, None) == pytest.approx(1.0)
  # The prefix counts the participations in its rounds.
  assert acc.banded_sensitivity(20, 2, 4, None, prefix=6) == pytest.approx(
      math.sqrt(2))
  with pytest.raises(ValueError, match='bands=4 > min_sep=3') as e:
    acc.banded_sensitivity(20, 4, 3, None)
  assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match='min_sep'):
    banded(bands=11)


def test_cyclic_participation():
  assert acc.cyclic_participation(100, 10, 35) == (10, 4)
  assert acc.cyclic_participation(105, 10, 30) == (10, 3)
  assert acc.cyclic_participation(100, 30, 7) == (3, 3)


# ------------------------------------------------- rounds and the state


def test_rounds_within_is_the_boundary():
  s = schedule()
  r = acc.rounds_within(1.5, s, 5000)
  assert 1 < r < 5000
  assert acc.epsilon(s, r) <= 1.5 < acc.epsilon(s, r + 1)
  assert acc.rounds_within(100.0, s, 50) == 50
  assert acc.rounds_within(1e-3, s, 50) == 0
  # Banded: never past the rounds the noise is sized for.
  assert acc.rounds_within(100.0, banded(), 1000) == 35
  # z = 5 sized for 4 participations: Gaussian(10 / sqrt(p)) after p.
  b = banded(noise_multiplier=5.0)
  target = acc.epsilon(b, 20) * 1.001
  assert acc.rounds_within(target, b, 35) == 20
  assert acc.epsilon(b, 20) <= target < acc.epsilon(b, 21)


@pytest.mark.parametrize('s', [
    schedule(accountant='pld', count_noise_multiplier=5.0),
    banded(noise_multiplier=2.0)], ids=['poisson-pld', 'banded'])
def test_accountant_state_round_trips(s):
  a = acc.Accountant(s)
  eps = a.epsilon(30)
  assert a.rounds == 30
  a.epsilon(10)                      # earlier rounds do not go back
  state = json.loads(json.dumps(a.state()))
  assert state['rounds'] == 30 and state['noise_multiplier'] == (
      s.noise_multiplier)
  b = acc.Accountant.from_state(state)
  assert b.schedule == s and b.rounds == 30
  assert b.epsilon() == eps
  summary = b.summary(30)
  assert summary['epsilon'] == eps and summary['rounds'] == 30
  assert {k: summary[k] for k in ('delta', 'noise_multiplier', 'accountant',
                                  'mechanism', 'sampling')} == dict(
      delta=s.delta, noise_multiplier=s.noise_multiplier,
      accountant=s.accountant, mechanism=s.mechanism, sampling=s.sampling)
  assert summary['sampling_probability'] == s.sampling_probability
  with pytest.raises(ValueError, match='unknown keys'):
    acc.Accountant.from_state(dict(state, sigma=1.0))


def test_numpy_numbers_give_a_json_state():
  s = schedule(population=np.int64(10_000), clients_per_round=np.int32(100),
               noise_multiplier=np.float32(1.5), delta=np.float64(DELTA))
  state = acc.Accountant(s).state()
  assert json.loads(json.dumps(state))['population'] == 10_000
  assert type(s.clients_per_round) is int and type(s.noise_multiplier) is (
      float)


@pytest.mark.parametrize('kw, match', [
    (dict(sampling='shuffled'), 'sampling'),
    (dict(accountant='gdp'), 'accountant'),
    (dict(mechanism='tree'), 'mechanism'),
    (dict(noise_multiplier=0.0), 'noise_multiplier'),
    (dict(delta=1.0), 'delta'),
    (dict(clients_per_round=0), 'sampling probability'),
    (dict(clients_per_round=20_000), 'sampling probability'),
    (dict(count_noise_multiplier=-1.0), 'count_noise_multiplier'),
    (dict(mechanism='banded', num_rounds=10), 'cyclic'),
    (dict(sampling='fixed', clients_per_round=2.5), 'integer'),
    (dict(population='100'), 'integer'),
])
def test_bad_schedules_are_one_line_errors(kw, match):
  with pytest.raises(ValueError, match=match) as e:
    schedule(**kw)
  assert '\n' not in str(e.value)


# ------------------------------------------------------------------- CLI


def run_cli(*args):
  return subprocess.run([sys.executable, CLI, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_cli_json():
  r = run_cli('--target_epsilon=5', '--delta=1e-5', '--rounds=200',
              '--sampling_probability=0.02', '--accountant=pld', '--json')
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert 0.99 * 5 <= out['epsilon'] <= 5
  assert out['sampling_probability'] == 0.02 and out['accountant'] == 'pld'
  s = schedule(noise_multiplier=out['noise_multiplier'], population=100,
               clients_per_round=2, accountant='pld')
  assert acc.epsilon(s, 200) == pytest.approx(out['epsilon'], rel=1e-12)


def test_cli_bad_input_is_one_line():
  r = run_cli('--target_epsilon=5', '--delta=1e-5', '--rounds=200',
              '--sampling_probability=0.02', '--sampling=fixed')
  assert r.returncode == 2
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert lines == ['error: --sampling=fixed needs --population (the clients '
                   'K = q N per round depend on it).']
  assert r.stdout == ''
