"""Shared test fixtures: tiny models and data so the suite stays fast."""

import os

# Legacy (non-MLIR) XLA:CPU fusion emitters compile these small programs
# about twice as fast; compile time dominates the suite.
os.environ.setdefault('XLA_FLAGS', '--xla_cpu_multi_thread_eigen=false '
                      '--xla_cpu_use_fusion_emitters=false')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
