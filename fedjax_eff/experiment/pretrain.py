"""Central pretraining, then federated fine-tuning from its checkpoint.

Ro et al.'s transfer-learning lever: train the model centrally (here on the
pooled examples of the config's training clients: point `config.data` at a
disjoint source or partition for a disjoint pretraining set), export the
parameters with orbax, and start any federated config from them with
`--config.init_checkpoint=WORKDIR` (to freeze the embedding during
fine-tuning, add a `partial_training` technique with `train_embed=False`).

`pretrain(config, workdir)` writes

  workdir/metrics.jsonl     loss/accuracy every `pretrain.log_every` steps
  workdir/checkpoints/      orbax state every `pretrain.checkpoint_every`
                            steps (a rerun resumes from the newest)
  workdir/params/           the final parameters (what init_checkpoint reads)
  workdir/summary.json      final train/test metrics, steps, wall time
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from fedjax_eff import core
from fedjax_eff.core import round as round_lib
from fedjax_eff.experiment import callbacks as callbacks_lib
from fedjax_eff.experiment import checkpoints
from fedjax_eff.experiment import metrics as metrics_lib
from fedjax_eff.experiment import run as run_lib
from fedjax_eff.experiment import workdir as workdir_lib
from fedjax_eff.experiment.build import Experiment
# What `config.init_checkpoint` reads (kept importable from here).
from fedjax_eff.experiment.init_checkpoint import load_params, params_dir

__all__ = ['load_params', 'params_dir', 'pretrain']


def pretrain(config, workdir: str) -> dict:
  """Central training of `config.model` on the pooled training clients
  (only those reserved for pretraining if `data.pretrain_fraction` > 0),
  in the run skeleton every mode shares (`run.session`: lock, recorded
  config, errors); a step loop, not rounds."""
  return run_lib.session(config, workdir,
                         lambda: _pretrain(config, workdir))


def _pretrain(config, workdir: str) -> dict:
  t0 = time.time()
  p = config.pretrain
  if config.data.get('pretrain_fraction', 0.0) > 0:
    # Pretrain on the clients the federated run leaves out (Ro et al.:
    # central pretraining on data disjoint from the federated clients').
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.data.part = 'pretrain'
  exp = Experiment(config)
  pool = exp.data.train.concatenated()
  n = len(next(iter(pool.values())))
  optimizer = core.make_optimizer(p.optimizer, p.learning_rate)
  loss_fn = round_lib.make_loss_fn(exp.model, exp.task)
  grad_fn = jax.grad(loss_fn, has_aux=True)

  @jax.jit
  def step(params, opt_state, batch, rng):
    mask = jnp.ones((p.batch_size,), jnp.float32)
    grads, sums = grad_fn(params, batch, mask, rng, params, {})
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state,
            sums.loss / jnp.maximum(sums.loss_units, 1.0),
            sums.correct / jnp.maximum(sums.scored_units, 1.0))

  ckpt = checkpoints.RunCheckpointer(os.path.join(workdir, 'checkpoints'), 2)
  state = {'params': exp.init_params,
           'opt_state': optimizer.init(exp.init_params)}
  restored, start = ckpt.restore_latest(state)
  if start is not None:
    state = jax.tree.map(jnp.asarray, restored)
  start = start or 0
  writer = metrics_lib.MetricWriter(workdir, resume_round=start,
                                    tensorboard=False)
  progress = callbacks_lib.ProgressLog(start, p.steps, unit='step',
                                       every_seconds=config.get(
                                           'log_every_seconds', 30.0))
  if start:
    workdir_lib.announce_resume(start, p.steps, workdir)
  key = jax.random.key(config.seed + 0x9e7)
  params, opt_state = state['params'], state['opt_state']
  try:
    for s in range(start, p.steps):
      # Step s's batch depends on (seed, s) only, so a resumed run draws
      # the same batches as an unbroken one.
      idx = np.random.default_rng([config.seed, s]).integers(
          0, n, p.batch_size)
      batch = {k: v[idx] for k, v in pool.items()}
      params, opt_state, loss, acc = step(params, opt_state, batch,
                                          jax.random.fold_in(key, s))
      done = s + 1
      if done % p.log_every == 0 or done == p.steps:
        record = {'train_loss': float(loss), 'train_accuracy': float(acc)}
        writer.write(done, record)
        progress.on_round_end(done, record)
      if done % p.checkpoint_every == 0 or done == p.steps:
        ckpt.save(done, {'params': params, 'opt_state': opt_state})
  finally:
    writer.close()
    ckpt.close()
  out = params_dir(workdir)
  if os.path.isdir(out):
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(out)
  writer_ckpt = ocp.StandardCheckpointer()
  writer_ckpt.save(out, params)
  writer_ckpt.wait_until_finished()
  writer_ckpt.close()
  summary = {'steps': int(p.steps), 'resumed_from_step': start,
             'wall_time_seconds': time.time() - t0,
             'params': out, **exp.eval_metrics(params, 0),
             'config': json.loads(config.to_json_best_effort())}
  workdir_lib.write_atomic(os.path.join(workdir, 'summary.json'),
                           json.dumps(metrics_lib.to_python(summary),
                                      indent=2))
  return summary
