"""Scale: device-resident data, sharding the cohort over a Mesh, processes.

The round must give the same server model however the cohort reaches it
(packed on the host or gathered on the device from resident data) and
however it is split (chunk width, mesh size, number of processes). The
mesh and multi-process cases run `tests/scripts/mesh_rounds.py` in fresh
processes, because the number of (fake) CPU devices and
`jax.distributed` are fixed when JAX starts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedjax_eff import core
from fedjax_eff import data as data_lib

import helpers

pytestmark = pytest.mark.usefixtures('fast_compiles')

SCRIPT = os.path.join(os.path.dirname(__file__), 'scripts', 'mesh_rounds.py')


def _run_script(args, num_devices=8, timeout=600):
  # Backend optimizations off: these programs are compiled once per mesh
  # size and run three times.
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=(
      f'--xla_force_host_platform_device_count={num_devices} '
      '--xla_backend_optimization_level=0'))
  return subprocess.Popen([sys.executable, SCRIPT] + args, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _finish(proc, timeout=600):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-3000:]


def _params(results, size):
  return [results[k] for k in sorted(
      (k for k in results.files if k.startswith(f'mesh{size}/param')),
      key=lambda k: int(k.split('param')[1]))]


@pytest.mark.parametrize('policy', [
    dict(policy_small='repeat'), dict(policy_small='pad'),
    dict(policy_small='pad', shuffle=False, weighting='uniform'),
    dict(policy_small='pad', epochs=1, max_examples=6, steps=4)])
def test_pack_index_selects_the_packed_examples(policy):
  """The same examples as `pack`, whichever path builds the rows (the
  bulk one for 'pad' without epochs, the per-client loop otherwise)."""
  data = helpers.ragged_clients()
  resident = data_lib.ResidentData.of(data)
  ids = np.array([5, 0, 3, 6])
  assert np.any(data.client_sizes[ids] > 12)  # subsampled ones too
  kw = dict(steps=3, batch_size=4, seed=7, round_num=2)
  kw.update(policy)
  packed = data_lib.pack(data, ids, **kw)
  indexed = data_lib.pack_index(resident, ids, **kw)
  for f, x in packed.batches.items():
    gathered = resident.examples[f][indexed.index]
    np.testing.assert_array_equal(gathered * (indexed.mask.reshape(
        indexed.mask.shape + (1,) * (x.ndim - 3)) > 0), x)
  np.testing.assert_array_equal(indexed.mask, packed.mask)
  np.testing.assert_array_equal(indexed.weight, packed.weight)
  assert indexed.ctx.keys() == packed.ctx.keys()
  for name, x in packed.ctx.items():
    np.testing.assert_array_equal(indexed.ctx[name], x)
  assert indexed.index.dtype == np.int32


@pytest.mark.parametrize('chunk', [1, 3])
def test_resident_round_equals_packed_round(chunk, optimized_compiles):
  """Gathering each chunk's rows inside the program gives the same round,
  bit for bit as users compile it (without XLA's optimizations, since the
  local steps run under `lax.cond`, one ulp apart)."""
  kw, params = helpers.tiny_setup('mlp', server='fedadam', server_lr=0.01,
                                  model_kwargs={'hidden': (16,)})
  data = helpers.ragged_clients()
  resident = data_lib.ResidentData.of(data)
  examples = jax.device_put(resident.examples)
  fns = core.build_round(**kw, chunk_size=chunk, donate=False)
  ids = np.array([6, 1, 3, 4, 0])
  s_packed = s_resident = fns.init(params)
  for r in range(2):
    pk = dict(steps=3, batch_size=4, seed=0, round_num=r)
    s_packed, m1 = fns.round_step(s_packed, data_lib.pack(data, ids, **pk),
                                  jax.random.key(r))
    s_resident, m2 = fns.round_step(
        s_resident, data_lib.pack_index(resident, ids, **pk),
        jax.random.key(r), examples=examples)
  assert helpers.max_abs_diff(s_packed.params, s_resident.params) == 0.0
  assert float(m1.train_loss) == float(m2.train_loss)
  assert helpers.max_abs_diff(s_packed.params, fns.init(params).params) > 1e-3
  with pytest.raises(ValueError, match='examples='):
    fns.round_step(s_resident, data_lib.pack_index(resident, ids, **pk),
                   jax.random.key(0))


@pytest.mark.parametrize('flags', [[], ['--tiers', '--resident']],
                         ids=['packed', 'tiers_resident'])
def test_mesh_sizes_give_the_same_round(tmp_path, flags):
  """Mesh sizes 1, 2, 4 and 8 (fake CPU devices) equal no mesh."""
  out = tmp_path / 'mesh.npz'
  _finish(_run_script(['--mesh', '0,1,2,4,8', '--out', str(out)] + flags))
  results = np.load(out)
  assert int(results['devices']) == 8
  base = _params(results, 0)
  assert len(base) > 0
  for size in (1, 2, 4, 8):
    got = _params(results, size)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(base, got)) < 1e-6
    np.testing.assert_allclose(results[f'mesh{size}/loss'],
                               results['mesh0/loss'], rtol=1e-6)
    np.testing.assert_array_equal(results[f'mesh{size}/upload_bits'],
                                  results['mesh0/upload_bits'])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  """`jax.distributed` with two CPU processes (gloo collectives), each
  with two devices of a 4-device mesh and packing only the clients of its
  own slots (`local_part`), two device tiers, trains the model one process
  does."""
  single = tmp_path / 'single.npz'
  multi = tmp_path / 'multi.npz'
  port = _free_port()
  flags = ['--tiers', '--local_part']
  procs = [_run_script(
      ['--mesh', '4', '--out', str(multi), '--num_processes', '2',
       '--process_id', str(i), '--coordinator', f'127.0.0.1:{port}'] + flags,
      num_devices=2) for i in range(2)]
  base = _run_script(['--mesh', '0', '--out', str(single)] + flags,
                     num_devices=1)
  for p in procs + [base]:
    _finish(p)
  a, b = np.load(single), np.load(multi)
  assert int(b['devices']) == 4
  diff = max(float(np.max(np.abs(x - y)))
             for x, y in zip(_params(a, 0), _params(b, 4)))
  assert diff < 1e-6
  np.testing.assert_array_equal(a['mesh0/upload_bits'], b['mesh4/upload_bits'])


def _train_cmd(workdir, rounds, extra=()):
  return [sys.executable, os.path.join(os.path.dirname(SCRIPT), '..', '..',
                                       'launch', 'train.py'),
          '--config=configs/default.py', f'--workdir={workdir}',
          f'--config.num_rounds={rounds}', '--config.checkpoint_every=2',
          '--config.eval_every=2', '--config.progress=False',
          '--config.chunk_size=2', '--config.accounting=False',
          '--config.tensorboard=False', *extra]


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_train_cli_on_two_processes_resumes_and_equals_one(tmp_path):
  """`launch/train.py` with --coordinator_address/--num_processes/
  --process_id: two gloo processes on a 2-device mesh, stopped after 2
  rounds and resumed to 4, log the rounds one process runs unbroken."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_backend_optimization_level=0')

  def start(cmd):
    return subprocess.Popen(cmd, cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  multi = str(tmp_path / 'multi')
  for rounds in (2, 4):
    port = _free_port()
    procs = [start(_train_cmd(multi, rounds, [
        '--config.mesh_clients=-1', f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2', f'--process_id={i}'])) for i in range(2)]
    if rounds == 2:
      single = start(_train_cmd(str(tmp_path / 'single'), 4))
    for p in procs:
      _finish(p)
  _finish(single)
  got, want = _losses(multi), _losses(str(tmp_path / 'single'))
  assert [r['round'] for r in got] == [1, 2, 3, 4]
  for a, b in zip(got, want):
    np.testing.assert_allclose(a['train_loss'], b['train_loss'], rtol=1e-5)
  np.testing.assert_allclose(got[-1]['test_loss'], want[-1]['test_loss'],
                             rtol=1e-5)
  with open(os.path.join(multi, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['processes'] == 2 and summary['mesh_devices'] == 2
  assert summary['resumed_from_round'] == 2
  assert os.path.exists(os.path.join(multi, 'process1', 'summary.json'))


def test_autotune_times_candidates_then_answers_from_its_cache(tmp_path):
  kw, params = helpers.tiny_setup('mlp', model_kwargs={'hidden': (16,)})
  built = []

  def build(c):
    built.append(c)
    return core.build_round(**kw, chunk_size=c, donate=False)
  cohort = helpers.tiny_cohort()
  state = core.build_round(**kw).init(params)
  cache = str(tmp_path / 'tune.json')
  key = core.autotune.cache_key(kw['model'], 'identity', cohort)
  best, seconds = core.autotune.autotune_chunk_size(
      build, state, cohort, jax.random.key(0), key=key,
      candidates=[1, 2, 4, 64], rounds=1, cache_path=cache)
  assert sorted(seconds) == [1, 2, 4, 7] and built == [1, 2, 4, 7]
  assert best == min(seconds, key=seconds.get)
  assert all(s > 0 for s in seconds.values())
  # The state it timed from is untouched.
  assert helpers.max_abs_diff(state.params, params) == 0.0
  again, cached = core.autotune.autotune_chunk_size(
      build, state, cohort, jax.random.key(0), key=key, cache_path=cache)
  assert (again, cached) == (best, seconds) and len(built) == 4
  # Another cohort shape is another key.
  other = helpers.tiny_cohort(steps=2)
  assert core.autotune.cache_key(kw['model'], 'identity', other) != key


def test_experiment_autotunes_and_places_data(tmp_path, monkeypatch):
  """`chunk_size=-1` autotunes (cached per shape); host- and
  device-placed data train the same model."""
  sys.path.insert(0, os.path.dirname(__file__))
  import test_experiment  # pylint: disable=g-import-not-at-top
  from fedjax_eff.experiment import train_and_evaluate  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('FEDJAX_EFF_CACHE', str(tmp_path / 'cache'))
  runs = {}
  for name, over in [('host', {'data_placement': 'host'}),
                     ('device', {'data_placement': 'device'}),
                     ('tuned', {'chunk_size': -1})]:
    c = test_experiment.tiny_config(
        num_rounds=2, accounting=False, tensorboard=False, **over)
    runs[name] = train_and_evaluate(c, str(tmp_path / name))
  assert runs['host']['data_placement'] == 'host'
  assert runs['device']['data_placement'] == 'device'
  assert runs['host']['params_sha256'] == runs['device']['params_sha256']
  tuned = runs['tuned']
  assert tuned['chunk_size'] in (1, 2, 4, 5)
  assert sorted(map(int, tuned['chunk_autotune_seconds'])) == [1, 2, 4, 5]
  assert os.path.exists(tmp_path / 'cache' / 'chunk_autotune.json')
  # Every round records how long it waited for its (prefetched) cohort.
  waits = [r['host_wait_seconds'] for r in _losses(str(tmp_path / 'device'))]
  assert len(waits) == 2 and all(w >= 0 for w in waits)


def test_pack_index_refuses_a_large_client_as_pack_does():
  data = helpers.ragged_clients()
  resident = data_lib.ResidentData.of(data)
  kw = dict(steps=2, batch_size=4, seed=0, round_num=0, policy_large='error')
  ids = np.array([0, 2, 3])  # 3, 20 and 40 examples: two too large
  with pytest.raises(ValueError) as packed:
    data_lib.pack(data, ids, **kw)
  with pytest.raises(ValueError) as indexed:
    data_lib.pack_index(resident, ids, **kw)
  assert str(indexed.value) == str(packed.value)
