"""What a user sees: progress lines, callbacks, TensorBoard, evaluation."""

import os
import struct
import subprocess
import sys

import numpy as np

from fedjax_eff.core import evaluation as evaluation_lib
from fedjax_eff.experiment import callbacks as callbacks_lib
from fedjax_eff.experiment import train as train_lib
from fedjax_eff.experiment import train_and_evaluate
from fedjax_eff.experiment.metrics import tensorboard_tag
from tests.test_experiment import ROOT, TINY, tiny_config


class Recorder(callbacks_lib.Callback):

  def __init__(self):
    self.events = []

  def on_round_end(self, round_num, metrics):
    self.events.append(('round', round_num, dict(metrics)))

  def on_evaluate(self, round_num, metrics):
    self.events.append(('eval', round_num, dict(metrics)))

  def on_checkpoint(self, round_num, directory):
    self.events.append(('ckpt', round_num, directory))

  def on_run_end(self, summary):
    self.events.append(('end', summary['rounds'], None))


def test_callbacks_see_every_round_eval_and_checkpoint_once(tmp_path):
  wd = str(tmp_path)
  rec = Recorder()
  train_and_evaluate(tiny_config(num_rounds=4, eval_every=2,
                                 checkpoint_every=2, tensorboard=False,
                                 accounting=False), wd, callbacks=[rec])
  kinds = [(k, r) for k, r, _ in rec.events]
  assert kinds == [('round', 1), ('eval', 2), ('round', 2), ('ckpt', 2),
                   ('round', 3), ('eval', 4), ('round', 4), ('ckpt', 4),
                   ('end', 4)]
  assert rec.events[1][2]['test_accuracy'] == rec.events[2][2][
      'test_accuracy']
  assert rec.events[3][2] == os.path.join(wd, 'checkpoints')
  # A resumed run reports only its own rounds.
  rec = Recorder()
  train_and_evaluate(tiny_config(num_rounds=5, eval_every=2,
                                 checkpoint_every=2, tensorboard=False,
                                 accounting=False), wd, callbacks=[rec])
  assert [(k, r) for k, r, _ in rec.events] == [
      ('eval', 5), ('round', 5), ('ckpt', 5), ('end', 5)]


def test_progress_lines_without_a_terminal(tmp_path, capsys):
  train_and_evaluate(tiny_config(num_rounds=3, eval_every=3, progress=True,
                                 log_every_seconds=3600.0, tensorboard=False,
                                 accounting=False), str(tmp_path))
  lines = [l for l in capsys.readouterr().out.splitlines()
           if l.startswith('round ')]
  # The first round, then the evaluation at the last: not every round.
  assert [l.split(' (')[0] for l in lines] == ['round 1/3', 'round 3/3']
  assert 'ETA' in lines[0] and 'rounds/s' in lines[0]
  assert 'test_accuracy=' in lines[1] and '\r' not in ''.join(lines)


def test_headline_is_the_tasks_metric():
  assert callbacks_lib.headline({'test_accuracy': 0.0, 'test_perplexity': 9.,
                                 'heldout_perplexity': 8.}) == {
                                     'test_perplexity': 9.,
                                     'heldout_perplexity': 8.}
  assert callbacks_lib.headline({'test_accuracy': 0.1, 'test_cer': 0.2,
                                 'test_wer': 0.5}) == {'test_cer': 0.2,
                                                       'test_wer': 0.5}
  assert callbacks_lib.headline({'test_accuracy': 0.9}) == {
      'test_accuracy': 0.9}
  assert callbacks_lib.headline({'train_loss': 1.0}) == {}


def test_cli_csv_callback_example(tmp_path):
  r = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'train.py'),
       '--config=' + os.path.join(ROOT, 'configs', 'default.py'),
       f'--workdir={tmp_path}', *TINY, '--config.num_rounds=3',
       '--config.tensorboard=false', '--config.accounting=false',
       '--callbacks=examples/csv_logger.py:CsvLogger'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  rows = open(tmp_path / 'rounds.csv').read().splitlines()
  assert rows[0].startswith('round,train_loss') and len(rows) == 4
  assert [row.split(',')[0] for row in rows[1:]] == ['1', '2', '3']
  assert 'done: round=3' in r.stdout
  bad = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'train.py'),
       '--config=' + os.path.join(ROOT, 'configs', 'default.py'),
       f'--workdir={tmp_path}/b', '--callbacks=examples/nope.py:X'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and 'no such file' in bad.stderr


def _events(logdir):
  """Every Event in a TensorBoard directory (TFRecord framing, no reader
  library needed)."""
  from tensorboardX.proto import event_pb2
  out = []
  for name in sorted(os.listdir(logdir)):
    data = open(os.path.join(logdir, name), 'rb').read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack('<Q', data[pos:pos + 8])
      out.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + n]))
      pos += 12 + n + 4
  return out


def test_tensorboard_groups_tags_and_records_the_config(tmp_path):
  train_and_evaluate(tiny_config(num_rounds=2, eval_every=2,
                                 accounting=False), str(tmp_path))
  events = _events(tmp_path / 'tensorboard')
  tags = {v.tag for e in events for v in e.summary.value}
  assert {'train/train_loss', 'eval/test_accuracy', 'cost/upload_bits',
          'time/round_seconds'} <= tags
  assert all(t.split('/')[0] in ('train', 'eval', 'cost', 'time', 'other',
                                 'config', '_hparams_')
             for t in tags), tags
  text = [v for e in events for v in e.summary.value if v.tag.startswith(
      'config')]
  assert text and b'client.learning_rate' in text[0].tensor.string_val[0]
  assert any(t.startswith('_hparams_') for t in tags)
  assert tensorboard_tag('tier1/upload_bits') == 'cost/tier1/upload_bits'
  assert tensorboard_tag('keep0.5/test_accuracy') == (
      'eval/keep0.5/test_accuracy')


def test_held_out_clients_are_evaluated_in_one_pass(tmp_path):
  """One evaluator call per set; the per-client mean equals evaluating
  each client alone; a test set equal to the held-out examples is not
  evaluated again."""
  exp = train_lib.Experiment(tiny_config(tensorboard=False,
                                         accounting=False))
  params = exp.init_params
  calls = []

  def counted(arrays, segments=None):
    calls.append(len(next(iter(arrays.values()))))
    return exp.evaluate(params, arrays, segments=segments)
  heldout = exp.data.heldout
  out = evaluation_lib.central_metrics(counted, exp.data.test, heldout)
  assert len(calls) == 2  # held-out (pooled + per client), then test
  alone = [exp.evaluate(params, heldout.client(i))['accuracy']
           for i in range(heldout.num_clients)]
  np.testing.assert_allclose(out['heldout_client_accuracy_mean'],
                             np.mean(alone), rtol=1e-6)
  pooled = exp.evaluate(params, heldout.concatenated())
  np.testing.assert_allclose(out['heldout_loss'], pooled['loss'], rtol=1e-6)
  calls.clear()
  same = evaluation_lib.central_metrics(counted, heldout.concatenated(), heldout)
  assert len(calls) == 1
  assert same['test_accuracy'] == same['heldout_accuracy']


def test_evaluator_matches_a_per_batch_loop():
  """The scanned evaluator equals summing one batch at a time (sizes that
  are not multiples of the batch or of a group of batches)."""
  exp = train_lib.Experiment(tiny_config(tensorboard=False,
                                         accounting=False,
                                         eval_batch_size=16))
  from fedjax_eff.core import evaluation
  arrays = exp.data.test
  for n in (1, 15, 16, 17, 300):
    part = {k: v[:n] for k, v in arrays.items()}
    m = exp.evaluate(exp.init_params, part)
    one_at_a_time = evaluation.build_evaluator(
        exp.model, exp.task, 16, max_batches_per_call=1)(exp.init_params,
                                                         part)
    np.testing.assert_allclose(m['loss'], one_at_a_time['loss'], rtol=1e-6)
    assert m['accuracy'] == one_at_a_time['accuracy']
    assert m['num_examples'] == n
