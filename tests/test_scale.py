"""Scale: device-resident data, sharding the cohort over a Mesh, processes.

The round must give the same server model however the cohort reaches it
(packed on the host or gathered on the device from resident data) and
however it is split (chunk width, mesh size, number of processes). The
mesh and multi-process cases run `tests/scripts/mesh_rounds.py` in fresh
processes, because the number of (fake) CPU devices and
`jax.distributed` are fixed when JAX starts.
"""

from __future__ import annotations

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


def test_pack_index_selects_the_packed_examples():
  data = helpers.ragged_clients()
  resident = data_lib.ResidentData.of(data)
  ids = np.array([5, 0, 3, 6])
  kw = dict(steps=3, batch_size=4, seed=7, round_num=2, policy_small='repeat')
  packed = data_lib.pack(data, ids, **kw)
  indexed = data_lib.pack_index(resident, ids, **kw)
  for f, x in packed.batches.items():
    gathered = resident.examples[f][indexed.index]
    np.testing.assert_array_equal(gathered * (indexed.mask.reshape(
        indexed.mask.shape + (1,) * (x.ndim - 3)) > 0), x)
  np.testing.assert_array_equal(indexed.mask, packed.mask)
  np.testing.assert_array_equal(indexed.weight, packed.weight)
  assert indexed.index.dtype == np.int32


@pytest.mark.parametrize('chunk', [1, 3])
def test_resident_round_equals_packed_round(chunk):
  """Gathering each chunk's rows inside the program gives the same round."""
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
  with one device of a 2-device mesh, trains the model one process does."""
  single = tmp_path / 'single.npz'
  multi = tmp_path / 'multi.npz'
  port = _free_port()
  procs = [_run_script(
      ['--mesh', '2', '--out', str(multi), '--num_processes', '2',
       '--process_id', str(i), '--coordinator', f'127.0.0.1:{port}'],
      num_devices=1) for i in range(2)]
  base = _run_script(['--mesh', '0', '--out', str(single)], num_devices=1)
  for p in procs + [base]:
    _finish(p)
  a, b = np.load(single), np.load(multi)
  assert int(b['devices']) == 2
  diff = max(float(np.max(np.abs(x - y)))
             for x, y in zip(_params(a, 0), _params(b, 2)))
  assert diff < 1e-6
  np.testing.assert_array_equal(a['mesh0/upload_bits'], b['mesh2/upload_bits'])
