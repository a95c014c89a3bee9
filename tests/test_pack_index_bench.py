"""benchmarks/pack_index.py runs, and its two paths pack the same rows
(it checks that itself); never a timing (DESIGN.md)."""

import json

import helpers


def test_pack_index_benchmark_runs(tmp_path):
  bench = helpers.load_benchmark('pack_index')
  out = tmp_path / 'pack_index.json'
  bench.main(['--cohorts', '16,64', '--repeats', '1', '--out', str(out)])
  result = json.loads(out.read_text())
  assert set(result['speedup']) == {'16', '64'}
  assert all(v > 0 for v in result['seconds_bulk'].values())
