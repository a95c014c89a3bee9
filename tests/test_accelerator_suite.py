"""benchmarks/accelerator_suite.py: its reduced CPU run and its budget.

Keys and sanity of the figures only; never a timing (DESIGN.md)."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, 'benchmarks', 'accelerator_suite.py')
MODELS = ('cnn', 'mlp')


def run_suite(tmp_path, *flags):
  out = tmp_path / 'suite.json'
  # Unoptimized compiles (the suite's and its workers'): 58 -> 27 s; the
  # figures checked here are keys and sanity, never timings.
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  proc = subprocess.run([sys.executable, SUITE, '--out', str(out), *flags],
                        capture_output=True, text=True, timeout=3000, cwd=ROOT,
                        env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = json.loads(proc.stdout.strip().splitlines()[-1])
  assert json.loads(out.read_text()) == last
  return last, proc.stdout


def positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_reduced_run(tmp_path):
  # Budgets no loaded machine spends: a part skipped or killed for time
  # (ragged.py's subprocess has 100 s by default) would fail the keys
  # checked below, and how long the parts take is not the test.
  s, _ = run_suite(tmp_path, '--reduced', '--budget_s', '2400',
                   '--ragged_s', '600', '--peers_s', '600')
  assert s['benchmark'] == 'accelerator_suite'
  assert s['backend'] and s['device_kind'] and s['jax_version']
  assert s['errors'] == {} and s['skipped'] == []
  for m in MODELS:
    assert positive(s['best_clients_per_second'][m])
    assert str(s['best_chunk'][m]) in s['sweep'][m]
    assert set(s['sweep'][m]) == {'1', '8'}
    for r in s['sweep'][m].values():
      assert positive(r['seconds_per_round'])
      assert positive(r['clients_per_second'])
      assert r['params_finite'] is True
    assert s['max_clients_per_round_per_model'][m] == 16
    assert positive(s['memory_per_client_bytes'][m])
    run = s['scaling'][m]['16']
    assert positive(run['clients_per_second']) and run['params_finite']
    assert positive(s['efficiency_vs_floor'][m])
  assert s['max_clients_per_round'] == 16
  # CPU keeps no allocator statistics: the peak RSS stands in.
  assert s['memory_source'] in ('device_peak_bytes_in_use', 'peak_rss_bytes')
  # (c) ragged: a count that needs no timing, and a timed round.
  assert s['ragged']['useful_fraction_c1'] == {'so_cap32': 1.0}
  assert 0 < s['ragged']['useful_fraction_c8']['so_cap32'] <= 1
  assert 0 < s['ragged']['useful_fraction_c8_lanes']['so_cap32'] <= 1
  assert s['ragged']['seconds_lanes']['so_cap32'] > 0
  assert positive(s['ragged']['seconds_per_round']['so_cap32'])
  assert s['ragged']['time_chunk'] == 8
  # (d) peers: fedjax_eff alone, at C = 1 and C = K.
  assert set(s['peers_femnist_seconds_per_round']['10']) == {
      'fedjax_eff_C1', 'fedjax_eff_Call'}
  assert all(map(positive,
                 s['peers_femnist_seconds_per_round']['10'].values()))
  assert positive(s['elapsed_s'])


def test_spent_budget_skips_everything(tmp_path):
  s, stdout = run_suite(tmp_path, '--reduced', '--budget_s', '0')
  assert 'skipped: sweep budget spent' in stdout
  assert 'skipped: budget spent' in stdout
  assert s['sweep'] == {m: {} for m in MODELS}
  # sweep C=1,8; K=16 and floor; ragged and peers
  assert len(s['skipped']) == 2 * 2 + 2 * 2 + 2
  assert s['ragged']['useful_fraction_c1'] is None
  assert s['errors'] == {} and s['max_clients_per_round'] is None
  assert s['best_clients_per_second'] == {m: None for m in MODELS}
