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


def make_mesh(mesh_clients: int, mesh_replicas: int = 0
              ) -> jax.sharding.Mesh | None:
  """The 'clients' mesh of `mesh_clients` devices (-1: all); with
  `mesh_replicas` r > 0 too (replicas of one program), an r x n mesh
  ('replicas', 'clients')."""
  if mesh_clients == 0:
    return None
  r = mesh_replicas if mesh_replicas > 0 else 1
  n = jax.device_count() // r if mesh_clients == -1 else mesh_clients
  if not 1 <= n * r <= jax.device_count():
    raise ValueError(f'config.mesh_clients={mesh_clients} (x '
                     f'mesh_replicas={r}) asks for {n * r} devices; there '
                     f'are {jax.device_count()} ({jax.process_count()} '
                     'process(es)).')
  devices = np.asarray(jax.devices()[:n * r])
  if mesh_replicas > 0:
    return jax.sharding.Mesh(devices.reshape(r, n),
                             (core.REPLICAS_AXIS, core.CLIENTS_AXIS))
  return jax.sharding.Mesh(devices, (core.CLIENTS_AXIS,))


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


# Examples in flight (chunk x batch) from which `check_round_fits` also
# compiles the loss gradient at batch 1 and 2 to price activations.
ACTIVATION_PROBE_EXAMPLES = 4096


def activation_bytes_per_example(model, task, params, example_batch
                                 ) -> int:
  """What one more example adds to a training step's scratch memory: the
  slope of XLA's temp bytes of the loss gradient between batches of 8 and
  64 (two small compiles, nothing runs; at batches of 1 or 2 buffer
  padding hides the slope). Activations kept for the backward pass grow
  with the examples a chunk trains at once (chunk x batch)."""
  from fedjax_eff import accounting  # pylint: disable=g-import-not-at-top
  loss_fn = core.round.make_loss_fn(model, task)
  grad = jax.grad(lambda p, b, m, k: loss_fn(p, b, m, k, p, {})[0])
  spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
  temps, sizes = [], (8, 64)
  for b in sizes:
    batch = {k: jax.ShapeDtypeStruct((b,) + v.shape[1:], v.dtype)
             for k, v in example_batch.items()}
    cost = accounting.measure(
        grad, jax.tree.map(spec, params), batch,
        jax.ShapeDtypeStruct((b,), np.float32),
        jax.eval_shape(lambda: jax.random.key(0)), unroll_scans=False)
    temps.append(cost.temp_bytes or 0)
  return max(0, (temps[1] - temps[0]) // (sizes[1] - sizes[0]))


def round_memory_estimate(*, clients: int, chunk: int, steps: int,
                          batch: int, example_bytes: int, param_bytes: int,
                          on_device_data: bool,
                          activation_bytes: int = 0) -> dict[str, int]:
  """A lower bound on a round's memory, from shapes alone (no compile).

  cohort: host placement holds `K S B` examples three times (the packed
  cohort being trained, the next one prefetched, the device copy); device
  placement holds int32 indices and a float mask per slot and gathers one
  chunk's `C S B` examples. model: the server's params, optimizer state
  (two slots assumed), delta and coverage sums, and per client of a chunk
  its params, gradients, optimizer state, delta and coverage.
  activations: `activation_bytes` per example (see
  `activation_bytes_per_example`) for the chunk x batch examples a step
  trains at once (0 when not measured). A round above this cannot fit.
  """
  slots = clients * steps * batch
  cohort = (slots * 8 + chunk * steps * batch * example_bytes
            if on_device_data else 3 * slots * example_bytes)
  model = param_bytes * (5 + 6 * chunk)
  activations = activation_bytes * chunk * batch
  return {'cohort': int(cohort), 'model': int(model),
          'activations': int(activations),
          'total': int(cohort + model + activations)}


def memory_advice(need: int, have: int, config, steps: int) -> str:
  c = config.client
  return (f'a round needs at least {need / 2**30:.2f} GiB but '
          f'{have / 2**30:.2f} GiB is available. Lower config.chunk_size '
          f'({config.chunk_size}; 0 = the backend default), '
          f'config.client.batch_size ({c.batch_size}), '
          f'the local steps ({steps}: config.client.local_steps, or '
          'client.epochs x the largest client\'s batches) or '
          f'config.clients_per_round ({config.clients_per_round}).')


def check_round_fits(config, *, steps: int, example_bytes: int,
                     param_bytes: int,
                     on_device_data: bool, chunk: int,
                     activation_bytes=lambda: 0) -> None:
  """Raises `RunRefused` before compiling the round if it cannot fit.

  `activation_bytes()` (per example) is only called when a chunk trains
  at least `ACTIVATION_PROBE_EXAMPLES` examples at once: small rounds
  skip its compiles.
  """
  c = config.client
  in_flight = chunk * c.batch_size
  est = round_memory_estimate(
      clients=config.clients_per_round, chunk=chunk, steps=steps,
      batch=c.batch_size, example_bytes=example_bytes,
      param_bytes=param_bytes, on_device_data=on_device_data,
      activation_bytes=activation_bytes()
      if in_flight >= ACTIVATION_PROBE_EXAMPLES else 0)
  have = available_memory_bytes()
  if est['total'] > have:
    parts = ', '.join(f'{k} {v / 2**30:.2f} GiB' for k, v in est.items()
                      if k != 'total' and v)
    raise RunRefused('out of memory: ' + memory_advice(est['total'], have,
                                                       config, steps) +
                     f' (estimated from shapes: {parts})')
