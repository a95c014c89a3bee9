"""Shared test fixtures: tiny models and data so the suite stays fast."""

import os

import pytest

# Legacy (non-MLIR) XLA:CPU fusion emitters compile these small programs
# about twice as fast; compile time dominates the suite.
os.environ.setdefault('XLA_FLAGS', '--xla_cpu_multi_thread_eigen=false '
                      '--xla_cpu_use_fusion_emitters=false')
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
