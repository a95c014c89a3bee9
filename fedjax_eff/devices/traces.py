r"""Device and availability traces of FedScale and FLASH.

FedScale (Lai et al. 2022, "FedScale: benchmarking model and system
performance of federated learning at scale"; repository SymbioticLab/FedScale)
ships two pickled dicts keyed by client id, described in
`benchmark/dataset/data/device_info/README.md`:

  client_device_capacity   {client_id: {'computation': float,
                                        'communication': float}}
  client_behave_trace      {client_id: {'duration': int, 'inactive': [int],
                                        'finish_time': int, 'active': [int],
                                        'model': str}}

Units, from the code that reads them:

* 'computation' is ms per sample of *inference*
  (`fedscale/cloud/internal/client_metadata.py`, `get_completion_time`:
  "compute_speed is the inference latency of models (ms/sample)"; training
  time there is 3 x batch_size x local_steps x computation / 1000 s, the 3
  for forward + backward). FedScale does not say which model the times are
  for. To turn it into FLOP/s we need the FLOPs of one inference of that
  model: `reference_flops_per_sample`, by default 6e8 (MobileNet-V2 at
  224x224, 300M multiply-adds, Sandler et al. 2018: a model AI Benchmark
  times, and the kind FedScale's image tasks train; our choice, since
  FedScale does not name the model). Then
  flops_per_second = reference_flops_per_sample / (computation / 1000), and
  a program of F training FLOPs takes F / flops_per_second, which equals
  FedScale's 3 x computation/1000 per sample when F is 3x the reference's
  forward FLOPs. This is an assumption: change the reference to match.
* 'communication' is kbit/s: FedScale's aggregator sizes the model as
  `sys.getsizeof(pickle.dumps(model)) / 1024.0 * 8.` "kbits"
  (`fedscale/cloud/aggregation/aggregator.py`) and divides
  (upload + download) kbits by it (`get_completion_time`). We take
  bits/s = communication x `bits_per_kbit` (1000, SI, as network
  measurements such as MobiPerf report; FedScale's sizes use 1024, 2.4 %
  apart). The trace has one number; it serves download and upload alike,
  as in FedScale.
* the behaviour trace: a client is active at simulation time t iff
  active[i] <= t mod finish_time <= inactive[i] for some i
  (`client_metadata.py`, `is_active`; `fedscale/cloud/client_manager.py`
  assigns row `keys[client_id % len(trace)]`). So the times are seconds,
  [active[i], inactive[i]] are online intervals and finish_time is the
  trace's period. FedScale's code reads neither 'duration' nor 'model'; nor
  do we (beyond keeping the row key). We use half-open [active, inactive)
  intervals, which differ only on a set of measure zero.

Where the traces come from (`benchmark/dataset/README.md`, "Environment
datasets"): compute speeds from AI Benchmark ("the computation capacity of
different models across a wide range of devices", devices with > 2 GB RAM),
bandwidths from MobiPerf on WiFi; availability from FLASH's 136k-user trace
(one week, 2020-01-31 to 02-06), a device counting as available while
charging. A fork of FedScale (ahmedcs/REFL, `core/helper/client.py`) quotes
one row of each file and their sizes: capacity row 432802 =
{'computation': 162.0, 'communication': 5648.1} (500,000 rows); behaviour
row 3834 = {'duration': 211625, 'inactive': [65881, ..., 475099],
'finish_time': 518400, 'active': [12788, ..., 441193], 'model': 'CPH1801'}
(107,749 rows). In that row 'duration' is the total online time,
sum(inactive - active), and finish_time is 6 days; the tests use it.

FLASH (Yang et al. 2021, "Characterizing impacts of heterogeneity in
federated learning upon large-scale smartphone data"; repository
PKU-Chengxu/FLASH) reads `data/state_traces.json` (`models/client.py`):
a JSON dict {uid: {'guid': str, 'model': str, 'messages': str}} where
'messages' holds lines "YYYY-mm-dd HH:MM:SS<TAB>state" (`models/timer.py`,
`Timer.__init__`). The states are battery_charged_on/off, wifi, unknown /
2g / 3g / 4g / 5g (not WiFi), screen_on/off, screen_lock/unlock and battery
levels "NN%". A device is ready (Google's rule: idle, charging, on WiFi)
while screen-locked and on WiFi and charging; each ready stretch is an
online interval [st, ed), ends at the first message that leaves the ready
state (a stretch still open at the trace's end is dropped), and overlapping
stretches merge. Times are seconds after the reference time 2020-01-02
00:00:00 (FLASH uses `time.mktime`, i.e. the machine's local time zone; we
take naive wall-clock differences, the same except across a DST change).
The trace repeats with period trace_end - trace_start from its first
timestamp: `Timer.ready` maps t to (t - trace_start) mod (trace_end -
trace_start) + trace_start. FLASH marks a trace invalid (`isSuccess`
False: a line that does not split into time and state or whose time does
not parse, no ready stretch, zero length) and draws another user instead;
we drop such rows. An unknown state stops FLASH (`assert False`); here it
is a ValueError. FLASH also caches parsed traces as `cached_timers.json`,
{guid: {'isSuccess': bool, 'trace_start': s, 'trace_end': s,
'ready_time': [[st, ed], ...]}}: `load_flash_availability` reads that form
too (it is a per-client list of online intervals). The full 136k-user
trace is not in the repository; FLASH's README says the shipped
`state_traces.json` samples 1,000 devices of it. (That file is over 4 MiB
and was not read for this module: the format above is the one FLASH's
parser accepts.)

Rows to clients: when a population is bigger or smaller than a trace, client
c gets row perm[c mod R] (R rows in sorted key order, perm a permutation
drawn from the seed): distinct rows while N <= R, cycling beyond, and the
same row for c whatever N is. FedScale assigns keys[c mod R]; FLASH draws a
random user per client.

Pickles run code when loaded; `load_fedscale_capacity` and
`load_fedscale_behaviour` unpickle with an allow-list (builtin containers
and numbers, NumPy scalars and arrays) and refuse anything else.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import pickle
from typing import Any, Mapping
import zlib

import numpy as np

from fedjax_eff.devices import profiles as profiles_lib

FLASH_REFERENCE_TIME = '2020-01-02 00:00:00'
FLASH_TIME_FORMAT = '%Y-%m-%d %H:%M:%S'
# MobileNet-V2 (224x224): 300M multiply-adds = 6e8 FLOPs per inference.
MOBILENET_V2_FLOPS = 6e8

_PICKLE_ALLOWED = {
    ('builtins', 'dict'), ('builtins', 'list'), ('builtins', 'tuple'),
    ('builtins', 'set'), ('builtins', 'frozenset'), ('builtins', 'int'),
    ('builtins', 'float'), ('builtins', 'str'), ('builtins', 'bytes'),
    ('builtins', 'bool'), ('collections', 'OrderedDict'),
    ('numpy', 'dtype'), ('numpy', 'ndarray'),
    ('numpy.core.multiarray', 'scalar'),
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', 'scalar'),
    ('numpy._core.multiarray', '_reconstruct'),
}


class _SafeUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    if (module, name) not in _PICKLE_ALLOWED:
      raise pickle.UnpicklingError(f'refusing to load {module}.{name}')
    return super().find_class(module, name)


def _load_pickle(path) -> Any:
  with open(path, 'rb') as f:
    data = f.read()
  try:
    return _SafeUnpickler(io.BytesIO(data)).load()
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: not a FedScale trace pickle ({e})') from None


def _source(trace, what: str) -> tuple[Mapping, str]:
  """A trace given as a path (pickle or JSON by content) or a dict."""
  if isinstance(trace, Mapping):
    return trace, what
  path = os.fspath(trace)
  if what == 'FLASH':
    try:
      with open(path, encoding='utf-8') as f:
        data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f'{path}: not a FLASH JSON trace ({e})') from None
  else:
    data = _load_pickle(path)
  if not isinstance(data, Mapping):
    raise ValueError(f'{path}: a {what} trace is a dict keyed by client, '
                     f'got {type(data).__name__}')
  return data, path


def _sorted_keys(trace: Mapping) -> list:
  try:
    return sorted(trace)
  except TypeError:
    return sorted(trace, key=repr)


def assign_rows(num_rows: int, num_clients: int, seed: int,
                tag: str = 'trace_rows') -> np.ndarray:
  """[N] row of each client: perm[c mod R], perm drawn from (seed, tag).

  Client c's row depends on (seed, tag, R, c) only, not on N; rows are
  distinct while N <= R."""
  if num_rows < 1:
    raise ValueError('a trace needs at least one usable row')
  rng = np.random.default_rng([int(seed), zlib.crc32(tag.encode())])
  perm = rng.permutation(num_rows)
  return perm[np.arange(num_clients) % num_rows]


def _number(row, field, key, where) -> float:
  if not isinstance(row, Mapping) or field not in row:
    raise ValueError(f'{where}: client {key!r} lacks {field!r}')
  try:
    value = float(row[field])
  except (TypeError, ValueError):
    raise ValueError(f'{where}: client {key!r} has non-numeric {field!r}: '
                     f'{row[field]!r}') from None
  if not math.isfinite(value):
    raise ValueError(f'{where}: client {key!r} has {field}={value}')
  return value


# ---------------------------------------------------------------------------
# FedScale.


def load_fedscale_capacity(trace) -> dict:
  """FedScale's `client_device_capacity`: {client: {'computation': ms per
  sample of inference, 'communication': kbit/s}}, checked (both present,
  finite, > 0). `trace`: path to the pickle, or the dict."""
  data, where = _source(trace, 'FedScale capacity')
  out = {}
  for key in _sorted_keys(data):
    row = data[key]
    comp = _number(row, 'computation', key, where)
    comm = _number(row, 'communication', key, where)
    if comp <= 0 or comm <= 0:
      raise ValueError(f'{where}: client {key!r} needs computation and '
                       f'communication > 0, got {comp}, {comm}')
    out[key] = {'computation': comp, 'communication': comm}
  if not out:
    raise ValueError(f'{where}: the capacity trace is empty')
  return out


def profiles_from_fedscale(capacity, num_clients: int, seed: int, *,
                           reference_flops_per_sample: float =
                           MOBILENET_V2_FLOPS,
                           bits_per_kbit: float = 1000.0, memory_bytes=None,
                           availability='always'
                           ) -> profiles_lib.DeviceProfiles:
  r"""Profiles whose speeds come from FedScale's capacity trace.

      flops_per_second = reference_flops_per_sample / (computation / 1000)
      download = upload = communication * bits_per_kbit   [bit/s]

  (units and the reference: module docstring). The trace has neither
  memory nor a device class: with `memory_bytes=None` both come from
  `profiles.parametric(num_clients, seed)` (drawn independently of the
  trace's speeds); a scalar or [N] `memory_bytes` puts every client in one
  class 'fedscale'.

  Args:
    capacity: path to `client_device_capacity`, or the loaded dict.
    num_clients: N; client c gets trace row `assign_rows(...)[c]`.
    seed: seed of the row assignment (and of memory, if drawn).
    reference_flops_per_sample: FLOPs of one inference of the model the
      trace's times were measured for.
    bits_per_kbit: 1000 (SI) or 1024.
    memory_bytes: None, scalar or [N].
    availability: 'always', 'diurnal', or an `Availability` of N clients
      (e.g. `load_fedscale_behaviour(path, num_clients, seed)`).
  """
  if not reference_flops_per_sample > 0 or not bits_per_kbit > 0:
    raise ValueError('reference_flops_per_sample and bits_per_kbit must be '
                     'positive')
  table = load_fedscale_capacity(capacity)
  keys = list(table)
  rows = assign_rows(len(keys), num_clients, seed, 'fedscale_capacity')
  comp = np.asarray([table[keys[r]]['computation'] for r in rows], np.float64)
  comm = np.asarray([table[keys[r]]['communication'] for r in rows],
                    np.float64)
  base = profiles_lib.parametric(num_clients, seed, availability=availability)
  if memory_bytes is None:
    memory, device_class, names = (base.memory_bytes, base.device_class,
                                   base.class_names)
  else:
    memory = np.broadcast_to(np.asarray(memory_bytes, np.float64),
                             (num_clients,))
    device_class = np.zeros(num_clients, np.int64)
    names = ('fedscale',)
  bps = comm.reshape(-1) * bits_per_kbit
  return profiles_lib.DeviceProfiles(
      flops_per_second=reference_flops_per_sample / (comp.reshape(-1) / 1e3),
      download_bits_per_second=bps, upload_bits_per_second=bps.copy(),
      memory_bytes=memory, device_class=device_class, class_names=names,
      availability=base.availability)


def load_fedscale_behaviour(trace, num_clients: int | None = None,
                            seed: int = 0) -> profiles_lib.TraceAvailability:
  """FedScale's `client_behave_trace` as `TraceAvailability`.

  Client intervals [active[i], inactive[i]) in seconds, repeating with
  period finish_time from 0 (module docstring). Required fields: 'active',
  'inactive' (lists of one length), 'finish_time' (> 0).

  Args:
    trace: path to the pickle, or the dict.
    num_clients: None = one client per row, in sorted key order; else N
      clients assigned rows by `assign_rows`.
    seed: seed of the row assignment.
  """
  data, where = _source(trace, 'FedScale behaviour')
  keys = _sorted_keys(data)
  intervals, periods = [], []
  for key in keys:
    row = data[key]
    for field in ('active', 'inactive'):
      if not isinstance(row, Mapping) or field not in row:
        raise ValueError(f'{where}: client {key!r} lacks {field!r}')
    period = _number(row, 'finish_time', key, where)
    active = np.asarray(row['active'], np.float64).reshape(-1)
    inactive = np.asarray(row['inactive'], np.float64).reshape(-1)
    if active.shape != inactive.shape:
      raise ValueError(f"{where}: client {key!r} has {len(active)} 'active' "
                       f"and {len(inactive)} 'inactive' times")
    if period <= 0:
      raise ValueError(f"{where}: client {key!r} has finish_time {period}")
    if np.any(inactive < active):
      raise ValueError(f'{where}: client {key!r} has an interval ending '
                       'before it starts')
    intervals.append(np.stack([active, inactive], -1))
    periods.append(period)
  if not keys:
    raise ValueError(f'{where}: the behaviour trace is empty')
  if num_clients is not None:
    rows = assign_rows(len(keys), num_clients, seed, 'fedscale_behaviour')
  else:
    rows = np.arange(len(keys))
  return profiles_lib.TraceAvailability.from_intervals(
      [intervals[r] for r in rows], np.asarray(periods)[rows], 0.0,
      tuple(keys[r] for r in rows))


# ---------------------------------------------------------------------------
# FLASH.

_FLASH_NOT_WIFI = ('unknown', '2g', '3g', '4g', '5g')


def parse_flash_messages(messages: str, reference_time: str =
                         FLASH_REFERENCE_TIME):
  r"""One FLASH state trace -> (intervals [k, 2], trace_start, trace_end).

  Follows `models/timer.py` (`Timer.__init__`) of PKU-Chengxu/FLASH: ready
  = screen_lock and wifi and battery_charged_on; times in seconds after
  `reference_time`. Returns None where FLASH marks the trace invalid (a
  line that does not split into time<TAB>state or whose time does not
  parse, no ready interval, zero length). Raises ValueError on an unknown
  state (FLASH asserts).
  """
  ref = datetime.datetime.strptime(reference_time, FLASH_TIME_FORMAT)
  charged = wifi = locked = False
  start = None
  ready, stamps = [], []
  for line in messages.split('\n'):
    if not line.strip():
      continue
    parts = line.strip().split('\t')
    if len(parts) != 2:
      return None
    try:
      when = (datetime.datetime.strptime(parts[0].strip(), FLASH_TIME_FORMAT)
              - ref).total_seconds()
    except ValueError:
      return None
    state = parts[1].strip().lower()
    if state == 'battery_charged_on':
      charged = True
    elif state == 'battery_charged_off':
      charged = False
    elif state == 'wifi':
      wifi = True
    elif state in _FLASH_NOT_WIFI:
      wifi = False
    elif state in ('screen_on', 'screen_off'):
      pass  # FLASH tracks it but its ready rule does not use it
    elif state == 'screen_lock':
      locked = True
    elif state == 'screen_unlock':
      locked = False
    elif state.endswith('%'):
      try:  # battery level: not part of the ready rule
        float(state[:-1])
      except ValueError:
        return None  # FLASH: float() fails, the trace is invalid
    else:
      raise ValueError(f'unknown FLASH state {state!r}')
    stamps.append(when)
    is_ready = locked and wifi and charged
    if is_ready and start is None:
      start = when
    elif not is_ready and start is not None:
      ready.append((start, when))
      start = None
  if not ready or not stamps or stamps[-1] - stamps[0] < 1.0:
    return None
  return np.asarray(ready, np.float64), stamps[0], stamps[-1]


def load_flash_availability(trace, num_clients: int | None = None,
                            seed: int = 0, *,
                            reference_time: str = FLASH_REFERENCE_TIME
                            ) -> profiles_lib.TraceAvailability:
  """FLASH's state traces (or its cached timers) as `TraceAvailability`.

  Rows are {'messages': ...} (`data/state_traces.json`) or
  {'isSuccess', 'trace_start', 'trace_end', 'ready_time'}
  (`cached_timers.json`); see the module docstring. Each client's intervals
  repeat with period trace_end - trace_start from trace_start. Rows that
  FLASH marks invalid are dropped before clients are assigned.

  Args:
    trace: path to the JSON file, or the dict.
    num_clients: None = one client per valid row (sorted key order); else N
      clients assigned rows by `assign_rows`.
    seed: seed of the row assignment.
    reference_time: time zero of the simulation clock.
  """
  data, where = _source(trace, 'FLASH')
  keys, intervals, origins, periods = [], [], [], []
  for key in _sorted_keys(data):
    row = data[key]
    if isinstance(row, Mapping) and 'messages' in row:
      if not isinstance(row['messages'], str):
        raise ValueError(f"{where}: user {key!r} has non-text 'messages'")
      try:
        parsed = parse_flash_messages(row['messages'], reference_time)
      except ValueError as e:
        raise ValueError(f'{where}: user {key!r}: {e}') from None
      if parsed is None:
        continue
      ready, start, end = parsed
    elif isinstance(row, Mapping) and 'ready_time' in row:
      if not row.get('isSuccess', True):
        continue
      start = _number(row, 'trace_start', key, where)
      end = _number(row, 'trace_end', key, where)
      ready = np.asarray(row['ready_time'], np.float64).reshape(-1, 2)
      if end - start < 1.0 or not len(ready):
        continue
    else:
      raise ValueError(f"{where}: user {key!r} lacks 'messages' (state "
                       "trace) or 'ready_time' (cached timer)")
    keys.append(key)
    intervals.append(ready)
    origins.append(start)
    periods.append(end - start)
  if not keys:
    raise ValueError(f'{where}: no valid FLASH trace among {len(data)} rows')
  if num_clients is not None:
    rows = assign_rows(len(keys), num_clients, seed, 'flash_availability')
  else:
    rows = np.arange(len(keys))
  return profiles_lib.TraceAvailability.from_intervals(
      [intervals[r] for r in rows], np.asarray(periods)[rows],
      np.asarray(origins)[rows], tuple(keys[r] for r in rows))


def load_availability(trace, trace_format: str,
                      num_clients: int | None = None,
                      seed: int = 0) -> profiles_lib.TraceAvailability:
  """`load_fedscale_behaviour` (trace_format='fedscale') or
  `load_flash_availability` (trace_format='flash')."""
  if trace_format == 'fedscale':
    return load_fedscale_behaviour(trace, num_clients, seed)
  if trace_format == 'flash':
    return load_flash_availability(trace, num_clients, seed)
  raise ValueError(f'unknown availability trace format {trace_format!r} '
                   "(known: 'fedscale', 'flash')")
