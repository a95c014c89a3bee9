"""Devices in time as a user runs them: synchronous rounds whose length is
the formula on the devices' profiles, deadlines and over-selection,
availability, a clock that survives a resume; FedBuff equal to FedAvg in
its synchronous limit and bit-identical across a resume."""

import dataclasses

import ml_collections
import numpy as np
import pytest

from fedjax_eff.devices import profiles as profiles_lib
from fedjax_eff.experiment import build
from fedjax_eff.experiment import device_time as device_time_lib
from fedjax_eff.experiment import train as train_lib
from fedjax_eff.experiment.defaults import base_config
from fedjax_eff.experiment.metrics import read_metrics


def _config(rounds=3, **devices):
  c = base_config()
  c.num_rounds = rounds
  c.clients_per_round = 5
  c.data.num_clients, c.data.heldout_clients = 40, 0
  c.model.name = 'logreg'
  c.client.local_steps = 2
  c.client.batch_size = 8
  c.eval_every = rounds
  c.checkpoint_every = 2
  c.tensorboard = False
  c.progress = False
  c.devices.profiles = 'uniform'
  for k, v in devices.items():
    c.devices[k] = v
  return c


def test_round_time_is_the_formula_on_uniform_devices(tmp_path):
  c = _config()
  train_lib.train_and_evaluate(c, str(tmp_path))
  rows = read_metrics(str(tmp_path))
  exp = build.Experiment(c)
  cost = exp.program_cost(0, 0)
  mid = profiles_lib.DEFAULT_CLASSES[1]
  want = (cost.download_bits / mid.download_bits_per_second
          + cost.flops_per_round / mid.flops_per_second
          + cost.upload_bits / mid.upload_bits_per_second)
  for r in rows:
    assert r['sim_round_seconds'] == pytest.approx(want, rel=1e-9)
    assert r['num_selected'] == 5 and r['num_late'] == 0
  np.testing.assert_allclose([r['sim_hours'] for r in rows],
                             np.arange(1, 4) * want / 3600, rtol=1e-9)


def test_deadline_and_over_selection_with_parametric_devices(tmp_path):
  c = _config(rounds=2, profiles='parametric', over_selection=0.6,
              deadline_seconds=0.05, failure_probability=0.2, jitter=0.3)
  exp = build.Experiment(c)
  for r in range(2):
    sim = exp.device_time.round(r)
    rec = sim.record
    assert rec['num_selected'] == 8  # ceil(5 x 1.6)
    assert sim.aggregated <= 5
    # Everyone selected is aggregated, late, failed or one more than K.
    assert sim.aggregated + rec['num_late'] + rec['num_failed'] <= 8
    if sim.aggregated < 5:  # fewer than K in time: the round waits D
      assert rec['sim_round_seconds'] == pytest.approx(0.05)
    else:
      assert rec['sim_round_seconds'] <= 0.05


def test_only_online_clients_are_sampled():
  c = _config(availability='diurnal')
  exp = build.Experiment(c)
  dt = exp.device_time
  avail = dt.profiles.availability
  for t in (0.0, 6 * 3600.0, 23.5 * 3600.0):
    dt.clock = {0: t}
    sim = dt.round(0)
    ids = sim.ids[:int(sim.record['num_selected'])]
    assert np.all(avail.available(ids, t))
    assert sim.record['num_available'] == np.sum(avail.available(None, t))


def test_memory_decides_tiers_and_exclusion():
  profiles = dataclasses.replace(
      profiles_lib.uniform(4), memory_bytes=np.array([1e6, 5e6, 2e7, 1e5]))
  drawn = np.array([1, 1, 0, 0])
  tiers, ok = device_time_lib.memory_tiers(profiles, [2e6, 1e7], drawn, True)
  np.testing.assert_array_equal(tiers, [0, 0, 1, 0])
  np.testing.assert_array_equal(ok, [False, True, True, False])
  tiers, ok = device_time_lib.memory_tiers(profiles, [2e6, 1e7], drawn, False)
  np.testing.assert_array_equal(tiers, drawn)
  np.testing.assert_array_equal(ok, [False, False, True, False])


def test_the_clock_survives_a_resume(tmp_path):
  c = _config(rounds=4, profiles='parametric', jitter=0.2)
  straight = train_lib.train_and_evaluate(c, str(tmp_path / 'a'))
  half = ml_collections.ConfigDict(c.to_dict())
  half.num_rounds = 2
  train_lib.train_and_evaluate(half, str(tmp_path / 'b'))
  resumed = train_lib.train_and_evaluate(c, str(tmp_path / 'b'),
                                         allow_config_change=('num_rounds',))
  assert resumed['params_sha256'] == straight['params_sha256']
  a = [r['sim_hours'] for r in read_metrics(str(tmp_path / 'a'))]
  b = [r['sim_hours'] for r in read_metrics(str(tmp_path / 'b'))]
  assert a == b and len(a) == 4


def _fedbuff(c, concurrency, buffer_size, staleness='sqrt'):
  c.mode = 'fedbuff'
  c.fedbuff.concurrency = concurrency
  c.fedbuff.buffer_size = buffer_size
  c.fedbuff.staleness = staleness
  return c


def test_fedbuff_in_its_synchronous_limit_is_fedavg(tmp_path):
  """M = K = P on identical devices: every version's clients start from
  it and arrive together (τ = 0), drawn and keyed as FedAvg's rounds."""
  fedavg = _config(rounds=3, profiles='none')
  want = train_lib.train_and_evaluate(fedavg, str(tmp_path / 'avg'))
  buff = _fedbuff(_config(rounds=3), 5, 5)
  got = train_lib.train_and_evaluate(buff, str(tmp_path / 'buff'))
  rows = read_metrics(str(tmp_path / 'buff'))
  assert [r['staleness_max'] for r in rows] == [0.0] * 3
  avg_rows = read_metrics(str(tmp_path / 'avg'))
  np.testing.assert_allclose([r['train_loss'] for r in rows],
                             [r['train_loss'] for r in avg_rows], rtol=1e-5)
  assert got['final_metrics']['test_accuracy'] == pytest.approx(
      want['final_metrics']['test_accuracy'], abs=1e-3)


def test_fedbuff_resume_is_bit_identical(tmp_path):
  c = _fedbuff(_config(rounds=6, profiles='parametric', jitter=0.3,
                       failure_probability=0.1), 8, 3)
  straight = train_lib.train_and_evaluate(c, str(tmp_path / 'a'))
  rows = read_metrics(str(tmp_path / 'a'))
  assert max(r['staleness_max'] for r in rows) > 0  # asynchronous indeed
  half = ml_collections.ConfigDict(c.to_dict())
  half.num_rounds = 3
  train_lib.train_and_evaluate(half, str(tmp_path / 'b'))
  resumed = train_lib.train_and_evaluate(c, str(tmp_path / 'b'),
                                         allow_config_change=('num_rounds',))
  assert resumed['params_sha256'] == straight['params_sha256']
  assert ([r['sim_hours'] for r in read_metrics(str(tmp_path / 'b'))]
          == [r['sim_hours'] for r in rows])


@pytest.mark.parametrize('change, message', [
    (dict(mode='fedbuff', profiles='none'), 'devices.profiles'),
    (dict(failure_probability=1.0), 'failure_probability'),
    (dict(profiles='phones'), 'profiles'),
])
def test_bad_device_settings_are_one_line(tmp_path, change, message):
  c = _config()
  if 'mode' in change:
    c.mode = change.pop('mode')
  for k, v in change.items():
    c.devices[k] = v
  with pytest.raises(Exception, match=message) as e:
    train_lib.train_and_evaluate(c, str(tmp_path))
  assert '\n' not in str(e.value)


def test_fedscale_traces_drive_a_run(tmp_path):
  """FedScale's two pickles (its formats, rows written here): speeds from
  the capacity trace, availability from the behaviour trace; only online
  clients are sampled and a client offline before it would finish fails."""
  import pickle
  rng = np.random.default_rng(0)
  capacity = {i: {'computation': float(rng.uniform(50, 400)),
                  'communication': float(rng.uniform(500, 20000))}
              for i in range(30)}
  behave = {i: {'active': [0, 40 + 10 * (i % 5)],
                'inactive': [20 + 5 * (i % 3), 120], 'finish_time': 200,
                'duration': 0, 'model': 'x'} for i in range(30)}
  for name, obj in (('cap.pkl', capacity), ('beh.pkl', behave)):
    with open(tmp_path / name, 'wb') as f:
      pickle.dump(obj, f)
  c = _config(rounds=3, profiles='fedscale', availability='fedscale',
              trace_path=str(tmp_path / 'cap.pkl'),
              availability_path=str(tmp_path / 'beh.pkl'), over_selection=1.0)
  summary = train_lib.train_and_evaluate(c, str(tmp_path / 'run'))
  rows = read_metrics(str(tmp_path / 'run'))
  assert len(rows) == 3 and summary['rounds'] == 3
  exp = build.Experiment(c)
  dt, avail = exp.device_time, exp.device_time.profiles.availability
  assert len(set(np.asarray(dt.profiles.flops_per_second).round(3))) > 5
  t = 0.0
  for r in range(3):
    sim = dt.round(r)
    n = int(sim.record['num_selected'])
    assert np.all(avail.available(sim.ids[:n], t))
    assert sim.record['num_available'] == np.sum(avail.available(None, t))
    t += sim.record['sim_round_seconds']
    assert rows[r]['sim_hours'] == pytest.approx(t / 3600)


def test_tiers_by_memory_feed_last_n(tmp_path):
  """Two last-n tiers (head; dense1 + head): each client trains the
  largest its device's memory holds, by the compiled programs' peaks."""
  c = _config(rounds=1, profiles='parametric', tiers_by_memory=True)
  c.model.name = 'mlp'
  c.model.kwargs.hidden = (32,)
  c.devices.tier_fractions = [0.5, 0.5]
  c.techniques = [ml_collections.ConfigDict(dict(name='last_n', n=[0, 1]))]
  exp = build.Experiment(c)
  peaks = [exp.program_cost(0, t).peak_bytes for t in range(2)]
  assert peaks[0] < peaks[1]
  memory = np.asarray(exp.device_time.profiles.memory_bytes)
  np.testing.assert_array_equal(exp.tier_of, np.where(memory >= peaks[1],
                                                      1, 0))
  # Devices between the two programs' peaks, and one below both.
  small = dataclasses.replace(
      exp.device_time.profiles.subset([0, 1, 2]),
      memory_bytes=np.array([peaks[0] - 1, (peaks[0] + peaks[1]) / 2,
                             peaks[1]]))
  tiers, ok = device_time_lib.memory_tiers(small, peaks, np.zeros(3, int),
                                           True)
  np.testing.assert_array_equal(tiers, [0, 0, 1])
  np.testing.assert_array_equal(ok, [False, True, True])


def test_fedbuff_with_nobody_ever_online_fails_in_one_line(tmp_path):
  """A trace where no client comes online for weeks: one line, no hang."""
  import pickle
  behave = {i: {'active': [9e7], 'inactive': [9e7 + 10], 'finish_time': 1e8,
                'duration': 10, 'model': 'x'} for i in range(40)}
  with open(tmp_path / 'beh.pkl', 'wb') as f:
    pickle.dump(behave, f)
  c = _fedbuff(_config(rounds=2, availability='fedscale',
                       availability_path=str(tmp_path / 'beh.pkl')), 4, 2)
  with pytest.raises(Exception, match='no client came online') as e:
    train_lib.train_and_evaluate(c, str(tmp_path / 'run'))
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('client', [
    dict(epochs=1), dict(epochs=2, max_examples=30), dict(local_steps=8),
    dict(local_steps=8, policy_small='repeat')])
def test_local_steps_of_sizes_are_what_pack_runs(client):
  """`cohort.local_steps_of` (sizes alone) against the mask `pack` makes,
  for every training client."""
  from fedjax_eff.data import cohort as cohort_lib  # pylint: disable=g-import-not-at-top
  c = _config()
  c.client.batch_size = 4
  for k, v in client.items():
    c.client[k] = v
  exp = build.Experiment(c)
  train = exp.data.train
  ids = np.arange(train.num_clients)
  packed = cohort_lib.pack(train, ids, round_num=0, **exp.packing)
  got = cohort_lib.local_steps_of(train.client_sizes, **exp.packing)
  np.testing.assert_array_equal(got, packed.steps_run)
  if client.get('policy_small') != 'repeat':
    assert got.min() < exp.local_steps  # the sizes really vary


def test_devices_are_timed_at_their_own_steps(tmp_path):
  """With `client.epochs` each client computes its own steps: T_i =
  down/B + F (s_i / S) / R + up/B, s_i read off the packed cohort (not
  S for everyone); a deadline between the short and the long clients makes
  exactly the long ones late."""
  from fedjax_eff.data import cohort as cohort_lib  # pylint: disable=g-import-not-at-top
  c = _config(rounds=2)
  c.client.epochs, c.client.batch_size = 1, 4
  exp = build.Experiment(c)
  cost = exp.program_cost(0, 0)
  mid = profiles_lib.DEFAULT_CLASSES[1]
  fixed = (cost.download_bits / mid.download_bits_per_second
           + cost.upload_bits / mid.upload_bits_per_second)
  per_step = cost.flops_per_round / exp.local_steps / mid.flops_per_second
  sim = exp.make_device_time().round(0)
  steps = cohort_lib.pack(exp.data.train, np.sort(sim.ids), round_num=0,
                          **exp.packing).steps_run
  seconds = fixed + per_step * steps
  assert steps.min() < steps.max() <= exp.local_steps
  assert sim.record['sim_round_seconds'] == pytest.approx(seconds.max(),
                                                          rel=1e-9)
  # A deadline between the fastest and the slowest of the cohort.
  deadline = float(np.median(seconds))
  c.devices.deadline_seconds = deadline
  exp = build.Experiment(c)
  sim = exp.make_device_time().round(0)
  assert sim.record['num_late'] == np.sum(seconds > deadline) > 0
  assert sim.aggregated == np.sum(seconds <= deadline)
