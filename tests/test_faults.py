"""Faults and bad input: nothing fails silently, nothing is lost.

One test per capability of the reliability contract (issue 14): padding
that contributes nothing whatever the data holds, a workdir that belongs to
one configuration, checkpoints that prove their content, whole files, one
run per workdir, signals, a full disk, guarded numbers, one-line errors.
Tiny configs throughout (an MLP on digits, a few rounds).
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_eff import core
from fedjax_eff.data import FederatedData
from fedjax_eff.data import cohort as cohort_lib
from fedjax_eff.experiment import errors
from fedjax_eff.experiment import train as train_lib
from fedjax_eff.experiment import train_and_evaluate
from fedjax_eff.experiment import workdir as workdir_lib
from fedjax_eff.experiment.metrics import read_metrics
from tests.test_experiment import ROOT, TINY, tiny_config

FAST = dict(tensorboard=False, accounting=False)


def tiny(**kw):
  return tiny_config(**{**FAST, **kw})


def rounds_of(workdir):
  return [r['round'] for r in read_metrics(str(workdir))]


def cli(workdir, *extra, config='default.py', wait=True, env=None):
  cmd = [sys.executable, os.path.join(ROOT, 'launch', 'train.py'),
         '--config=' + os.path.join(ROOT, 'configs', config),
         f'--workdir={workdir}', *TINY, '--config.tensorboard=false',
         '--config.accounting=false', *extra]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=env)


def one_error_line(stderr):
  lines = [l for l in stderr.splitlines() if l.strip()]
  assert 'Traceback' not in stderr, stderr
  assert len(lines) == 1 and lines[0].startswith('error: '), stderr
  return lines[0]


# 1. Padding contributes nothing, whatever the data holds.

def test_padded_slots_point_at_a_zero_row():
  """Device-resident padding gathers zeros, never a real (maybe NaN) row."""
  data = FederatedData({'a': {'x': np.full((3, 2), np.nan, np.float32),
                              'y': np.zeros(3, np.int32)},
                        'b': {'x': np.ones((5, 2), np.float32),
                              'y': np.ones(5, np.int32)}})
  resident = cohort_lib.ResidentData.of(data)
  assert resident.pad_row == 8
  np.testing.assert_array_equal(resident.examples['x'][8], [0.0, 0.0])
  kw = dict(steps=2, batch_size=4, seed=0, round_num=0)
  indexed = cohort_lib.pack_index(resident, np.array([0, 1]), **kw)
  packed = cohort_lib.pack(data, np.array([0, 1]), **kw)
  np.testing.assert_array_equal(indexed.index[indexed.mask == 0], 8)
  np.testing.assert_array_equal(
      resident.examples['x'][indexed.index], packed.batches['x'])


def test_batch_sums_ignore_nan_in_padded_examples():
  task = core.classification()
  logits = jnp.asarray([[0.0, 1.0], [np.nan, np.nan]])
  sums = core.task.batch_sums(task, logits, {'y': jnp.asarray([1, 0])},
                              jnp.asarray([1.0, 0.0]))
  np.testing.assert_allclose(sums.loss, float(optax.softmax_cross_entropy_with_integer_labels(
      logits[:1], jnp.asarray([1]))[0]), rtol=1e-6)
  assert float(sums.correct) == 1.0 and float(sums.loss_units) == 1.0


def test_nan_example_drops_only_its_client_in_both_placements(tmp_path):
  """Clients 0-2 hold one NaN example each: a round drops exactly those
  that train on it, every loss stays finite, and host and device placement
  train the same model (padded slots point at row 0, a poisoned row)."""
  kw = dict(num_rounds=4, clients_per_round=10, **{
      'data.nan_clients': 3, 'client.batch_size': 16,
      'client.local_steps': 4})
  out = {}
  for placement in ('device', 'host'):
    s = train_and_evaluate(tiny(data_placement=placement, **kw),
                           str(tmp_path / placement))
    assert s['data_placement'] == placement
    out[placement] = (s, read_metrics(str(tmp_path / placement)))
  assert out['device'][0]['params_sha256'] == out['host'][0]['params_sha256']
  # Dropped: exactly the clients whose examples this round include their
  # poisoned row (clients 0-2, example 0 each).
  exp = train_lib.Experiment(tiny(data_placement='device', **kw))
  nan_rows = exp.resident.offsets[:3]
  for r, line in enumerate(out['device'][1]):
    c = exp.cohort(r).cohort
    real = c.index[c.mask > 0]
    assert line['num_dropped'] == sum(row in real for row in nan_rows)
    assert np.isfinite(line['train_loss'])
  assert sum(l['num_dropped'] for l in out['device'][1]) >= 1
  assert out['device'][0]['final_metrics']['test_accuracy'] > 0.2


# 2. A workdir belongs to one configuration.

@pytest.mark.parametrize('key,value', [
    ('client.learning_rate', 0.5), ('clients_per_round', 4),
    ('client.local_steps', 3), ('model.name', 'cnn'),
    ('server.optimizer', 'fedadam'), ('data.num_clients', 30)])
def test_resume_with_another_config_is_refused(tmp_path, key, value):
  wd = str(tmp_path)
  train_and_evaluate(tiny(num_rounds=2), wd)
  before = {f: open(os.path.join(wd, f)).read()
            for f in ('metrics.jsonl', 'config.json')}
  old = tiny()
  for part in key.split('.'):
    old = old[part]
  with pytest.raises(errors.RunRefused) as e:
    train_and_evaluate(tiny(num_rounds=4, **{key: value}), wd)
  assert f'{key}: {json.dumps(old)} -> {json.dumps(value)}' in str(e.value)
  assert '--allow_config_change' in str(e.value)
  assert not os.path.exists(os.path.join(wd, 'checkpoints_unreadable'))
  for f, text in before.items():
    assert open(os.path.join(wd, f)).read() == text


def test_resume_changes_that_are_allowed(tmp_path, capsys):
  wd = str(tmp_path)
  straight = train_and_evaluate(tiny(num_rounds=4), str(tmp_path / 'a'))
  train_and_evaluate(tiny(num_rounds=2), wd)
  # Length, evaluation and checkpoint cadence and layout may change.
  s = train_and_evaluate(tiny(num_rounds=4, eval_every=2,
                              checkpoint_every=2), wd)
  assert s['params_sha256'] == straight['params_sha256']
  assert 'resumed from round 2' in capsys.readouterr().out
  # Fewer rounds than done: says so, trains nothing, changes nothing.
  metrics = open(os.path.join(wd, 'metrics.jsonl')).read()
  s = train_and_evaluate(tiny(num_rounds=3), wd)
  assert 'already holds 4 rounds' in capsys.readouterr().out
  assert s['rounds'] == 4 and s['params_sha256'] == straight['params_sha256']
  assert open(os.path.join(wd, 'metrics.jsonl')).read() == metrics
  # A trajectory key, explicitly allowed: continues and logs the change.
  s = train_and_evaluate(tiny(num_rounds=5, **{'client.learning_rate': 0.2}),
                         wd, allow_config_change=('client.learning_rate',))
  assert s['rounds'] == 5 and rounds_of(wd) == [1, 2, 3, 4, 5]
  change = json.loads(open(os.path.join(wd, 'config_changes.jsonl')).read())
  assert change['changed'] == {'client.learning_rate': [0.05, 0.2]}
  assert json.load(open(os.path.join(wd, 'config.json')))['client'][
      'learning_rate'] == 0.2


def test_shape_mismatch_is_refused_not_quarantined(tmp_path):
  wd = str(tmp_path)
  train_and_evaluate(tiny(num_rounds=2), wd)
  steps = sorted(os.listdir(os.path.join(wd, 'checkpoints')))
  with pytest.raises(errors.RunRefused, match='another shape'):
    train_and_evaluate(tiny(num_rounds=3, **{'model.kwargs.hidden': (8,)}),
                       wd, allow_config_change=('model.kwargs.hidden',))
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == steps
  assert not os.path.exists(os.path.join(wd, 'checkpoints_unreadable'))


# 3. Checkpoints prove their content; 4. files are whole.

def _biggest_file(directory):
  files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def test_flipped_bytes_in_a_checkpoint_fall_back(tmp_path, capsys):
  straight = train_and_evaluate(tiny(num_rounds=4), str(tmp_path / 'a'))
  wd = str(tmp_path / 'b')
  train_and_evaluate(tiny(num_rounds=3), wd)
  victim = _biggest_file(os.path.join(wd, 'checkpoints', '3'))
  data = bytearray(open(victim, 'rb').read())
  mid = len(data) // 2
  data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
  open(victim, 'wb').write(bytes(data))
  s = train_and_evaluate(tiny(num_rounds=4), wd)
  out = capsys.readouterr().out
  assert 'checkpoint 3' in out and 'unreadable' in out
  assert s['resumed_from_round'] == 2
  assert s['params_sha256'] == straight['params_sha256']
  assert rounds_of(wd) == [1, 2, 3, 4]
  assert s['final_metrics']['round'] == 4


def test_torn_metrics_are_re_run(tmp_path):
  straight = train_and_evaluate(tiny(num_rounds=4), str(tmp_path / 'a'))
  wd = str(tmp_path / 'b')
  train_and_evaluate(tiny(num_rounds=4), wd)
  path = os.path.join(wd, 'metrics.jsonl')
  lines = open(path).read().splitlines(keepends=True)
  # A line cut in the middle of the file: rounds 2.. are re-run from the
  # newest checkpoint at or before round 1.
  open(path, 'w').write(lines[0] + lines[1][:10] + ''.join(lines[2:]))
  s = train_and_evaluate(tiny(num_rounds=4), wd)
  # Steps 2-4 are kept (checkpoint_keep=3): nothing at or before round 1.
  assert s['resumed_from_round'] == 0
  assert s['params_sha256'] == straight['params_sha256']
  assert rounds_of(wd) == [1, 2, 3, 4]
  assert len(open(path).read().splitlines()) == 4
  # A torn last line: that round is re-run.
  lines = open(path).read().splitlines(keepends=True)
  open(path, 'w').write(''.join(lines[:3]) + lines[3][:7])
  s = train_and_evaluate(tiny(num_rounds=4), wd)
  assert s['resumed_from_round'] == 3 and rounds_of(wd) == [1, 2, 3, 4]
  assert s['params_sha256'] == straight['params_sha256']


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path,
                                                           monkeypatch):
  path = str(tmp_path / 'summary.json')
  workdir_lib.write_atomic(path, 'old')

  def broken(fd):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(os, 'fsync', broken)
  with pytest.raises(OSError):
    workdir_lib.write_atomic(path, 'new' * 1000)
  assert open(path).read() == 'old'
  assert os.listdir(tmp_path) == ['summary.json']


# 5. One run per workdir.

def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path):
  wd = str(tmp_path)
  with workdir_lib.RunLock(wd):
    with pytest.raises(errors.RunRefused, match=f'pid {os.getpid()}'):
      train_and_evaluate(tiny(num_rounds=1), wd)
  assert not os.path.exists(os.path.join(wd, 'metrics.jsonl'))
  train_and_evaluate(tiny(num_rounds=1), wd)  # released: runs


# 6. Signals; 9. one line instead of a traceback (through the CLI).

@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_round_and_resumes_identically(tmp_path, sig):
  wd = tmp_path / 'b'
  proc = cli(wd, '--config.num_rounds=400', wait=False)
  metrics = wd / 'metrics.jsonl'
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().count('\n') >= 2):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
    time.sleep(0.05)
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + sig, stderr
  line = one_error_line(stderr)
  assert signal.Signals(sig).name in line and 'resume' in line
  done = rounds_of(wd)[-1]
  assert f'after round {done}' in line
  assert done < 400
  assert max(int(s) for s in os.listdir(wd / 'checkpoints')
             if s.isdigit()) == done
  # Resume to round done + 2; equal to an unbroken run of that length.
  n = f'--config.num_rounds={done + 2}'
  resumed, straight = cli(wd, n), cli(tmp_path / 'a', n)
  assert resumed.returncode == 0 and straight.returncode == 0
  sha = lambda out: out.strip().splitlines()[-1]
  assert sha(resumed.stdout) == sha(straight.stdout)
  assert rounds_of(wd) == list(range(1, done + 3))


def test_bad_input_is_one_line(tmp_path):
  cases = {
      'no_such_config': cli(tmp_path / 'a', config='no_such.py'),
      'workdir_is_file': cli(__file__),
      'checkpoint_keep': cli(tmp_path / 'b', '--config.checkpoint_keep=0'),
      'nan_lr': cli(tmp_path / 'c', '--config.server.learning_rate=nan'),
      'negative_lr': cli(tmp_path / 'd', '--config.client.learning_rate=-1'),
      'huge_lr': cli(tmp_path / 'e', '--config.server.learning_rate=1e38'),
  }
  expect = {'no_such_config': 'no_such.py', 'workdir_is_file': 'is a file',
            'checkpoint_keep': 'config.checkpoint_keep',
            'nan_lr': 'config.server.learning_rate',
            'negative_lr': 'config.client.learning_rate',
            'huge_lr': 'config.server.learning_rate'}
  for name, r in cases.items():
    assert r.returncode == 2, (name, r.stderr)
    assert expect[name] in one_error_line(r.stderr), name


def test_speech_without_espeak_is_one_line(tmp_path):
  env = dict(os.environ, PATH=os.path.dirname(sys.executable),
             FEDJAX_EFF_CACHE=str(tmp_path / 'cache'),
             XDG_CACHE_HOME=str(tmp_path / 'cache'), HOME=str(tmp_path))
  r = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'train.py'),
       '--config=' + os.path.join(ROOT, 'configs', 'conformer_fd.py'),
       f'--workdir={tmp_path / "w"}', '--config.num_rounds=1'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert r.returncode == 2, r.stderr
  assert 'espeak-ng' in one_error_line(r.stderr)


# 7. A full disk never hangs.

def _tmpfs(path, size):
  if os.geteuid() != 0:
    pytest.skip('mounting a tmpfs needs root')
  os.makedirs(path, exist_ok=True)
  r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs',
                      str(path)], capture_output=True)
  if r.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {r.stderr.decode().strip()}')


@pytest.mark.parametrize('size,what', [('40k', 'metrics.jsonl'),
                                        ('600k', 'checkpoint')])
def test_disk_full_ends_with_one_line(tmp_path, size, what):
  disk = tmp_path / 'disk'
  _tmpfs(disk, size)
  try:
    t0 = time.time()
    r = cli(disk / 'run', '--config.num_rounds=2000',
            '--config.tensorboard=true',
            f'--config.checkpoint_every={1 if what == "checkpoint" else 5000}')
    assert time.time() - t0 < 300
    assert r.returncode == 1, r.stderr
    line = one_error_line(r.stderr)
    assert 'no space left on device' in line.lower() and what in line
    assert str(disk / 'run') in line
  finally:
    subprocess.run(['umount', str(disk)], check=False)


# 8. Numbers are guarded.

def test_non_finite_server_step_is_skipped():
  params = {'w': jnp.ones((3,))}
  opt = core.make_optimizer('fedavg', 1.0)
  state = core.round.ServerState(params, opt.init(params),
                                 jnp.zeros((), jnp.int32))
  bad = {'w': jnp.asarray([1.0, jnp.inf, 0.0])}
  new, skipped = core.round.guarded_server_update(
      opt, state, bad, {'w': jnp.ones((3,))})
  assert bool(skipped) and int(new.round) == 1
  np.testing.assert_array_equal(new.params['w'], params['w'])
  new, skipped = core.round.guarded_server_update(
      opt, state, {'w': jnp.full((3,), 0.5)}, {'w': jnp.ones((3,))})
  assert not bool(skipped)
  np.testing.assert_allclose(new.params['w'], 0.5)


def test_all_dropped_rounds_report_null_and_stop(tmp_path, capsys):
  wd = str(tmp_path)
  with pytest.raises(errors.RunFailed, match='3 rounds in a row') as e:
    train_and_evaluate(tiny(num_rounds=10, max_failed_rounds=3, **{
        'data.nan_clients': 20, 'client.batch_size': 100,
        'client.local_steps': 1}), wd)  # every client trains on its NaN
  assert 'learning_rate' in str(e.value) and 'NaN' in str(e.value)
  lines = read_metrics(wd)
  assert len(lines) == 3
  for l in lines:
    assert l['train_loss'] is None and l['num_dropped'] == 5
  assert capsys.readouterr().out.count('no client update was finite') == 3


# 9. Memory: estimated from shapes before compiling; XLA's own error too.

def test_a_cohort_that_cannot_fit_is_refused_before_compiling(tmp_path):
  with pytest.raises(errors.RunRefused) as e:
    train_and_evaluate(tiny(data_placement='host', **{
        'client.local_steps': 100_000, 'client.batch_size': 100_000}),
                       str(tmp_path))
  msg = str(e.value)
  assert 'out of memory' in msg and 'GiB' in msg
  for key in ('chunk_size', 'batch_size', 'local_steps'):
    assert key in msg


def test_activations_count_in_the_estimate(monkeypatch):
  """A round whose data and model fit but whose activations do not is
  refused before compiling (the H200 run's XLA error, without this, asked
  for 450 GiB in one buffer). The per-example activation bytes come from
  compiling the loss gradient at two batch sizes."""
  from fedjax_eff.experiment import placement
  config = tiny(clients_per_round=20, chunk_size=20, **{
      'client.local_steps': 1, 'client.batch_size': 4096})
  exp = train_lib.Experiment(tiny())
  per_example = placement.activation_bytes_per_example(
      exp.model, exp.task, exp.init_params, exp.example_batch)
  assert per_example > 0
  kw = dict(steps=1, example_bytes=8 * 8 * 4, param_bytes=10_000,
            on_device_data=True, chunk=20)
  base = placement.round_memory_estimate(
      clients=20, chunk=20, steps=1, batch=4096, example_bytes=256,
      param_bytes=10_000, on_device_data=True)
  monkeypatch.setattr(placement, 'available_memory_bytes',
                      lambda: base['total'] + 1)
  placement.check_round_fits(config, **kw)  # without activations: fits
  with pytest.raises(errors.RunRefused, match='activations'):
    placement.check_round_fits(config, activation_bytes=lambda: per_example,
                               **kw)
  # Small rounds (chunk x batch < ACTIVATION_PROBE_EXAMPLES) skip the probe.
  small = tiny(chunk_size=1)
  placement.check_round_fits(small, activation_bytes=lambda: 1 / 0,
                             **dict(kw, chunk=1))


def test_resource_exhausted_becomes_one_message(tmp_path):
  with pytest.raises(errors.RunFailed) as e:
    with errors.translated(str(tmp_path)):
      raise jax.errors.JaxRuntimeError(
          'RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB')
  assert 'out of memory (Out of memory while trying to allocate 9 GiB)' in (
      str(e.value))
  assert 'config.chunk_size' in str(e.value)
