"""The experiment loop: sample, pack (prefetched), step, evaluate, record.

`train_and_evaluate(config, workdir)` is what `launch/train.py`, the tests
and the notebook all call. It holds no model or technique logic: it wires the
data, model, technique and optimizers named in the config into
`core.build_round`, then runs rounds, writing

  workdir/metrics.jsonl       one JSON line per round
  workdir/tensorboard/        TensorBoard events
  workdir/checkpoints/        orbax checkpoints every `checkpoint_every`
  workdir/summary.json        final metrics, wall time, config, versions,
                              params_sha256

Re-running with the same workdir resumes from the newest readable checkpoint;
a resumed run ends with the same `params_sha256` as an unbroken one.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import platform
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from fedjax_eff import core
from fedjax_eff import techniques as techniques_lib
from fedjax_eff.core import evaluation
from fedjax_eff.data import cohort as cohort_lib
from fedjax_eff.data import registry as data_registry
from fedjax_eff.experiment import checkpoints
from fedjax_eff.experiment import metrics as metrics_lib
from fedjax_eff.experiment.validation import validate_config
from fedjax_eff.models import get_model


def params_sha256(params: Any) -> str:
  """SHA-256 of the parameters' bytes, leaves in sorted-path order."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    leaf = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(leaf.dtype).encode() + str(leaf.shape).encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()


def versions() -> dict[str, str]:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  out = {'python': platform.python_version()}
  for pkg in ('fedjax_eff', 'jax', 'jaxlib', 'flax', 'optax',
              'orbax-checkpoint', 'numpy', 'tensorflow-datasets'):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  out['backend'] = jax.default_backend()
  out['devices'] = str(jax.devices())
  return out


class Experiment:
  """Everything a run is built from, derived from a config (no state)."""

  def __init__(self, config: ml_collections.ConfigDict):
    validate_config(config)
    self.config = config
    self.data = data_registry.load(config.data)
    self.model = get_model(config.model.name, self.data.num_classes,
                           **dict(config.model.kwargs))
    self.task = core.classification()
    self.technique = techniques_lib.build(config.techniques)
    c = config.client
    self.client_optimizer = core.make_optimizer(
        c.optimizer, c.learning_rate, **dict(c.optimizer_kwargs))
    s = config.server
    self.server_optimizer = core.make_optimizer(
        s.optimizer, s.learning_rate, **dict(s.optimizer_kwargs))
    self.round_fns = core.build_round(
        self.model, self.task, self.technique, self.client_optimizer,
        self.server_optimizer, chunk_size=config.chunk_size or None,
        prox_mu=c.prox_mu)
    self.sampler = cohort_lib.CohortSampler(
        self.data.train.num_clients, config.clients_per_round, config.seed)
    self.evaluate = evaluation.build_evaluator(self.model, self.task,
                                               config.eval_batch_size)
    self.base_key = jax.random.key(config.seed)

  def init_state(self) -> core.ServerState:
    x = np.zeros((1,) + tuple(self.data.input_shape), np.float32)
    params = self.model.init(jax.random.fold_in(self.base_key, 0x1417),
                             x)['params']
    return self.round_fns.init(params)

  def cohort(self, round_num: int) -> cohort_lib.Cohort:
    c = self.config.client
    return cohort_lib.pack(
        self.data.train, self.sampler.sample(round_num), steps=c.local_steps,
        batch_size=c.batch_size, seed=self.config.seed, round_num=round_num,
        policy_large=c.policy_large, policy_small=c.policy_small,
        weighting=c.weighting)

  def round_key(self, round_num: int) -> jax.Array:
    return jax.random.fold_in(self.base_key, round_num)

  def eval_metrics(self, params) -> dict[str, float]:
    out = {}
    if self.data.test is not None:
      m = self.evaluate(params, self.data.test)
      out.update(test_loss=m['loss'], test_accuracy=m['accuracy'])
    if self.data.heldout is not None and self.data.heldout.num_clients:
      m = self.evaluate(params, self.data.heldout.concatenated())
      per_client = [self.evaluate(params, self.data.heldout.client(i))
                    for i in range(self.data.heldout.num_clients)]
      out.update(heldout_loss=m['loss'], heldout_accuracy=m['accuracy'],
                 heldout_client_accuracy_mean=float(np.mean(
                     [p['accuracy'] for p in per_client])))
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       *, progress: bool | None = None) -> dict[str, Any]:
  """Runs (or resumes) the experiment in `workdir`; returns the summary."""
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  exp = Experiment(config)
  state = exp.init_state()
  ckpt = checkpoints.RunCheckpointer(os.path.join(workdir, 'checkpoints'),
                                     config.checkpoint_keep)
  target = {'state': state,
            'rng': jax.random.key_data(exp.base_key),
            'sampler': np.asarray([config.seed, 0], np.int64)}
  restored, step = ckpt.restore_latest(target)
  start = 0
  if step is not None:
    if not np.array_equal(np.asarray(restored['rng']),
                          np.asarray(target['rng'])):
      raise ValueError(f'The checkpoint in {workdir} was written with another '
                       'config.seed; use a fresh --workdir.')
    state = jax.tree.map(jnp.asarray, restored['state'])
    start = int(state.round)
    logging.info('Resumed from round %d in %s.', start, workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  writer = metrics_lib.MetricWriter(workdir, resume_round=start,
                                    tensorboard=config.tensorboard)
  show = config.progress if progress is None else progress
  bar = tqdm.tqdm(total=config.num_rounds, initial=start, unit='round',
                  disable=not show, dynamic_ncols=True, desc='rounds')
  last: dict[str, Any] = {}
  compile_s = None
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  try:
    pending = (pool.submit(exp.cohort, start)
               if start < config.num_rounds else None)
    for r in range(start, config.num_rounds):
      cohort = pending.result()
      pending = (pool.submit(exp.cohort, r + 1)
                 if r + 1 < config.num_rounds else None)
      t_round = time.time()
      state, m = exp.round_fns.round_step(state, cohort, exp.round_key(r))
      record = {k: float(v) for k, v in m._asdict().items()}
      if compile_s is None:
        compile_s = time.time() - t_round
      done = r + 1
      if done % config.eval_every == 0 or done == config.num_rounds:
        record.update(exp.eval_metrics(state.params))
      record['round_seconds'] = time.time() - t_round
      writer.write(done, record)
      last = {'round': done, **record}
      postfix = {'loss': f"{record['train_loss']:.3f}",
                 'acc': f"{record['train_accuracy']:.3f}"}
      for k in ('test_accuracy', 'heldout_accuracy'):
        if k in last:
          postfix[k.split('_')[0] + '_acc'] = f'{last[k]:.3f}'
      bar.set_postfix(postfix, refresh=False)
      bar.update(1)
      if not show and ('test_accuracy' in record or done == start + 1):
        logging.info('round %d: %s', done, record)
      if (done % config.checkpoint_every == 0 or
          done == config.num_rounds):
        ckpt.save(done, {'state': state, 'rng': target['rng'],
                         'sampler': np.asarray([config.seed, done],
                                               np.int64)})
  finally:
    pool.shutdown(wait=False, cancel_futures=True)
    bar.close()
    writer.close()
    ckpt.close()
  history = metrics_lib.read_metrics(workdir)
  if not last and history:  # resumed a finished run: report its last round
    last = dict(history[-1])
  if 'test_accuracy' not in last and 'heldout_accuracy' not in last:
    last.update(exp.eval_metrics(state.params))
  summary = {
      'final_metrics': metrics_lib.to_python(last),
      'rounds': int(state.round),
      'resumed_from_round': start,
      'wall_time_seconds': time.time() - t0,
      'first_round_seconds_incl_compile': compile_s,
      'train_wall_time_seconds_total': float(sum(
          h.get('round_seconds', 0.0) for h in history)),
      'params_sha256': params_sha256(state.params),
      'num_params': int(sum(np.size(x)
                            for x in jax.tree.leaves(state.params))),
      'config': json.loads(config.to_json_best_effort()),
      'versions': versions(),
  }
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  return summary
