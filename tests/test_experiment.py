"""The experiment loop and CLI: outputs, resume contract, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fedjax_eff.experiment import train_and_evaluate
from fedjax_eff.experiment import defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config.num_rounds=6', '--config.clients_per_round=5',
        '--config.data.num_clients=20', '--config.data.heldout_clients=3',
        '--config.model.name=mlp', '--config.client.local_steps=2',
        '--config.client.batch_size=8', '--config.eval_every=3',
        '--config.checkpoint_every=1', '--config.progress=false']


def load_config(name):
  """`configs/NAME.py`'s get_config(), loaded by path as the CLI does."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, 'configs', name + '.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_config(**overrides):
  c = load_config('default')
  c.num_rounds, c.clients_per_round = 6, 5
  c.data.num_clients, c.data.heldout_clients = 20, 3
  c.model.name = 'mlp'
  c.model.kwargs.hidden = (16,)
  c.client.local_steps, c.client.batch_size = 2, 8
  c.eval_every, c.checkpoint_every, c.progress = 3, 1, False
  return override(c, **overrides)


def override(c, **overrides):
  """Sets dotted keys: `override(c, **{'client.batch_size': 4})`."""
  for k, v in overrides.items():
    node = c
    *parents, last = k.split('.')
    for p in parents:
      node = node[p]
    node[last] = v
  return c


def test_outputs_and_resume_equals_unbroken(tmp_path):
  straight = train_and_evaluate(tiny_config(), str(tmp_path / 'a'))
  # 3 rounds, then the same workdir with num_rounds=6.
  train_and_evaluate(tiny_config(num_rounds=3), str(tmp_path / 'b'))
  resumed = train_and_evaluate(tiny_config(), str(tmp_path / 'b'))
  assert resumed['resumed_from_round'] == 3
  assert resumed['params_sha256'] == straight['params_sha256']
  # Metrics: one line per round, eval keys at eval rounds, no duplicates.
  lines = [json.loads(l) for l in open(tmp_path / 'b' / 'metrics.jsonl')]
  assert [l['round'] for l in lines] == [1, 2, 3, 4, 5, 6]
  for l in lines:
    assert np.isfinite(l['train_loss'])
  assert 'test_accuracy' in lines[2] and 'heldout_accuracy' in lines[5]
  assert 'test_accuracy' not in lines[3]
  a = [json.loads(l) for l in open(tmp_path / 'a' / 'metrics.jsonl')]
  assert [l['train_loss'] for l in a] == [l['train_loss'] for l in lines]
  summary = json.load(open(tmp_path / 'b' / 'summary.json'))
  for key in ('final_metrics', 'wall_time_seconds', 'config', 'versions',
              'params_sha256'):
    assert key in summary
  assert summary['versions']['jax'].startswith('0.10')
  assert summary['config']['num_rounds'] == 6
  assert os.listdir(tmp_path / 'b' / 'tensorboard')
  steps = sorted(os.listdir(tmp_path / 'b' / 'checkpoints'))
  assert '6' in steps
  # Running again with nothing left to do changes nothing.
  again = train_and_evaluate(tiny_config(), str(tmp_path / 'b'))
  assert again['params_sha256'] == straight['params_sha256']


def test_corrupt_latest_checkpoint_falls_back(tmp_path, capsys):
  straight = train_and_evaluate(tiny_config(num_rounds=4),
                                str(tmp_path / 'a'))
  wd = tmp_path / 'b'
  train_and_evaluate(tiny_config(num_rounds=4, checkpoint_every=2), str(wd))
  # Corrupt every file of the newest checkpoint (step 4).
  for root, _, files in os.walk(wd / 'checkpoints' / '4'):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'garbage')
  resumed = train_and_evaluate(tiny_config(num_rounds=4, checkpoint_every=2),
                               str(wd))
  assert 'unreadable' in capsys.readouterr().out
  assert resumed['resumed_from_round'] == 2
  assert resumed['params_sha256'] == straight['params_sha256']


def _cli(workdir, *extra, wait=True):
  cmd = [sys.executable, os.path.join(ROOT, 'launch', 'train.py'),
         '--config=' + os.path.join(ROOT, 'configs', 'default.py'),
         f'--workdir={workdir}', *TINY, '--config.tensorboard=false', *extra]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=600)


def _sha(out):
  return [l for l in out.splitlines() if l.startswith('params_sha256=')][0]


def test_cli_sigkill_mid_run_then_restart(tmp_path):
  straight = _cli(tmp_path / 'a')
  assert straight.returncode == 0, straight.stderr
  wd = tmp_path / 'b'
  proc = _cli(wd, '--config.num_rounds=400', wait=False)
  metrics = wd / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline:
    if metrics.exists() and sum(1 for _ in open(metrics)) >= 4:
      break
    if proc.poll() is not None:
      pytest.fail('training ended before it could be killed: '
                  + proc.stderr.read())
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  # Restart with the contract's num_rounds=6: resumes and ends identical.
  resumed = _cli(wd)
  assert resumed.returncode == 0, resumed.stderr
  rounds = [json.loads(l)['round'] for l in open(metrics)]
  if len(rounds) >= 6:  # the killed run may have passed round 6 already
    assert rounds[:6] == [1, 2, 3, 4, 5, 6]
  assert _sha(resumed.stdout) == _sha(straight.stdout)


def test_cli_bad_input_names_the_key(tmp_path):
  r = _cli(tmp_path, '--config.client.bacth_size=4')
  assert r.returncode == 2 and 'config.client.bacth_size' in r.stderr
  r = _cli(tmp_path, '--config.client.batch_size=0')
  assert r.returncode == 2 and 'config.client.batch_size' in r.stderr
  r = _cli(tmp_path, '--config.clients_per_round=50')
  assert r.returncode == 2 and 'config.clients_per_round' in r.stderr
  r = _cli(tmp_path, '--config.data.source=tfds', '--config.data.name=mnist',
           f'--config.data.data_dir={tmp_path}/no_such_dir')
  assert r.returncode == 2
  assert 'mnist' in r.stderr and 'tfds build' in r.stderr


def test_base_config_has_every_key_the_loop_reads():
  c = defaults.base_config()
  for key in ('seed', 'num_rounds', 'clients_per_round', 'chunk_size',
              'eval_every', 'checkpoint_every', 'checkpoint_keep'):
    assert key in c


def test_emnist_config_end_to_end_on_tfds_mock_data(tmp_path):
  """configs/emnist_fedavg.py as written, shrunk, on TFDS mock EMNIST."""
  import tensorflow_datasets as tfds
  c = load_config('emnist_fedavg')
  c.num_rounds, c.clients_per_round = 2, 4
  c.data.num_clients, c.data.heldout_clients = 12, 2
  c.data.cache_dir = str(tmp_path / 'cache')
  c.client.local_steps = 2
  c.model.kwargs.features = (4, 8)
  c.model.kwargs.hidden = 16
  c.progress = False
  with tfds.testing.mock_data(num_examples=300):
    summary = train_and_evaluate(c, str(tmp_path / 'run'))
  assert summary['rounds'] == 2
  assert summary['config']['data']['name'] == 'emnist/byclass'
  assert 0.0 <= summary['final_metrics']['test_accuracy'] <= 1.0
  assert np.isfinite(summary['final_metrics']['train_loss'])


def test_default_config_reaches_90_percent(tmp_path):
  """The README's promise for `make run`: >= 90% test accuracy on digits."""
  c = load_config('default')
  c.progress = False
  c.tensorboard = False
  summary = train_and_evaluate(c, str(tmp_path))
  assert summary['final_metrics']['test_accuracy'] >= 0.90
