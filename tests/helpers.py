"""Tiny federated problems for the tests."""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
import optax

from fedjax_eff import core
from fedjax_eff.data import FederatedData, pack
from fedjax_eff.models import get_model


def ragged_clients(sizes=(3, 7, 20, 40, 1, 12, 9), shape=(6, 6, 1),
                   classes=5, seed=0) -> FederatedData:
  rng = np.random.default_rng(seed)
  return FederatedData({
      f'c{i:02d}': {'x': rng.normal(size=(n,) + shape).astype(np.float32),
                    'y': rng.integers(0, classes, n).astype(np.int32)}
      for i, n in enumerate(sizes)})


def tiny_setup(model='cnn', server='fedavg', server_lr=1.0, client_lr=0.1,
               classes=5, technique=None, prox_mu=0.0, model_kwargs=None,
               server_kwargs=None):
  """Returns (round kwargs, init params) for a tiny model."""
  kwargs = dict(features=(4, 8), hidden=16) if model == 'cnn' else {}
  kwargs.update(model_kwargs or {})
  m = get_model(model, classes, **kwargs)
  params = m.init(jax.random.key(0), np.zeros((1, 6, 6, 1), np.float32))
  return dict(model=m, task=core.classification(),
              technique=technique or core.identity(),
              client_optimizer=optax.sgd(client_lr),
              server_optimizer=core.make_optimizer(server, server_lr,
                                                   **(server_kwargs or {})),
              prox_mu=prox_mu), params['params']


def tiny_cohort(data=None, steps=3, batch=4, round_num=0, **kw):
  data = data or ragged_clients()
  return pack(data, np.arange(data.num_clients), steps=steps,
              batch_size=batch, seed=0, round_num=round_num, **kw)


def max_abs_diff(a, b) -> float:
  return max((float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))),
             default=0.0)


def round_vs_reference(kw, params, cohort, rng, chunk_size=3, num_tiers=1,
                       round_num=None):
  """One vectorised round and its reference twin from the same state;
  asserts equal params (1e-5) and equal per-client upload bits."""
  fns = core.build_round(**kw, chunk_size=chunk_size, num_tiers=num_tiers,
                         donate=False)
  state, metrics = fns.round_step(fns.init(params), cohort, rng,
                                  round_num=round_num)
  ref_state, ref = core.build_reference_round(
      **kw, chunk_size=chunk_size, num_tiers=num_tiers)(
          fns.init(params), cohort, rng, round_num=round_num)
  assert max_abs_diff(state.params, ref_state.params) < 1e-5
  np.testing.assert_array_equal(np.asarray(metrics.client_upload_bits),
                                ref['client_upload_bits'])
  return fns, state, metrics, ref_state, ref


def round_kw(model, technique, client_optimizer=None, server='fedavg',
             server_lr=1.0):
  return dict(model=model, task=core.classification(), technique=technique,
              client_optimizer=client_optimizer or optax.sgd(0.1),
              server_optimizer=core.make_optimizer(server, server_lr))


# jit with XLA's backend optimizations off: for tests that compile a model
# once and run it a few times.
jit_fast = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def adam_losses(loss_fn, params, learning_rate: float, steps: int
                ) -> list[float]:
  """The losses of `steps` jitted Adam steps on `loss_fn(params, rng)`,
  with a fresh dropout key per step."""
  opt = optax.adam(learning_rate)

  @jit_fast
  def step(p, s, rng):
    loss, g = jax.value_and_grad(loss_fn)(p, rng)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  s = opt.init(params)
  losses = []
  for i in range(steps):
    params, s, loss = step(params, s, jax.random.key(i))
    losses.append(float(loss))
  return losses


def write_idx(path, a: np.ndarray) -> None:
  """`a` as an IDX file of unsigned bytes (Fashion-MNIST's format)."""
  header = bytes([0, 0, 0x08, a.ndim]) + np.asarray(a.shape, '>u4').tobytes()
  with open(path, 'wb') as f:
    f.write(header + a.astype(np.uint8).tobytes())


def tiny_fashion_mnist(directory, n_train: int, n_test: int = 60) -> None:
  """A Fashion-MNIST-shaped IDX set in `directory` (no download, no Debian
  package): 28x28 images whose class is a bright horizontal band's
  position, classes 0-9 in turn."""
  rng = np.random.default_rng(0)
  for split, n in (('train', n_train), ('t10k', n_test)):
    y = np.arange(n) % 10
    x = rng.integers(0, 60, (n, 28, 28))
    for i, c in enumerate(y):
      x[i, 2 * c + 4:2 * c + 7] = 255
    write_idx(os.path.join(directory, f'{split}-images-idx3-ubyte'), x)
    write_idx(os.path.join(directory, f'{split}-labels-idx1-ubyte'), y)


def load_benchmark(name: str):
  """`benchmarks/<name>.py` as a module (its directory on `sys.path`, for
  the modules next to it that it imports)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  here = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), 'benchmarks')
  if here not in sys.path:
    sys.path.insert(0, here)
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(here, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
