r"""Trains a federated experiment from a config; resumes from --workdir.

  python launch/train.py --config=configs/default.py --workdir=runs/default \
      [--config.num_rounds=50 --config.server.optimizer=fedadam ...]

Writes workdir/metrics.jsonl, workdir/summary.json, TensorBoard events and
orbax checkpoints; running the same command again resumes the run. A
workdir holds one run: a second process on it is refused, and so is a
resume whose config changes a key that alters the trajectory (learning
rates, clients, steps, model, optimizers...; --allow_config_change=KEY,...
continues anyway). num_rounds, eval_every, checkpoint_every and the like
may change freely.

Exit status, always with one line on stderr when not 0:
  0    done (or already done)
  1    the run failed after starting: an I/O error (disk full), out of
       memory, max_failed_rounds rounds in a row that changed nothing;
       the last good checkpoint is kept
  2    bad input: an unknown or impossible config key, a missing config
       file or dataset, a workdir that is a file, locked by another run or
       holding a run of another config, a round that cannot fit in memory
  130  SIGINT / 143 SIGTERM: the round in flight was finished and saved;
       the same command resumes

Many devices, many hosts (JAX's own engine, `jax.distributed`):

  # one host, all its accelerators: shard each cohort over every device
  python launch/train.py ... --config.mesh_clients=-1

  # N hosts (or N processes on one machine): run this on every host, with
  # its own --process_id, the same --coordinator_address (host 0's
  # address and a free port) and a --workdir on a shared file system
  python launch/train.py --config=... --workdir=/shared/run \
      --coordinator_address=10.0.0.1:1234 --num_processes=N \
      --process_id=I --config.mesh_clients=-1

On a GPU/TPU cluster whose scheduler JAX recognises (Slurm, Open MPI,
Cloud TPU pods) the three flags may be left out: pass --distributed and
`jax.distributed.initialize()` reads them from the environment. On CPU the
collectives go through gloo. Every process runs the same rounds on its
part of the mesh; process 0 writes metrics.jsonl and summary.json (the
others write theirs under workdir/process<I>/), all share the checkpoints.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedjax_eff.data.sources import DatasetNotPreparedError
from fedjax_eff.experiment import callbacks
from fedjax_eff.experiment import cli
from fedjax_eff.experiment import errors
from fedjax_eff.experiment import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (configs/*.py).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for metrics, checkpoints, summary.')
flags.mark_flags_as_required(['config', 'workdir'])
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() (implied by '
    '--coordinator_address); without the flags below JAX reads the cluster '
    'from the environment (Slurm, Open MPI, TPU pods).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for '
    'jax.distributed.initialize.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process\'s index, 0..N-1.')
_CALLBACKS = flags.DEFINE_list(
    'callbacks', [], 'Your own hooks: FILE.py:FACTORY (or '
    'package.module:FACTORY), FACTORY(workdir, config) returning an object '
    'with on_round_end / on_evaluate / on_checkpoint / on_run_end; e.g. '
    'examples/csv_logger.py:CsvLogger. See fedjax_eff/experiment/'
    'callbacks.py.')
_ALLOW_CHANGE = flags.DEFINE_list(
    'allow_config_change', [], 'Config keys (dotted, e.g. '
    'client.learning_rate) that may differ from the run recorded in '
    '--workdir when resuming; each change is logged to '
    'workdir/config_changes.jsonl.')


def init_distributed():
  """Joins the `jax.distributed` job the flags describe, if any."""
  if not (_DISTRIBUTED.value or _COORDINATOR.value):
    return
  import jax  # pylint: disable=g-import-not-at-top
  # Collectives between CPU devices of different processes; GPU and TPU
  # backends use their own (NCCL, ICI) whatever this says.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                             _PROCESS_ID.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # quiet libraries by default
    logging.set_verbosity(logging.WARNING)
  init_distributed()
  try:
    hooks = tuple(callbacks.load(spec, _WORKDIR.value, _CONFIG.value)
                  for spec in _CALLBACKS.value)
    summary = train_and_evaluate(
        _CONFIG.value, _WORKDIR.value,
        allow_config_change=tuple(_ALLOW_CHANGE.value), callbacks=hooks)
  except errors.RunFailed as e:
    cli.fail(str(e), e.exit_code, hard=True)
  except errors.RunInterrupted as e:
    cli.fail(str(e), e.exit_code)
  except (ValueError, DatasetNotPreparedError) as e:
    cli.fail(str(e))
  except KeyboardInterrupt:  # before the first round: nothing to save
    cli.fail('interrupted before the first round finished; nothing was '
             'lost: run the same command to start again.', 130)
  final = summary['final_metrics']
  shown = {k: final[k] for k in ('round', 'train_loss') if k in final}
  shown.update(callbacks.headline(final))
  print('done: ' + ', '.join(
      f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
      for k, v in shown.items()))
  for cost in summary.get('device_cost', []):
    where = ', '.join(([f"stage {cost['stage']}"] if cost['stage'] != 'None'
                       else []) + [f"tier {cost['tier']}"] + (
                           [f"variant {cost['variant']}"]
                           if cost.get('variant') is not None else []))
    state = cost.get('training_state_bytes')
    print(f"device cost ({where}): peak "
          f"{cost['device_peak_bytes'] / 1e6:.2f} MB"
          + (f" (training state {state / 1e6:.2f} MB)" if state else '') +
          f", "
          f"{cost['device_flops_per_round'] / 1e9:.3f} GFLOPs/round, "
          f"up {cost['upload_bits'] / 8e6:.3f} MB, "
          f"down {cost['download_bits'] / 8e6:.3f} MB per client")
  print(f"params_sha256={summary['params_sha256']}")


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
