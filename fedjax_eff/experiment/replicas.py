"""Replicas: R runs of one program (seeds, learning rates, FedProx μ,
technique knobs that keep shapes).

`run_replicas(configs, workdirs)` trains runs that differ only in
`REPLICA_KEYS` (the seed, the client and server learning rates, FedProx
μ), the server optimizer's numeric constants (b1, b2, eps) and the
techniques' replica knobs (`techniques.replica_knobs`: a depth-dropout
rate, quantization bits of one code dtype) as one
program: the round over a leading replica axis of (server
state, cohort, round key), each replica's hyperparameters values of its
own state (`Experiment(replica_hparams=True)`). Each replica writes its
own workdir (metrics.jsonl, checkpoints, summary.json) and equals its own
run; the sweep (`experiment/sweep.py`) groups compatible cells into it.


`train_replicas(config, seeds, num_rounds)` trains `len(seeds)` runs that
differ only in `config.seed` with `RoundFns.replica_step`: the jitted
round vmapped over a leading replica axis of (server state, cohort, round
key). Each replica keeps its own `Experiment` for what the seed decides
on the host (the initial parameters, `CohortSampler`'s draws, the round
keys), so replica i follows the run `train_and_evaluate` would make with
`config.seed = seeds[i]`, up to float summation order. One device, no
device tiers; no checkpoints, metrics files or evaluation (the caller
evaluates the returned parameters).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_eff.core.placement import REPLICAS_AXIS
from fedjax_eff.core.round import stack_replicas
from fedjax_eff.core.round import unstack_replicas
from fedjax_eff import techniques as techniques_lib
from fedjax_eff.experiment import checkpoints
from fedjax_eff.experiment import metrics as metrics_lib
from fedjax_eff.experiment import workdir as workdir_lib
from fedjax_eff.experiment.build import Experiment, injected_kwargs
from fedjax_eff.experiment.build import params_sha256, versions


def _same(a, b) -> bool:
  if a is None or b is None:
    return a is b
  return a.keys() == b.keys() and all(
      np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def train_replicas(config, seeds: Sequence[int], num_rounds: int | None = None
                   ) -> tuple[list[Any], list[list[dict[str, float]]]]:
  """Trains one replica per seed for `num_rounds` (default
  `config.num_rounds`) rounds; returns (each replica's final
  `ServerState`, each replica's per-round metrics)."""
  exps = []
  for seed in seeds:
    c = copy.deepcopy(config)
    c.seed = int(seed)
    exps.append(Experiment(c))
  first = exps[0]
  if any(not _same(e.examples, first.examples) for e in exps[1:]):
    raise ValueError('The replicas\' device-resident data differ (a '
                     'partition that depends on config.seed): pass '
                     'config.data_placement=host.')
  num_rounds = config.num_rounds if num_rounds is None else num_rounds
  states = stack_replicas([e.init_state() for e in exps])
  history: list[list[dict[str, float]]] = [[] for _ in exps]
  for r in range(num_rounds):
    cohorts = stack_replicas([e.cohort(r).cohort for e in exps])
    keys = stack_replicas([e.round_key(r) for e in exps])
    states, m = first.round_fns.replica_step(
        states, cohorts, keys, round_num=r, examples=first.examples)
    for i, h in enumerate(history):
      h.append({k: float(np.asarray(v)[i]) for k, v in m._asdict().items()
                if not k.startswith('client_')})
  return unstack_replicas(jax.device_get(states), len(exps)), history


# Config keys replicas of one program may differ in: values of the server
# state (`Experiment(replica_hparams=True)`) or of the host (the seed).
REPLICA_KEYS = ('seed', 'client.learning_rate', 'server.learning_rate',
                'client.prox_mu')


def replica_key(key: str, value) -> bool:
  """May replicas of one program differ in config `key`? `REPLICA_KEYS`,
  and the server optimizer's numeric constants (b1, b2, eps: values of
  its injected state, `build.injected_kwargs`)."""
  prefix = 'server.optimizer_kwargs.'
  if key.startswith(prefix):
    return bool(injected_kwargs({key[len(prefix):]: value}))
  return key in REPLICA_KEYS


def _technique_classes(entries) -> list[dict[str, Any]]:
  """`config.techniques` with each replica knob's value replaced by its
  structural class (`techniques.replica_knobs`): bits 4 and 8 are one
  program (uint8 codes), depth-dropout rates 0.1 and 0.3 too."""
  out = []
  for entry in entries or ():
    entry = dict(entry)
    for knob, (_, _, cls) in techniques_lib.replica_knobs(entry).items():
      entry[knob] = cls
    out.append(entry)
  return out


def shape_key(config) -> str:
  """What must be equal for runs to be replicas of one program: the config
  without the keys replicas may differ in (`replica_key`), the techniques'
  replica knobs as their structural classes."""
  flat = {k: v for k, v in workdir_lib.flatten(config.to_dict()).items()
          if not replica_key(k, v)}
  flat['techniques'] = _technique_classes(config.techniques)
  return json.dumps(flat, sort_keys=True, default=str)


def can_replicate(configs) -> bool:
  """Replicas need one program: one federated mode, no device tiers,
  stages, device profiles or privacy, a clients mesh only with a
  replicas axis beside it (`mesh_replicas` > 0), and configs equal but
  for replica values (`shape_key`)."""
  c = configs[0]
  clients_mesh = c.mesh_clients not in (0, 1)
  if (len({shape_key(x) for x in configs}) != 1 or c.mode != 'federated'
      or (clients_mesh and not c.get('mesh_replicas', 0) > 0)
      or len(c.devices.tier_fractions)
      or c.get('privacy', {}).get('mechanism', 'none') != 'none'
      or c.devices.get('profiles', 'none') != 'none'
      or c.get('sampling', 'fixed') != 'fixed'):
    return False
  return True


def run_replicas(configs: Sequence[Any], workdirs: Sequence[str], *,
                 log=print) -> list[dict[str, Any]]:
  """R runs that differ only in `REPLICA_KEYS`, trained in one program
  (`RoundFns.replica_step`), each in its own workdir as `train_and_evaluate`
  would write it: metrics.jsonl, checkpoints, summary.json (plus
  `replicas`, the replicas of its program, `replica_state_bytes`, the
  memory one replica's state takes, and `replica_program_peak_bytes` /
  `peak_bytes_per_replica`, the compiled round's peak over all R and its
  share per replica). Each replica equals its own run
  (tests/test_replicas.py). Resumes from the newest round every replica
  has a checkpoint of. A replica's workdir resumes as a replica (its
  optimizer state holds its hyperparameters). Returns the summaries."""
  if not can_replicate(configs):
    raise ValueError('These configs are not replicas of one program (they '
                     f'differ beyond {REPLICA_KEYS}, server optimizer '
                     'constants and technique knobs that keep shapes, or '
                     'use a mesh, device '
                     'tiers, device profiles, privacy or another sampling).')
  t0 = time.time()
  exps = [Experiment(c, replica_hparams=True) for c in configs]
  first = exps[0]
  if any(not _same(e.examples, first.examples) for e in exps[1:]):
    raise ValueError('The replicas\' device-resident data differ (a '
                     'partition that depends on config.seed): pass '
                     'config.data_placement=host.')
  num_rounds = configs[0].num_rounds
  ckpts, trees = [], []
  with contextlib.ExitStack() as stack:
    for c, wd, e in zip(configs, workdirs, exps):
      workdir_lib.make_workdir(wd)
      stack.enter_context(workdir_lib.RunLock(wd, 0))
      ckpt = checkpoints.RunCheckpointer(os.path.join(wd, 'checkpoints'),
                                         c.checkpoint_keep)
      stack.callback(ckpt.close)
      workdir_lib.check_config(wd, c, resuming=workdir_lib.has_checkpoints(
          os.path.join(wd, 'checkpoints')))
      ckpts.append(ckpt)
      trees.append(_tree(e, e.init_state(), 0))
    # The newest round every replica has (metrics and checkpoint) of.
    common = min(min(metrics_lib.complete_rounds(wd),
                     max([s for s in k.all_steps()] or [0]))
                 for wd, k in zip(workdirs, ckpts))
    restored = [k.restore_latest(tree, max_step=common)
                for k, tree in zip(ckpts, trees)]
    start = min(step or 0 for _, step in restored)
    if any((step or 0) != start for _, step in restored):
      restored = [k.restore_latest(tree, max_step=start)
                  for k, tree in zip(ckpts, trees)]
      if any((step or 0) != start for _, step in restored):
        raise ValueError('The replicas\' checkpoints share no round; use '
                         'fresh workdirs.')
    states = [item['state'] for item, _ in restored]
    if start:
      log(f'replicas: resuming from round {start}')
    writers = [stack.enter_context(contextlib.closing(
        metrics_lib.MetricWriter(wd, resume_round=start,
                                 tensorboard=False, config=c)))
               for c, wd in zip(configs, workdirs)]
    place = replica_placement(configs[0], len(exps), first.mesh)
    state = place(stack_replicas([jax.tree.map(jnp.asarray, s)
                                  for s in states]))
    peak = None
    if start < num_rounds:  # the compiled program's peak, all R replicas
      peak = first.round_fns.replica_peak_bytes(
          state, place(stack_replicas([e.cohort(start).cohort
                                       for e in exps])),
          place(stack_replicas([e.round_key(start) for e in exps])),
          round_num=start, examples=first.examples)
    last: list[dict[str, Any]] = [{} for _ in exps]
    for r in range(start, num_rounds):
      t_round = time.time()
      cohorts = [e.cohort(r) for e in exps]
      keys = place(stack_replicas([e.round_key(r) for e in exps]))
      state, m = first.round_fns.replica_step(
          state, place(stack_replicas([c.cohort for c in cohorts])), keys,
          round_num=r, examples=first.examples)
      done = r + 1
      per = unstack_replicas(jax.device_get(state), len(exps)) if (
          done % configs[0].eval_every == 0 or done == num_rounds
          or done % configs[0].checkpoint_every == 0) else None
      seconds = (time.time() - t_round) / len(exps)
      for i, (e, w) in enumerate(zip(exps, writers)):
        mi = jax.tree.map(lambda x, i=i: np.asarray(x)[i], m)
        record = {k: float(v) for k, v in mi._asdict().items()
                  if not k.startswith('client_')}
        record.update(e.device_metrics(r, cohorts[i].tiers, mi,
                                       cohorts[i].cohort.steps_run))
        if done % configs[0].eval_every == 0 or done == num_rounds:
          record.update(e.eval_metrics(per[i].params, done))
        record['round_seconds'] = seconds  # this replica's share
        w.write(done, record)
        last[i] = {'round': done, **record}
        if done % configs[0].checkpoint_every == 0 or done == num_rounds:
          ckpts[i].save(done, _tree(e, per[i], done))
  final = unstack_replicas(jax.device_get(state), len(exps))
  one = sum(x.nbytes for x in jax.tree.leaves(final[0]))
  summaries = []
  for c, wd, e, s, l in zip(configs, workdirs, exps, final, last):
    history = metrics_lib.read_metrics(wd)
    if not l and history:
      l = dict(history[-1])
    summary = {
        'final_metrics': metrics_lib.to_python(l),
        'rounds': num_rounds, 'resumed_from_round': start,
        'wall_time_seconds': time.time() - t0,
        'params_sha256': params_sha256(s.params),
        'technique': e.round_fns.technique.name,
        'replicas': len(exps), 'replica_state_bytes': int(one),
        # The round program's peak over its R replicas (its share on a
        # 'replicas' mesh: / devices).
        'replica_program_peak_bytes': peak,
        'peak_bytes_per_replica': None if peak is None else peak / len(exps),
        'device_cost': e.cost_table(),
        'config': json.loads(c.to_json_best_effort()),
        'versions': versions()}
    workdir_lib.write_atomic(os.path.join(wd, 'summary.json'),
                             json.dumps(summary, indent=2))
    summaries.append(summary)
  return summaries


def replica_placement(config, num: int, mesh=None):
  """`config.mesh_replicas` n > 0 (-1: every device): a function that
  shards trees with a leading replica axis over a Mesh's 'replicas' axis
  (n must divide the R replicas); the jitted, vmapped round is
  partitioned along it, each device (or, beside `config.mesh_clients`,
  each block of client devices of the Experiment's 2-D `mesh`) running R
  / n replicas. Else the identity."""
  n = config.get('mesh_replicas', 0)
  if not n:
    return lambda tree: tree
  if mesh is not None and REPLICAS_AXIS in mesh.axis_names:
    n = mesh.shape[REPLICAS_AXIS]
  else:
    n = jax.device_count() if n == -1 else n
    mesh = None
  if not 1 <= n <= jax.device_count() or num % n:
    raise ValueError(f'config.mesh_replicas={n} must divide the {num} '
                     f'replicas and be at most the {jax.device_count()} '
                     'devices.')
  if mesh is None:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n]), (REPLICAS_AXIS,))
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(REPLICAS_AXIS))
  return lambda tree: jax.device_put(tree, sharding)


def _tree(e: Experiment, state, done: int) -> dict[str, Any]:
  """A replica's checkpoint: as a single run's (`run.run_rounds`)."""
  return {'state': state,
          'rng': np.asarray(jax.random.key_data(e.base_key)),
          'sampler': np.asarray([e.config.seed, done], np.int64)}
