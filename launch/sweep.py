r"""Runs a study: the cross product of config values x seeds, one run a cell.

  python launch/sweep.py --config=configs/default.py --workdir=runs/lr \
      --grid client.learning_rate=0.01,0.03,0.1 --grid clients_per_round=10,100 \
      --seeds 3 [--config.num_rounds=50 ...]

Each cell (one value of each --grid key, one seed 0..N-1 of --seeds) is an
ordinary run of launch/train.py in its own workdir,
DIR/client.learning_rate=0.03,clients_per_round=10,seed=1, run one after
the other in this process; --config.KEY=VALUE overrides apply to every
cell. Running the same command again resumes: finished cells are skipped,
an unfinished one resumes from its checkpoint. At the end:

  DIR/summary.csv            a row per cell: swept keys, seed, status, final
                             metrics, device cost, wall time
  DIR/summary.md             mean ± sd over seeds per grid point
  DIR/<metric>_vs_<key>.png  headline metric and train_loss against each
                             swept key, error bars over seeds

Exit status: 0 every cell done; 1 some cell was refused or failed (its
`status` in summary.csv says why; the other cells ran); 2 bad input (an
unknown --grid key or a value of the wrong type), one line on stderr;
130/143 after a signal (the cell in flight was saved; rerun to resume).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedjax_eff.experiment import cli
from fedjax_eff.experiment import errors
from fedjax_eff.experiment import sweep

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (configs/*.py).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory of the sweep: a workdir per cell, '
    'summary.csv, summary.md, plots.')
flags.mark_flags_as_required(['config', 'workdir'])
_GRID = flags.DEFINE_multi_string(
    'grid', [], 'KEY=V1,V2,...: a config key and its values (parsed as the '
    'type of the config\'s value); repeat for a cross product.')
_SEEDS = flags.DEFINE_integer(
    'seeds', None, 'N: each grid point with config.seed = 0..N-1.')
_REPLICAS = flags.DEFINE_boolean(
    'replicas', True, 'Run cells that differ only in the seed, the client or '
    'server learning rate, FedProx mu, server optimizer constants or '
    'technique knobs that keep shapes (depth-dropout rate, quantization '
    'bits of one code dtype) as replicas of one program (each writes its '
    'own cell workdir; equal to its separate run).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # quiet libraries by default
    logging.set_verbosity(logging.WARNING)
  try:
    grid = sweep.parse_grid(_GRID.value, _CONFIG.value, _SEEDS.value)
  except sweep.SweepError as e:
    cli.fail(str(e))
  try:
    rows, failed = sweep.run_sweep(
        _CONFIG.value, grid, _WORKDIR.value,
        log=lambda line: print(line, flush=True), replicas=_REPLICAS.value)
  except errors.RunInterrupted as e:
    cli.fail(f'{e} (sweep: rerun the same command to resume)', e.exit_code)
  except errors.RunRefused as e:  # the sweep's own workdir
    cli.fail(str(e))
  except KeyboardInterrupt:
    cli.fail('interrupted before the cell\'s first round finished; rerun '
             'the same command to resume the sweep.', 130)
  print(f'sweep: {len(rows) - len(failed)} of {len(rows)} cells done; '
        f'{_WORKDIR.value}/summary.csv, summary.md')
  if failed:
    cli.fail(f'{len(failed)} of {len(rows)} cells did not finish ('
             f'{", ".join(failed)}); see {_WORKDIR.value}/summary.csv '
             'column status.', 1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
