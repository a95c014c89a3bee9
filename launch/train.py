"""Trains a federated experiment from a config; resumes from --workdir.

  python launch/train.py --config=configs/default.py --workdir=runs/default \
      [--config.num_rounds=50 --config.server.optimizer=fedadam ...]

Writes workdir/metrics.jsonl, workdir/summary.json, TensorBoard events and
orbax checkpoints; running the same command again resumes the run. Bad input
(an unknown config key, impossible shapes, a dataset that is not prepared)
ends with one line saying what is wrong and exit status 2.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedjax_eff.data.sources import DatasetNotPreparedError
from fedjax_eff.experiment import cli
from fedjax_eff.experiment import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (configs/*.py).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for metrics, checkpoints, summary.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  try:
    summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, DatasetNotPreparedError) as e:
    cli.fail(str(e))
  final = summary['final_metrics']
  print('done: ' + ', '.join(
      f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
      for k, v in final.items()
      if k in ('round', 'train_loss', 'test_accuracy', 'heldout_accuracy')))
  for cost in summary.get('device_cost', []):
    where = ', '.join(([f"stage {cost['stage']}"] if cost['stage'] != 'None'
                       else []) + [f"tier {cost['tier']}"])
    print(f"device cost ({where}): peak "
          f"{cost['device_peak_bytes'] / 1e6:.2f} MB, "
          f"{cost['device_flops_per_round'] / 1e9:.3f} GFLOPs/round, "
          f"up {cost['upload_bits'] / 8e6:.3f} MB, "
          f"down {cost['download_bits'] / 8e6:.3f} MB per client")
  print(f"params_sha256={summary['params_sha256']}")


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
