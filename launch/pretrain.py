r"""Central pretraining: trains a config's model on its pooled training data.

  python launch/pretrain.py --config=configs/default.py --workdir=runs/pre \
      [--config.pretrain.steps=2000 --config.pretrain.learning_rate=3e-4]
  python launch/train.py --config=configs/default.py --workdir=runs/ft \
      --config.init_checkpoint=runs/pre

Writes workdir/params (orbax; what `config.init_checkpoint` reads),
workdir/metrics.jsonl, workdir/summary.json and resumable checkpoints; the
same command resumes. Bad input ends with one line and exit status 2.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedjax_eff.data.sources import DatasetNotPreparedError
from fedjax_eff.experiment import cli
from fedjax_eff.experiment import errors
from fedjax_eff.experiment.pretrain import pretrain

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (configs/*.py).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for the exported params.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  try:
    summary = pretrain(_CONFIG.value, _WORKDIR.value)
  except errors.RunFailed as e:
    cli.fail(str(e), e.exit_code, hard=True)
  except (ValueError, DatasetNotPreparedError) as e:
    cli.fail(str(e))
  print('pretrained: ' + ', '.join(
      f'{k}={summary[k]:.4f}' for k in ('test_accuracy', 'heldout_accuracy')
      if k in summary) + f", steps={summary['steps']}")
  print(f"params: {summary['params']}")


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
