"""Stateful techniques from the command line: configs/topk_ef.py and
configs/scaffold.py run end to end, and a kill -9 resume is bit-identical
with the technique's server state and the client-state store."""

import json
import os
import signal
import time

import pytest

from tests.test_faults import cli, rounds_of


def _last_digest(workdir):
  steps = sorted(int(s) for s in os.listdir(workdir / 'checkpoints')
                 if s.isdigit())
  with open(workdir / 'checkpoints' / str(steps[-1]) /
            'fedjax_eff_digest.json') as f:
    return steps[-1], json.load(f)['sha256']


def test_kill_9_resume_is_bit_identical_with_state(tmp_path):
  """SCAFFOLD keeps both kinds of state: c (server) and every c_i."""
  config = 'scaffold.py'
  wd = tmp_path / 'killed'
  proc = cli(wd, '--config.num_rounds=400', config=config, wait=False)
  metrics = wd / 'metrics.jsonl'
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().count('\n') >= 3):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  done = max(int(s) for s in os.listdir(wd / 'checkpoints') if s.isdigit())
  n = f'--config.num_rounds={done + 2}'
  resumed = cli(wd, n, config=config)
  straight = cli(tmp_path / 'straight', n, config=config)
  assert resumed.returncode == 0, resumed.stderr
  assert straight.returncode == 0, straight.stderr
  sha = lambda out: out.strip().splitlines()[-1]
  assert sha(resumed.stdout) == sha(straight.stdout)
  # The whole saved state (params, optimizer, the technique's server
  # state and every client's state) is bitwise the same.
  assert _last_digest(wd) == _last_digest(tmp_path / 'straight')
  assert rounds_of(wd)[-1] == done + 2
  summary = json.loads((wd / 'summary.json').read_text())
  assert summary['client_state_bytes'] > 0


def test_topk_ef_config_runs_and_counts_its_bits(tmp_path):
  r = cli(tmp_path / 'a', '--config.num_rounds=2', config='topk_ef.py')
  assert r.returncode == 0, r.stderr
  rows = [json.loads(l) for l in (tmp_path / 'a' / 'metrics.jsonl')
          .read_text().splitlines()]
  fp32 = cli(tmp_path / 'b', '--config.num_rounds=1')
  assert fp32.returncode == 0, fp32.stderr
  dense = json.loads((tmp_path / 'b' / 'metrics.jsonl').read_text()
                     .splitlines()[0])['upload_bits']
  # Top-1% values at 8 bits plus their indices: far below fp32 (about
  # 1% x (8 + index bits) / 32 of it, plus 64 bits per tensor).
  assert rows[0]['upload_bits'] < dense / 50
  summary = json.loads((tmp_path / 'a' / 'summary.json').read_text())
  assert summary['client_state_bytes'] > 0
  # The residuals in host memory (data packed on the host) give the same
  # model as on the device.
  host = cli(tmp_path / 'h', '--config.num_rounds=2',
             '--config.data_placement=host', config='topk_ef.py')
  assert host.returncode == 0, host.stderr
  sha = lambda out: out.strip().splitlines()[-1]
  assert sha(host.stdout) == sha(r.stdout)
  assert json.loads((tmp_path / 'h' / 'summary.json').read_text())[
      'client_state_bytes'] == summary['client_state_bytes']
