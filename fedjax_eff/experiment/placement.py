"""Where a run's pieces live: the mesh of devices and the training data.

Two choices the config makes and this module carries out:

* `config.mesh_clients`: shard each round's cohort over a
  `jax.sharding.Mesh` with a `'clients'` axis of that many devices (-1 =
  every device of every process, e.g. under `jax.distributed`), or none.
* `config.data_placement`: 'device' keeps every training client's examples
  on the accelerator once (`ResidentData`), so a round only receives row
  indices and gathers its cohort inside the jitted program; 'host' packs
  each cohort on the host (in the loop's background thread, one round
  ahead); 'auto' picks 'device' when the examples take at most
  `DEVICE_SHARE` of one device's memory (`CPU_SHARE` of the RAM on CPU,
  where the host's per-client arrays, the concatenated copy and the
  "device" copy all live in the same memory).
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from fedjax_eff import core
from fedjax_eff.experiment.errors import RunRefused

PLACEMENTS = ('auto', 'device', 'host')
DEVICE_SHARE = 0.25  # of one device's memory, for 'auto' placement
CPU_SHARE = 0.1


def make_mesh(mesh_clients: int) -> jax.sharding.Mesh | None:
  if mesh_clients == 0:
    return None
  n = jax.device_count() if mesh_clients == -1 else mesh_clients
  if not 1 <= n <= jax.device_count():
    raise ValueError(f'config.mesh_clients={mesh_clients} asks for {n} '
                     f'devices; there are {jax.device_count()} '
                     f'({jax.process_count()} process(es)).')
  return jax.sharding.Mesh(np.asarray(jax.devices()[:n]),
                           (core.CLIENTS_AXIS,))


def device_memory_bytes() -> int:
  """One device's memory: the allocator's limit, or the host's RAM on CPU."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def nbytes(data) -> int:
  """Bytes of all of a `FederatedData`'s examples (without copying them)."""
  first = data.client(0)
  per_example = sum(a.dtype.itemsize * int(np.prod(a.shape[1:]))
                    for a in first.values())
  return int(data.client_sizes.sum()) * per_example


def on_device(placement: str, nbytes: int) -> bool:
  if placement not in PLACEMENTS:
    raise ValueError(f'config.data_placement must be one of {PLACEMENTS}, '
                     f'got {placement!r}.')
  if placement == 'auto':
    share = CPU_SHARE if jax.default_backend() == 'cpu' else DEVICE_SHARE
    return nbytes <= share * device_memory_bytes()
  return placement == 'device'


def put_replicated(tree, mesh: jax.sharding.Mesh | None):
  """On the device, or a copy on every device of the mesh."""
  if mesh is None:
    return jax.device_put(tree)
  return jax.tree.map(functools.partial(core.round.replicate, mesh), tree)


def available_memory_bytes() -> int:
  """What a round may still take: the accelerator's free memory, or on CPU
  the host's available RAM (`MemAvailable`; the physical RAM if unknown)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if stats.get('bytes_limit'):
    return int(stats['bytes_limit']) - int(stats.get('bytes_in_use', 0))
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return device_memory_bytes()


def round_memory_estimate(*, clients: int, chunk: int, steps: int,
                          batch: int, example_bytes: int, param_bytes: int,
                          on_device_data: bool) -> dict[str, int]:
  """A lower bound on a round's memory, from shapes alone (no compile).

  cohort: host placement holds `K S B` examples three times (the packed
  cohort being trained, the next one prefetched, the device copy); device
  placement holds int32 indices and a float mask per slot and gathers one
  chunk's `C S B` examples. model: the server's params, optimizer state
  (two slots assumed), delta and coverage sums, and per client of a chunk
  its params, gradients, optimizer state, delta and coverage. Activations
  come on top (they need the compiled program), so a round that exceeds
  this estimate cannot fit.
  """
  slots = clients * steps * batch
  cohort = (slots * 8 + chunk * steps * batch * example_bytes
            if on_device_data else 3 * slots * example_bytes)
  model = param_bytes * (5 + 6 * chunk)
  return {'cohort': int(cohort), 'model': int(model),
          'total': int(cohort + model)}


def memory_advice(need: int, have: int, config) -> str:
  c = config.client
  return (f'a round needs at least {need / 2**30:.2f} GiB but '
          f'{have / 2**30:.2f} GiB is available. Lower config.chunk_size '
          f'({config.chunk_size}; 0 = the backend default), '
          f'config.client.batch_size ({c.batch_size}), '
          f'config.client.local_steps ({c.local_steps}) or '
          f'config.clients_per_round ({config.clients_per_round}).')


def check_round_fits(config, *, example_bytes: int, param_bytes: int,
                     on_device_data: bool, chunk: int) -> None:
  """Raises `RunRefused` before compiling if a round cannot fit."""
  c = config.client
  est = round_memory_estimate(
      clients=config.clients_per_round, chunk=chunk, steps=c.local_steps,
      batch=c.batch_size, example_bytes=example_bytes,
      param_bytes=param_bytes, on_device_data=on_device_data)
  have = available_memory_bytes()
  if est['total'] > have:
    raise RunRefused('out of memory: ' + memory_advice(est['total'], have,
                                                       config))
