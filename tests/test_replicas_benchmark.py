"""benchmarks/replicas.py --quick runs and reports finite positive figures.

No timing is asserted: only that the JSON has its keys, for both models
and R = 1, 2, and that every figure is a finite positive number.
"""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_replicas_benchmark(tmp_path):
  out = tmp_path / 'replicas.json'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'replicas.py'),
       '--quick', '--out', str(out)],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  last = json.loads(proc.stdout.strip().splitlines()[-1])
  assert json.loads(out.read_text()) == last
  assert last['benchmark'] == 'replicas'
  assert isinstance(last['backend'], str) and last['backend']
  assert last['errors'] == {}
  for m in ('mlp', 'cnn'):
    for r in ('1', '2'):
      assert _positive(last['speedup_vs_sequential'][m][r])
      for kind in ('replicas', 'sequential'):
        assert _positive(last['seconds_per_replica_round'][m][kind][r])
      assert _positive(last['memory_per_replica_bytes'][m][r])
      assert _positive(last['memory_per_replica_without_data_bytes'][m][r])
    assert _positive(last['memory_single_round_bytes'][m])
    assert all(last['params_finite'][m].values())
  # The table names every contender.
  assert 'speedup' in proc.stdout and 'cnn' in proc.stdout
