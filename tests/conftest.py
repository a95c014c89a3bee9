"""Shared test fixtures: tiny models and data so the suite stays fast."""

import os

import pytest


def _jaxlib_before(major: int, minor: int) -> bool:
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  try:
    version = importlib.metadata.version('jaxlib').split('.')
  except importlib.metadata.PackageNotFoundError:
    return False
  return tuple(int(v) for v in version[:2]) < (major, minor)


# Legacy (non-MLIR) XLA:CPU fusion emitters compile these small programs
# about twice as fast; compile time dominates the suite. XLA from jaxlib
# 0.11 on no longer knows the flag (and aborts on unknown flags).
os.environ.setdefault('XLA_FLAGS', '--xla_cpu_multi_thread_eigen=false' + (
    ' --xla_cpu_use_fusion_emitters=false' if _jaxlib_before(0, 11) else ''))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


@pytest.fixture(scope='module')
def fast_compiles():
  """Cheaper XLA compiles for one test module (opt in with
  `pytestmark = pytest.mark.usefixtures('fast_compiles')`): compile time
  dominates technique tests, and what they compare (round vs reference,
  costs vs costs) is compiled the same way. Restored, and compiled
  programs dropped, at the end of the module."""
  import jax  # pylint: disable=g-import-not-at-top
  old = jax.config.values['jax_disable_most_optimizations']
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', old)
  jax.clear_caches()


@pytest.fixture
def optimized_compiles():
  """XLA's optimizations on for one test of a `fast_compiles` module (for
  tests whose run time, not compile time, dominates)."""
  import jax  # pylint: disable=g-import-not-at-top
  old = jax.config.values['jax_disable_most_optimizations']
  jax.config.update('jax_disable_most_optimizations', False)
  yield
  jax.config.update('jax_disable_most_optimizations', old)
