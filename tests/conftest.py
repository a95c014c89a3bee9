"""Shared test fixtures: tiny models and data so the suite stays fast."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_cpu_multi_thread_eigen=false')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
