"""fedjax_eff.devices: profiles, availability, traces and simulated time.

Exact numbers only from closed forms on hand-made profiles; random draws are
tested through invariants (stability, medians), not golden values.
"""

import datetime
import json
import os
import pickle

import numpy as np
import pytest

from fedjax_eff import devices
from fedjax_eff.devices import profiles as profiles_lib
from fedjax_eff.devices import timing
from fedjax_eff.devices import traces

HOUR = 3600.0


def hand_profiles(memory=(1e9, 2e9, 4e9), availability=None):
  n = len(memory)
  return devices.DeviceProfiles(
      flops_per_second=np.array([1e9, 2e9, 4e9])[:n],
      download_bits_per_second=np.array([1e6, 2e6, 8e6])[:n],
      upload_bits_per_second=np.array([2.5e5, 1e6, 2e6])[:n],
      memory_bytes=np.array(memory, np.float64),
      device_class=np.arange(n) % 2,
      class_names=('a', 'b'),
      availability=availability or devices.AlwaysAvailable(n))


def one_line_error(fn, match):
  with pytest.raises(ValueError, match=match) as e:
    fn()
  assert '\n' not in str(e.value)


# --- simulated time ---------------------------------------------------------


def test_client_seconds_is_the_formula():
  p = hand_profiles()
  # 2e6/1e6 + 3e9/1e9 + 5e5/2.5e5 = 2 + 3 + 2; 2e6/2e6 + 3e9/2e9 + 5e5/1e6;
  # 2e6/8e6 + 3e9/4e9 + 5e5/2e6.
  s = devices.client_seconds(p, None, download_bits=2e6, upload_bits=5e5,
                             flops=3e9)
  np.testing.assert_array_equal(s, [7.0, 3.0, 1.25])
  # Per-client costs (one per tier) and a subset with repeats.
  s = devices.client_seconds(p, [2, 0, 2], download_bits=[8e6, 1e6, 0.0],
                             upload_bits=[2e6, 0.0, 4e6], flops=[4e9, 1e9, 0])
  np.testing.assert_array_equal(s, [1.0 + 1.0 + 1.0, 1.0 + 1.0, 2.0])


def test_jitter_zero_is_exact_and_positive_jitter_has_median_one():
  p = hand_profiles()
  kw = dict(download_bits=2e6, upload_bits=5e5, flops=3e9)
  exact = devices.client_seconds(p, [0], **kw)
  again = devices.client_seconds(p, [0], jitter=0.0,
                                 rng=np.random.default_rng(1), **kw)
  np.testing.assert_array_equal(exact, again)
  ids = np.zeros(40001, np.int64)
  s = devices.client_seconds(p, ids, jitter=0.5,
                             rng=np.random.default_rng(7), **kw)
  log_ratio = np.log(s / exact[0])
  assert abs(np.median(log_ratio)) < 0.02  # median of the factor is 1
  assert abs(np.std(log_ratio) - 0.5) < 0.02
  one_line_error(lambda: devices.client_seconds(p, [0], jitter=0.1, **kw),
                 'needs rng')
  one_line_error(lambda: devices.client_seconds(
      p, [0], download_bits=-1.0, upload_bits=0, flops=0), 'download_bits')


def test_over_selection_aggregates_exactly_the_first_k_finishers():
  seconds = np.array([5.0, 1.0, 4.0, 2.0, 3.0])
  plan = devices.plan_round(seconds, target=3, ids=np.array([10, 11, 12, 13,
                                                             14]))
  np.testing.assert_array_equal(plan.aggregated,
                                [False, True, False, True, True])
  assert plan.round_seconds == 3.0  # the K-th finisher closes the round
  assert not plan.late.any() and not plan.failed.any()
  np.testing.assert_array_equal(plan.ids, [10, 11, 12, 13, 14])
  # Ties go to the earlier position.
  plan = devices.plan_round(np.array([2.0, 1.0, 2.0, 2.0]), target=2)
  np.testing.assert_array_equal(plan.aggregated, [True, True, False, False])
  assert plan.round_seconds == 2.0


def test_deadline_drops_exactly_the_late_clients():
  seconds = np.array([5.0, 1.0, 4.0, 2.0, 3.5])
  plan = devices.plan_round(seconds, target=3, deadline=3.5)
  np.testing.assert_array_equal(plan.late, [True, False, True, False, False])
  # Finishing exactly at the deadline is in time.
  np.testing.assert_array_equal(plan.aggregated,
                                [False, True, False, True, True])
  assert plan.round_seconds == 3.5
  # Fewer than the target by the deadline: the round lasts the deadline.
  plan = devices.plan_round(seconds, target=4, deadline=4.5)
  assert plan.num_aggregated == 4 and plan.round_seconds == 4.0
  plan = devices.plan_round(seconds, target=5, deadline=4.5)
  assert plan.num_aggregated == 4 and plan.round_seconds == 4.5
  np.testing.assert_array_equal(plan.late, [True, False, False, False, False])


def test_round_duration_rules_with_failures():
  seconds = np.array([1.0, 2.0, 3.0, 4.0])
  failed = np.array([False, True, False, False])
  plan = devices.plan_round(seconds, target=3, failed=failed)
  np.testing.assert_array_equal(plan.aggregated, [True, False, True, True])
  np.testing.assert_array_equal(plan.seconds, [1.0, np.inf, 3.0, 4.0])
  assert plan.round_seconds == 4.0
  # Fewer than the target, no deadline: the last aggregated client.
  plan = devices.plan_round(seconds, target=4, failed=[False, True, False,
                                                       True])
  assert plan.num_aggregated == 2 and plan.round_seconds == 3.0
  # An infinite time is a failure.
  plan = devices.plan_round(np.array([np.inf, 2.0]), target=2)
  np.testing.assert_array_equal(plan.failed, [True, False])
  assert plan.round_seconds == 2.0
  # Nobody aggregated: the deadline if any; else the longest finite time
  # given for a failed client; else 0.
  everyone = np.ones(4, bool)
  assert devices.plan_round(seconds, target=2, failed=everyone,
                            deadline=9.0).round_seconds == 9.0
  assert devices.plan_round(seconds, target=2,
                            failed=everyone).round_seconds == 4.0
  assert devices.plan_round(np.full(3, np.inf),
                            target=2).round_seconds == 0.0
  # Late and failed are disjoint.
  plan = devices.plan_round(np.array([9.0, 9.0]), target=1, deadline=5.0,
                            failed=[True, False])
  np.testing.assert_array_equal(plan.late, [False, True])
  np.testing.assert_array_equal(plan.failed, [True, False])
  one_line_error(lambda: devices.plan_round(seconds, target=0), 'target')


def test_draw_failures():
  f = devices.draw_failures(np.random.default_rng(0), 20000, 0.1)
  assert f.shape == (20000,) and abs(f.mean() - 0.1) < 0.01
  assert not devices.draw_failures(np.random.default_rng(0), 5, 0.0).any()
  assert devices.draw_failures(np.random.default_rng(0), 5, 1.0).all()
  one_line_error(lambda: devices.draw_failures(np.random.default_rng(0), 5,
                                               1.5), 'probability')


def test_tier_by_memory_and_fits_in_memory():
  p = hand_profiles(memory=(100.0, 250.0, 1000.0))
  np.testing.assert_array_equal(
      devices.tier_by_memory(p, [100.0, 200.0, 500.0]), [0, 1, 2])
  np.testing.assert_array_equal(
      devices.tier_by_memory(p, [150.0, 300.0]), [-1, 0, 1])
  np.testing.assert_array_equal(
      devices.tier_by_memory(p, [300.0, 300.0], ids=[2, 1]), [1, -1])
  np.testing.assert_array_equal(devices.fits_in_memory(p, None, 250.0),
                                [False, True, True])
  np.testing.assert_array_equal(
      devices.fits_in_memory(p, [0, 1], [100.0, 251.0]), [True, False])
  one_line_error(lambda: devices.tier_by_memory(p, [300.0, 100.0]),
                 'ordered')


# --- availability -----------------------------------------------------------


def test_diurnal_client_is_offline_outside_its_window():
  # Client 0: 22:00 for 8 h (wraps midnight); client 1: all day.
  a = devices.DiurnalAvailability(np.array([22 * HOUR, 5 * HOUR]),
                                  np.array([8 * HOUR, 24 * HOUR]))
  day = 86400.0
  for t, expect in ((23 * HOUR, True), (day + 5 * HOUR, True),
                    (6 * HOUR, False), (21.9 * HOUR, False),
                    (22 * HOUR, True)):
    assert bool(a.available(0, t)) is expect, t
  assert a.online_until(0, 23 * HOUR) == 30 * HOUR
  assert a.online_until(0, 12 * HOUR) == 12 * HOUR
  assert a.online_until(1, 3.0) == np.inf
  np.testing.assert_array_equal(a.available(None, 12 * HOUR), [False, True])
  # The parametric model against its own definition, many clients and times.
  d = devices.diurnal(500, seed=3)
  t = np.array([0.0, 4 * HOUR, 12 * HOUR, 20 * HOUR, 50 * HOUR])[:, None]
  phase = np.mod(t - d.start_seconds, day)
  np.testing.assert_array_equal(d.available(np.arange(500)[None], t),
                                phase < d.length_seconds)
  # Mostly online at 03:00, mostly offline at 15:00.
  assert d.available(None, 3 * HOUR).mean() > 0.8
  assert d.available(None, 15 * HOUR).mean() < 0.05


def test_trace_intervals_and_online_until():
  a = devices.TraceAvailability.from_intervals(
      [[(30, 40), (10, 20)],  # any order
       [(0, 10), (40, 50)],  # wraps across the period's end
       [(0, 50)],  # the whole period
       [(5, 8), (7, 12)]],  # overlapping: merged; no period
      period=[50, 50, 50, np.inf])
  np.testing.assert_array_equal(a.intervals(0), [[10, 20], [30, 40]])
  np.testing.assert_array_equal(a.intervals(3), [[5, 12]])
  assert a.available(0, 15.0) and not a.available(0, 25.0)
  assert a.available(0, 10.0) and not a.available(0, 20.0)  # [start, end)
  assert a.online_until(0, 15.0) == 20.0
  assert a.online_until(0, 25.0) == 25.0
  assert a.online_until(0, 65.0) == 70.0  # repeats: 65 -> 15
  assert a.online_until(1, 45.0) == 60.0  # 45..50, then 50..60
  assert a.online_until(1, 5.0) == 10.0
  assert a.online_until(2, 123.0) == np.inf
  assert a.available(3, 11.0) and not a.available(3, 61.0)  # played once
  assert not a.available(3, -1.0)
  np.testing.assert_array_equal(
      a.available([0, 1, 2, 3], 35.0), [True, False, True, False])
  np.testing.assert_array_equal(a.online_until(None, 5.0),
                                [5.0, 10.0, np.inf, 12.0])
  sub = a.subset([3, 0])
  assert sub.num_clients == 2 and sub.online_until(1, 15.0) == 20.0
  one_line_error(lambda: devices.TraceAvailability(
      np.array([5.0]), np.array([1.0]), np.array([0, 1]), np.zeros(1),
      np.full(1, np.inf)), 'start < end')


def test_vectorised_trace_lookup_matches_a_loop():
  rng = np.random.default_rng(0)
  intervals, periods = [], []
  for _ in range(60):
    period = 1000.0
    edges = np.sort(rng.choice(1000, size=2 * rng.integers(0, 6),
                               replace=False)).astype(float)
    intervals.append(edges.reshape(-1, 2))
    periods.append(period if rng.random() < 0.7 else np.inf)
  a = devices.TraceAvailability.from_intervals(intervals, periods)
  ids = rng.integers(0, 60, 3000)
  t = rng.uniform(-500, 3000, 3000)
  got = a.available(ids, t)
  until = a.online_until(ids, t)
  for i, ti, g, u in zip(ids, t, got, until):
    tau = np.mod(ti, periods[i]) if np.isfinite(periods[i]) else ti
    hits = [e for s, e in intervals[i] if s <= tau < e]
    assert g == bool(hits)
    if hits and not (np.isfinite(periods[i]) and hits[0] == 1000.0):
      assert u == pytest.approx(ti + hits[0] - tau)
    elif not hits:
      assert u == ti


def test_offline_before_finish():
  a = devices.TraceAvailability.from_intervals([[(0, 100)], [(50, 60)]])
  np.testing.assert_array_equal(
      devices.offline_before_finish(a, [0, 1], 10.0, [50.0, 1.0]),
      [False, True])  # client 1 is offline at 10
  np.testing.assert_array_equal(
      devices.offline_before_finish(a, [0, 0], 10.0, [90.0, 90.5]),
      [False, True])


# --- profiles ---------------------------------------------------------------


def test_profiles_derive_stably_from_seed_and_client():
  a = devices.parametric(50, seed=4, availability='diurnal')
  b = devices.parametric(60, seed=4, availability='diurnal')
  c = devices.parametric(10, seed=4, availability='diurnal', first_id=40)
  for field in ('flops_per_second', 'download_bits_per_second',
                'upload_bits_per_second', 'memory_bytes', 'device_class'):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field)[:50])
    np.testing.assert_array_equal(getattr(c, field), getattr(a, field)[40:])
  np.testing.assert_array_equal(a.availability.start_seconds,
                                b.availability.start_seconds[:50])
  assert not np.array_equal(
      a.flops_per_second, devices.parametric(50, seed=5).flops_per_second)
  u = devices.client_uniforms(1, 'x', np.arange(5))
  np.testing.assert_array_equal(u[[3, 1]],
                                devices.client_uniforms(1, 'x', [3, 1]))
  sub = b.subset([7, 2])
  assert len(sub) == 2 and sub.flops_per_second[0] == b.flops_per_second[7]
  np.testing.assert_array_equal(sub.availability.start_seconds,
                                b.availability.start_seconds[[7, 2]])


def test_parametric_population_follows_its_classes():
  p = devices.parametric(20000, seed=0)
  assert len(p) == 20000 and isinstance(p.availability,
                                        devices.AlwaysAvailable)
  for k, cls in enumerate(devices.DEFAULT_CLASSES):
    mine = p.device_class == k
    assert abs(mine.mean() - cls.fraction) < 0.015, cls.name
    ratio = np.median(p.flops_per_second[mine]) / cls.flops_per_second
    assert abs(np.log(ratio)) < 0.1, cls.name
    ratio = np.median(p.upload_bits_per_second[mine]) / (
        cls.upload_bits_per_second)
    assert abs(np.log(ratio)) < 0.15, cls.name
  z = devices.client_normals(0, 'z', np.arange(20000))
  assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03


def test_uniform_population_and_unbound_always_available():
  p = devices.uniform(4, availability=devices.AlwaysAvailable())
  mid = devices.DEFAULT_CLASSES[1]
  assert (p.flops_per_second == mid.flops_per_second).all()
  assert (p.memory_bytes == mid.memory_bytes).all()
  assert p.class_names == (mid.name,) and p.availability.num_clients == 4
  np.testing.assert_array_equal(p.availability.available(None, 5.0),
                                [True] * 4)
  q = devices.parametric(3, 0, availability=devices.AlwaysAvailable())
  assert q.availability.num_clients == 3
  assert devices.AlwaysAvailable().online_until(7, 1.0) == np.inf
  one_line_error(lambda: devices.AlwaysAvailable().available(None, 0.0),
                 'explicit ids')
  d = devices.uniform(5, 'diurnal', seed=1)
  np.testing.assert_array_equal(d.availability.start_seconds,
                                devices.diurnal(5, 1).start_seconds)


def test_bad_profiles_are_one_line_errors():
  one_line_error(lambda: devices.DeviceProfiles(
      np.ones(2), np.array([1.0, -1.0]), np.ones(2), np.ones(2),
      np.zeros(2, int), ('a',), devices.AlwaysAvailable(2)),
                 'download_bits_per_second must be positive')
  one_line_error(lambda: devices.DeviceProfiles(
      np.ones(2), np.ones(2), np.ones(2), np.ones(2), np.zeros(2, int),
      ('a',), devices.AlwaysAvailable(3)), 'availability describes 3')
  one_line_error(lambda: devices.DeviceProfiles(
      np.ones(2), np.ones(2), np.ones(2), np.ones(2), np.array([0, 1]),
      ('a',), devices.AlwaysAvailable(2)), 'class_names')
  one_line_error(lambda: devices.parametric(3, 0, availability='sometimes'),
                 'availability')
  one_line_error(lambda: devices.parametric(3, 0, classes=(
      devices.DeviceClass('x', 0.5, 1e9, 1e6, 1e6, 1e9),)), 'fractions')
  one_line_error(lambda: hand_profiles().subset([5]), r'\[0, 3\)')


# --- traces -----------------------------------------------------------------


def write_pickle(path, obj):
  with open(path, 'wb') as f:
    pickle.dump(obj, f)
  return path


def test_fedscale_capacity(tmp_path):
  path = write_pickle(tmp_path / 'client_device_capacity', {
      1: {'computation': 162.0, 'communication': 5648.0},
      2: {'computation': np.float64(50.0), 'communication': 20000.0},
      3: {'computation': 600.0, 'communication': 1000.0},
  })
  table = devices.load_fedscale_capacity(path)
  assert table[1] == {'computation': 162.0, 'communication': 5648.0}
  p = devices.profiles_from_fedscale(path, 5, seed=2, memory_bytes=1e9)
  rows = traces.assign_rows(3, 5, 2, 'fedscale_capacity')
  assert sorted(rows[:3]) == [0, 1, 2]  # distinct while N <= R
  np.testing.assert_array_equal(rows[3:], rows[:2])  # then cycles
  comp = np.array([162.0, 50.0, 600.0])[rows]
  comm = np.array([5648.0, 20000.0, 1000.0])[rows]
  np.testing.assert_allclose(p.flops_per_second, 6e8 / (comp / 1000.0),
                             rtol=1e-15)
  np.testing.assert_array_equal(p.download_bits_per_second, comm * 1000.0)
  np.testing.assert_array_equal(p.upload_bits_per_second, comm * 1000.0)
  assert p.class_names == ('fedscale',) and (p.memory_bytes == 1e9).all()
  # A program of 3x the reference's forward FLOPs per sample takes
  # FedScale's 3 x computation / 1000 seconds per sample.
  s = devices.client_seconds(p, None, download_bits=0, upload_bits=0,
                             flops=3 * 6e8)
  np.testing.assert_allclose(s, 3 * comp / 1000.0, rtol=1e-12)
  # Stable rows: the first clients keep theirs in a smaller population.
  q = devices.profiles_from_fedscale(path, 2, seed=2)
  np.testing.assert_array_equal(q.flops_per_second, p.flops_per_second[:2])
  assert q.class_names == tuple(c.name for c in devices.DEFAULT_CLASSES)


# Row 3834 of FedScale's client_behave_trace, as quoted in ahmedcs/REFL
# (core/helper/client.py); 'duration' is the total online time.
FEDSCALE_ROW_3834 = {
    'duration': 211625,
    'inactive': [65881, 133574, 208292, 276575, 295006, 356236, 400906,
                 475099],
    'finish_time': 518400,
    'active': [12788, 100044, 188992, 271372, 276663, 352625, 356267,
               441193],
    'model': 'CPH1801'}


def test_fedscale_behaviour(tmp_path):
  path = write_pickle(tmp_path / 'client_behave_trace', {
      3834: FEDSCALE_ROW_3834,
      7: {'duration': 150, 'inactive': [50, 150], 'finish_time': 200,
          'active': [0, 100], 'model': 'SM-G960F'},
  })
  a = devices.load_fedscale_behaviour(path)
  assert a.names == (7, 3834)  # sorted keys
  assert a.available(0, 210.0) and a.online_until(0, 210.0) == 250.0
  assert not a.available(0, 60.0) and a.available(0, 120.0)
  assert a.online_until(0, 120.0) == 150.0 and a.online_until(0, 155.0) == 155
  real = a.intervals(1)
  assert (real[:, 1] - real[:, 0]).sum() == FEDSCALE_ROW_3834['duration']
  assert a.period[1] == 518400
  assert a.available(1, 12788.0) and not a.available(1, 65881.0)
  assert a.online_until(1, 518400.0 + 13000.0) == 518400.0 + 65881.0
  big = devices.load_availability(path, 'fedscale', num_clients=5, seed=1)
  assert big.num_clients == 5 and set(big.names) == {7, 3834}


def test_flash_state_traces_and_cached_timers(tmp_path):
  lines = [
      '2020-01-02 01:00:00\tbattery_charged_on',
      '2020-01-02 01:00:10\twifi',
      '2020-01-02 01:00:20\tscreen_lock',  # ready from 3620
      '2020-01-02 01:10:00\t80%',
      '2020-01-02 01:30:00\t4g',  # not ready from 5400
      '2020-01-02 02:00:00\twifi',  # ready again from 7200
      '2020-01-02 02:00:30\tscreen_unlock',  # until 7230
      '2020-01-02 03:00:00\tscreen_lock',  # ready, never closed: dropped
  ]
  state = {
      'u1': {'guid': 'g1', 'model': 'Redmi Note 8',
             'messages': '\n'.join(lines) + '\n'},
      'u0': {'guid': 'g0', 'model': 'x',  # never ready: invalid, dropped
             'messages': '2020-01-02 01:00:00\twifi\n'
                         '2020-01-02 02:00:00\tscreen_lock\n'},
      'u2': {'guid': 'g2', 'model': 'x', 'messages': 'no tab here\n'},
  }
  path = tmp_path / 'state_traces.json'
  path.write_text(json.dumps(state))
  a = devices.load_flash_availability(path)
  assert a.names == ('u1',)
  np.testing.assert_array_equal(a.intervals(0), [[3620, 5400], [7200, 7230]])
  assert a.origin[0] == 3600 and a.period[0] == 10800 - 3600
  assert a.available(0, 4000.0) and not a.available(0, 6000.0)
  assert a.available(0, 4000.0 + 7200)  # repeats every 7200 s
  assert a.online_until(0, 4000.0 + 7200) == 5400.0 + 7200
  # FLASH's own cache of parsed traces: per-client lists of intervals.
  cached = {'g1': {'isSuccess': True, 'trace_start': 0.0,
                   'trace_end': 100.0, 'ready_time': [[10, 20], [50, 60]]},
            'g2': {'isSuccess': False, 'trace_start': None,
                   'trace_end': None, 'ready_time': []}}
  path = tmp_path / 'cached_timers.json'
  path.write_text(json.dumps(cached))
  b = devices.load_availability(path, 'flash', num_clients=3, seed=0)
  assert b.num_clients == 3 and b.names == ('g1',) * 3
  assert b.available(2, 115.0) and b.online_until(2, 115.0) == 120.0
  bad = tmp_path / 'bad.json'
  bad.write_text(json.dumps({'u': {'messages': '2020-01-02 01:00:00\tfly'}}))
  one_line_error(lambda: devices.load_flash_availability(bad),
                 "unknown FLASH state 'fly'")


def test_trace_format_errors_are_one_line(tmp_path):
  one_line_error(lambda: devices.load_availability('x', 'leaf'),
                 'unknown availability trace format')
  path = write_pickle(tmp_path / 'cap', {1: {'computation': 10.0}})
  one_line_error(lambda: devices.load_fedscale_capacity(path),
                 "lacks 'communication'")
  path = write_pickle(tmp_path / 'cap2', {1: {'computation': 10.0,
                                              'communication': -3}})
  one_line_error(lambda: devices.load_fedscale_capacity(path), '> 0')
  path = write_pickle(tmp_path / 'beh', {1: {'active': [0], 'inactive': [5]}})
  one_line_error(lambda: devices.load_fedscale_behaviour(path),
                 "lacks 'finish_time'")
  path = tmp_path / 'flash.json'
  path.write_text(json.dumps({'u': {'guid': 'g'}}))
  one_line_error(lambda: devices.load_flash_availability(path),
                 "lacks 'messages'")
  path.write_text('{not json')
  one_line_error(lambda: devices.load_flash_availability(path), 'not a FLASH')
  # Pickles naming anything beyond containers and numbers are refused.
  path = write_pickle(tmp_path / 'evil', {1: datetime.date(2020, 1, 2)})
  one_line_error(lambda: devices.load_fedscale_capacity(path), 'refusing')
  path = tmp_path / 'text'
  path.write_text('hello')
  one_line_error(lambda: devices.load_fedscale_behaviour(path),
                 'not a FedScale')


def test_package_is_numpy_only():
  import ast  # pylint: disable=g-import-not-at-top
  folder = os.path.dirname(profiles_lib.__file__)
  for name in ('profiles.py', 'traces.py', 'timing.py', '__init__.py'):
    with open(os.path.join(folder, name)) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ''])
        for mod in mods:
          assert not mod.startswith(('jax', 'flax', 'optax')), (name, mod)
  assert timing.plan_round is devices.plan_round
