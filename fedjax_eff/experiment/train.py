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

import functools
import json
import os
import platform
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_eff import accounting
from fedjax_eff import core
from fedjax_eff import ssl
from fedjax_eff import techniques as techniques_lib
from fedjax_eff.core import evaluation
from fedjax_eff.data import cohort as cohort_lib
from fedjax_eff.data import registry as data_registry
from fedjax_eff.experiment import callbacks as callbacks_lib
from fedjax_eff.experiment import checkpoints
from fedjax_eff.experiment import errors
from fedjax_eff.experiment import loop as loop_lib
from fedjax_eff.experiment import metrics as metrics_lib
from fedjax_eff.experiment import placement
from fedjax_eff.experiment import workdir as workdir_lib
from fedjax_eff.experiment.validation import validate_config
from fedjax_eff.models import get_model


def params_sha256(params: Any) -> str:
  """SHA-256 of the parameters' bytes, leaves in sorted-path order."""
  return checkpoints.tree_sha256(params)


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


class RoundInput(NamedTuple):
  """What the loop prefetches for a round."""
  cohort: Any           # Cohort or IndexedCohort (this process's part)
  part_of: Any          # (K, tiers) when split across processes, else None
  tiers: np.ndarray     # [K] device tier of every client of the cohort


class Experiment:
  """Everything a run is built from, derived from a config (no state)."""

  def __init__(self, config: ml_collections.ConfigDict):
    validate_config(config)
    self.config = config
    self.data = data_registry.load(config.data)
    kwargs = dict(config.model.kwargs)
    if self.data.tasks:  # one head (and module set) per task
      if config.model.name not in ('transformer', 'vit'):
        raise ValueError(f'config.data.tasks needs a model with per-task '
                         f'heads (transformer, vit), not '
                         f'config.model.name={config.model.name!r}.')
      kwargs.setdefault('num_tasks', len(self.data.tasks))
      kwargs.setdefault('task_classes', self.data.task_classes)
    # The output size is the number of classes unless the config says
    # otherwise (e.g. a contrastive projection's dimension).
    self.model = get_model(config.model.name,
                           kwargs.pop('num_classes', self.data.num_classes),
                           **kwargs)
    self.task = make_task(config.task)
    self.base_key = jax.random.key(config.seed)
    c = config.client
    self.client_optimizer = core.make_optimizer(
        c.optimizer, c.learning_rate, **dict(c.optimizer_kwargs))
    s = config.server
    self.server_optimizer = core.make_optimizer(
        s.optimizer, s.learning_rate, **dict(s.optimizer_kwargs))
    example = self.data.train.client(0)
    self.example_batch = {k: np.zeros((c.batch_size,) + v.shape[1:], v.dtype)
                          for k, v in example.items()}
    self._measured: dict[Any, accounting.DeviceCost] = {}
    # Initialise on the data's own dtype: token models embed integers.
    x_dtype = example['x'].dtype if 'x' in example else np.float32
    init_input = np.zeros((1,) + tuple(self.data.input_shape), x_dtype)
    if config.task.name == 'ctc':  # speech models read (frames, lengths)
      init_input = (init_input, np.ones((1,), np.int32))
    self.init_params = self.model.init(
        jax.random.fold_in(self.base_key, 0x1417), init_input)['params']
    if config.init_checkpoint:
      from fedjax_eff.experiment import pretrain  # pylint: disable=g-import-not-at-top
      self.init_params = pretrain.load_params(
          config.init_checkpoint, self.init_params,
          skip=config.init_checkpoint_skip)
    self.technique = techniques_lib.build(
        config.techniques, techniques_lib.TechniqueContext(
            self.model, self.init_params, self.device_cost))
    if self.data.tasks:
      self.technique = core.chain(self.technique,
                                  techniques_lib.task_routing(self.model))
    self.tier_of = client_tiers(self.data.train.num_clients,
                                list(config.devices.tier_fractions),
                                config.seed)
    self.num_tiers = max(1, len(config.devices.tier_fractions))
    if self.data.tasks:
      # A client's task is its static program, dispatched like a tier.
      if config.devices.tier_fractions:
        raise ValueError('config.data.tasks and config.devices.'
                         'tier_fractions do not combine: a client\'s tier '
                         'is its task.')
      self.tier_of = self.data.client_task
      self.num_tiers = len(self.data.tasks)
    self.mesh = placement.make_mesh(config.mesh_clients)
    self.resident, self.examples = None, None
    if config.mode == 'federated' and placement.on_device(
        config.data_placement, placement.nbytes(self.data.train)):
      self.resident = cohort_lib.ResidentData.of(self.data.train)
      self.examples = placement.put_replicated(self.resident.examples,
                                               self.mesh)
    self.sampler = cohort_lib.CohortSampler(
        self.data.train.num_clients, config.clients_per_round, config.seed)
    self.autotune_seconds = None
    self.split_cohort = False
    chunk = config.chunk_size
    if chunk == -1 and jax.process_count() > 1:
      raise ValueError('config.chunk_size=-1 (autotune) runs in one process; '
                       'with several, tune once on one process and pass the '
                       'chosen config.chunk_size.')
    if chunk == -1 and config.mode == 'federated':
      chunk, self.autotune_seconds = self.autotune_chunk_size()
    self.chunk_size = max(chunk, 0) or core.default_chunk_size(
        config.clients_per_round)
    placement.check_round_fits(
        config, example_bytes=sum(
            v.dtype.itemsize * int(np.prod(v.shape[1:]))
            for v in example.values()),
        param_bytes=int(sum(x.nbytes for x in jax.tree.leaves(
            self.init_params))),
        on_device_data=self.examples is not None,
        chunk=min(self.chunk_size, config.clients_per_round),
        activation_bytes=lambda: placement.activation_bytes_per_example(
            self.model, self.task, self.init_params, self.example_batch))
    self.round_fns = self.build_round(self.chunk_size)
    # Each process packs only the clients its own devices train.
    self.split_cohort = self.mesh is not None and jax.process_count() > 1
    self.evaluate = evaluation.build_evaluator(self.model, self.task,
                                               config.eval_batch_size)
    self.error_rates = None
    if config.task.name == 'ctc':  # CER/WER of greedy decodes, on the host
      from fedjax_eff.core import speech_metrics  # pylint: disable=g-import-not-at-top
      from fedjax_eff.data import speech  # pylint: disable=g-import-not-at-top
      self.error_rates = speech_metrics.build_error_rate_evaluator(
          self.model, speech.decode_ids, config.eval_batch_size)
    self.costs: dict[Any, accounting.DeviceCost] = {}

  def build_round(self, chunk_size: int, donate: bool = True
                  ) -> core.RoundFns:
    return core.build_round(
        self.model, self.task, self.technique, self.client_optimizer,
        self.server_optimizer, chunk_size=chunk_size,
        prox_mu=self.config.client.prox_mu, num_tiers=self.num_tiers,
        donate=donate, mesh=self.mesh)

  def autotune_chunk_size(self) -> tuple[int, dict[int, float]]:
    """The fastest chunk width on round 0's cohort (cached on disk)."""
    cohort = self.cohort(0).cohort
    fns = self.build_round(1, donate=False)
    key = core.autotune.cache_key(
        self.model, fns.technique.name, cohort,
        mesh_size=self.mesh.size if self.mesh else 1,
        extra=repr((self.config.client, self.config.techniques,
                    self.config.devices)))
    return core.autotune.autotune_chunk_size(
        lambda c: self.build_round(c, donate=False),
        fns.init(self.init_params), cohort, self.round_key(0), key=key,
        examples=self.examples, log=print)

  def init_state(self) -> core.ServerState:
    return self.round_fns.init(self.init_params)

  def cohort(self, round_num: int) -> RoundInput:
    """Round `round_num`'s cohort: row indices into the device-resident
    examples, or (host placement) the examples packed on the host. Under
    `jax.distributed`, only the clients of this process's slots."""
    c = self.config.client
    ids = self.sampler.sample(round_num)
    tiers = self.tier_of[ids]
    part_of, mine = None, ids
    if self.split_cohort:
      part_of = (len(ids), tiers)
      mine = ids[np.minimum(self.round_fns.local_part(*part_of),
                            len(ids) - 1)]
    kw = dict(steps=c.local_steps, batch_size=c.batch_size,
              seed=self.config.seed, round_num=round_num,
              policy_large=c.policy_large, policy_small=c.policy_small,
              weighting=c.weighting, ctx={'tier': self.tier_of[mine]})
    if self.resident is not None:
      cohort = cohort_lib.pack_index(self.resident, mine, **kw)
    else:
      cohort = cohort_lib.pack(self.data.train, mine, **kw)
    return RoundInput(cohort, part_of, tiers)

  def device_cost(self, technique) -> accounting.DeviceCost:
    """What one device pays to run `technique` (a static program).

    Cached by what defines the program: the technique's name, its static
    trainable mask and static forward kwargs (so e.g. the n chosen for a
    tier reuses the measurement made while choosing it).
    """
    ctx = {'client_index': np.int32(0), 'tier': np.int32(0)}
    found = core.technique.trace_plan(core.chain(technique),
                                      self.init_params, ctx)
    key = (technique.name, str(jax.tree.leaves(found['flags'])),
           str(sorted(found['forward'].items())))
    if key not in self._measured:
      self._measured[key] = accounting.client_cost(
          self.model, self.task, technique, self.client_optimizer,
          self.init_params, self.example_batch,
          self.config.client.local_steps, ctx, self.config.client.prox_mu)
    return self._measured[key]

  def program(self, round_num: int, tier: int = 0):
    """The technique clients of `tier` run in round `round_num`."""
    tech = self.round_fns.technique
    stage = tech.stage(round_num) if tech.stage else None
    if tech.specialize:
      return stage, tech.specialize(stage, tier)
    return stage, tech

  def program_cost(self, round_num: int, tier: int) -> accounting.DeviceCost:
    stage, program = self.program(round_num, tier)
    key = (stage, tier if self.round_fns.technique.specialize else 0)
    if key not in self.costs:
      self.costs[key] = self.device_cost(
          core.technique.device_program(program))
    return self.costs[key]

  def device_metrics(self, round_num: int, tiers, m) -> dict[str, float]:
    """Per-client device cost of the round: means over the cohort and per
    tier (bits as measured in the round, peak/FLOPs from the compiled
    single-client program of each tier); `tiers`: each client's tier."""
    tiers = np.asarray(tiers)
    up = np.asarray(m.client_upload_bits)
    down = np.asarray(m.client_download_bits)
    out: dict[str, float] = {}
    peak = np.zeros(len(tiers))
    flops = np.zeros(len(tiers))
    for t in range(self.num_tiers):
      sel = tiers == t
      if self.config.accounting:
        cost = self.program_cost(round_num, t)
        peak[sel], flops[sel] = cost.peak_bytes or 0, cost.flops_per_round or 0
      if self.num_tiers > 1 and sel.any():
        out[f'tier{t}/upload_bits'] = float(up[sel].mean())
        out[f'tier{t}/download_bits'] = float(down[sel].mean())
        if self.config.accounting:
          out[f'tier{t}/device_peak_bytes'] = float(peak[sel].mean())
          out[f'tier{t}/device_flops_per_round'] = float(flops[sel].mean())
    if self.config.accounting:
      out['device_peak_bytes'] = float(peak.mean())
      out['device_flops_per_round'] = float(flops.mean())
    return out

  def round_key(self, round_num: int) -> jax.Array:
    return jax.random.fold_in(self.base_key, round_num)

  def eval_metrics(self, params, round_num: int) -> dict[str, float]:
    """Central metrics of the model as the stage of `round_num` runs it
    (e.g. layer-wise: up to the active layer, with its head)."""
    _, program = self.program(max(round_num - 1, 0))
    fwd = core.technique.server_forward(
        program, params, {'client_index': np.int32(0), 'tier': np.int32(0)})
    if self.config.task.name == 'contrastive':
      return self.probe_metrics(params, fwd)
    if self.data.tasks:
      return self.task_metrics(params, round_num)
    out = central_metrics(functools.partial(self.evaluate, params, **fwd),
                          self.data.test, self.data.heldout)
    if self.config.task.name == 'lm':
      out.update(with_perplexity(out))
    if self.error_rates is not None:
      out.update(self.speech_metrics(params, fwd))
    return out

  def speech_metrics(self, params, fwd, prefix: str = ''
                     ) -> dict[str, float]:
    """`test_cer`, `test_wer` (and held-out) of greedy CTC decodes."""
    out = {}
    for split, arrays in self._eval_splits():
      for k, v in self.error_rates(params, arrays, **fwd).items():
        out[f'{prefix}{split}_{k}'] = v
    return out

  def _eval_splits(self):
    if self.data.test is not None:
      yield 'test', self.data.test
    if self.data.heldout is not None and self.data.heldout.num_clients:
      yield 'heldout', self.data.heldout.concatenated()


  def submodel_metrics(self, params, keeps=(0.25, 0.5, 0.75, 1.0)
                       ) -> dict[str, float]:
    """Nested sub-models (federated dropout): the first `keep` of the
    units of every width group, evaluated alone (Guliani et al.: a model
    trained with federated dropout serves smaller devices as it is)."""
    from fedjax_eff.techniques import federated_dropout  # pylint: disable=g-import-not-at-top
    out = {}
    for keep in keeps:
      sub, fwd = federated_dropout.submodel(self.model, params, keep)
      for split, arrays in self._eval_splits():
        m = self.evaluate(sub, arrays, **fwd)
        out[f'keep{keep:g}/{split}_loss'] = m['loss']
        out[f'keep{keep:g}/{split}_accuracy'] = m['accuracy']
      if self.error_rates is not None:
        out.update(self.speech_metrics(sub, fwd, f'keep{keep:g}/'))
    return out

  def task_metrics(self, params, round_num: int) -> dict[str, float]:
    """Each task's test (and held-out) metrics with that task's program
    (its modules and head); `test_accuracy` is the mean over tasks."""
    out = {}
    for t, bundle in enumerate(self.data.tasks):
      _, program = self.program(max(round_num - 1, 0), t)
      fwd = core.technique.server_forward(
          program, params, {'client_index': np.int32(0),
                            'tier': np.int32(t)})
      fwd.setdefault('task', t)
      evaluate = functools.partial(self.evaluate, **fwd)
      for split, arrays in (('test', bundle.test),
                            ('heldout', bundle.heldout.concatenated()
                             if bundle.heldout is not None else None)):
        if arrays is not None:
          m = evaluate(params, arrays)
          out[f'task{t}/{split}_loss'] = m['loss']
          out[f'task{t}/{split}_accuracy'] = m['accuracy']
    for split in ('test', 'heldout'):
      accs = [v for k, v in out.items() if k.endswith(f'/{split}_accuracy')]
      if accs:
        out[f'{split}_accuracy'] = float(np.mean(accs))
    return out

  def probe_metrics(self, params, fwd) -> dict[str, float]:
    """Linear probe on frozen features: fit on the labelled training
    clients' examples, report accuracy on the test set (and held-out
    clients)."""
    t = self.config.task
    fwd = dict(fwd, stop_below=None)
    train = _take(self.data.train.concatenated(), t.probe_max_examples)
    out = {}
    for name, split in (('test', self.data.test),
                        ('heldout', self.data.heldout.concatenated()
                         if self.data.heldout is not None
                         and self.data.heldout.num_clients else None)):
      if split is None:
        continue
      m = ssl.probe_accuracy(self.model, params, train,
                             _take(split, t.probe_max_examples),
                             self.data.num_classes, steps=t.probe_steps,
                             batch_size=self.config.eval_batch_size, **fwd)
      out[f'{name}_accuracy'] = m['test_accuracy']
      out['probe_train_accuracy'] = m['train_accuracy']
    return out


def central_metrics(evaluate, test, heldout) -> dict[str, float]:
  """`test_*` on the central test set, `heldout_*` on the held-out clients
  (pooled, and `heldout_client_accuracy_mean`, the mean over clients of
  each one's accuracy), each set evaluated once: one pass over the pooled
  held-out examples gives both held-out figures (per-client sums by
  segment), and a test set that *is* the held-out clients' examples (the
  stdlib corpus) is not evaluated again.

  `evaluate(arrays, segments=None)`: a `build_evaluator` function with the
  params (and forward kwargs) bound.
  """
  out: dict[str, float] = {}
  pooled = None
  if heldout is not None and heldout.num_clients:
    pooled = heldout.concatenated()
    n = heldout.num_clients
    m = evaluate(pooled, segments=np.repeat(np.arange(n),
                                            heldout.client_sizes))
    sums = np.zeros((n, 4))
    sums[:len(m['segment_sums'])] = m['segment_sums']
    out.update(heldout_loss=m['loss'], heldout_accuracy=m['accuracy'],
               heldout_client_accuracy_mean=float(np.mean(
                   sums[:, 1] / np.maximum(sums[:, 3], 1.0))))
  if test is not None:
    if pooled is not None and _same_arrays(test, pooled):
      out.update(test_loss=out['heldout_loss'],
                 test_accuracy=out['heldout_accuracy'])
    else:
      m = evaluate(test)
      out.update(test_loss=m['loss'], test_accuracy=m['accuracy'])
  return out


def _same_arrays(a, b) -> bool:
  return a.keys() == b.keys() and all(
      np.shape(a[k]) == np.shape(b[k]) and np.array_equal(a[k], b[k])
      for k in a)


def _take(arrays, n):
  return {k: v[:n] for k, v in arrays.items()}


def with_perplexity(metrics: dict[str, float]) -> dict[str, float]:
  """`<split>_perplexity = exp(<split>_loss)` for each per-token loss."""
  return {k[:-len('loss')] + 'perplexity': float(np.exp(v))
          for k, v in metrics.items() if k.endswith('_loss')}


def make_task(config) -> core.Task:
  if config.name == 'classification':
    return core.classification()
  if config.name == 'lm':
    return core.next_token(config.pad_id, config.eos_id, config.oov_id)
  if config.name == 'ctc':
    return core.ctc()
  if config.name == 'contrastive':
    t = ssl.contrastive_task(config.temperature, **dict(config.augment))
    return core.Task(inputs=t.inputs, loss=t.loss, correct=t.correct,
                     augment=t.augment)
  raise ValueError(f"config.task.name={config.name!r} is not one of "
                   "('classification', 'contrastive', 'lm', 'ctc').")


def client_tiers(num_clients: int, fractions, seed: int) -> np.ndarray:
  """Each client's device tier, drawn once from `fractions` (seeded)."""
  if not fractions:
    return np.zeros(num_clients, np.int32)
  p = np.asarray(fractions, np.float64)
  if np.any(p < 0) or not np.isclose(p.sum(), 1.0):
    raise ValueError(f'config.devices.tier_fractions={list(fractions)} must '
                     'be non-negative and sum to 1.')
  rng = np.random.default_rng([seed, 0x7132])
  return rng.choice(len(p), size=num_clients, p=p).astype(np.int32)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       *, progress: bool | None = None,
                       allow_config_change: tuple[str, ...] = (),
                       callbacks: tuple[Any, ...] = ()) -> dict[str, Any]:
  """Runs (or resumes) the experiment in `workdir`; returns the summary.

  The workdir is locked for the run (`workdir_lib.RunLock`), its recorded
  config must match (`workdir_lib.check_config`; `allow_config_change`
  names trajectory keys the caller knowingly changes). Ends with
  `errors.RunRefused` (bad input), `RunFailed` (I/O, memory, a run that
  stopped learning) or `RunInterrupted` (a signal, after saving).
  `callbacks`: the user's hooks (`experiment/callbacks.py`).
  """
  if config.get('mode') == 'local':  # no server: experiment/local.py
    from fedjax_eff.experiment import local  # pylint: disable=g-import-not-at-top
    return local.train_local(config, workdir, progress=progress,
                             allow_config_change=allow_config_change,
                             callbacks=callbacks)
  validate_config(config)  # before anything touches the workdir
  workdir_lib.make_workdir(workdir)
  with workdir_lib.RunLock(workdir, jax.process_index()):
    with errors.translated(workdir):
      summary = _train(config, workdir, progress, allow_config_change,
                       callbacks)
  callbacks_lib.call(callbacks, 'on_run_end', summary)
  return summary


def resume_point(workdir: str, ckpt: checkpoints.RunCheckpointer,
                 target: Any) -> tuple[Any, int | None]:
  """The newest good checkpoint whose rounds metrics.jsonl holds in full
  (a torn or lost line is re-run from the step before it); newer
  checkpoints are removed, the run re-creates them."""
  complete = metrics_lib.complete_rounds(workdir)
  steps = ckpt.all_steps()
  restored, step = ckpt.restore_latest(target, max_step=complete)
  if steps and steps[-1] > (step or 0):
    if steps[-1] > complete:
      print(f'WARNING: metrics.jsonl holds rounds 1..{complete} only; '
            f'resuming from round {step or 0} and re-running the rest.',
            flush=True)
    ckpt.delete_after(step or 0)
  elif complete > (step or 0):
    # Rounds logged after the newest checkpoint: killed between the two, or
    # a checkpoint missing (deleted, moved aside as unreadable).
    print(f'WARNING: no checkpoint after round {step or 0}, but '
          f'metrics.jsonl holds rounds to {complete}: re-running rounds '
          f'{(step or 0) + 1}..{complete} (deterministic: same results).',
          flush=True)
  return restored, step


def _train(config, workdir, progress, allow_config_change, callbacks):
  t0 = time.time()
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if jax.process_index() == 0:
    workdir_lib.check_config(workdir, config,
                             resuming=workdir_lib.has_checkpoints(ckpt_dir),
                             allow=allow_config_change)
  exp = Experiment(config)
  state = exp.init_state()
  ckpt = checkpoints.RunCheckpointer(ckpt_dir, config.checkpoint_keep)
  main_workdir = workdir
  if jax.process_index() > 0:  # under jax.distributed: process 0 reports
    workdir = os.path.join(workdir, f'process{jax.process_index()}')
    os.makedirs(workdir, exist_ok=True)
  target = {'state': state,
            'rng': np.asarray(jax.random.key_data(exp.base_key)),
            'sampler': np.asarray([config.seed, 0], np.int64)}
  restored, saved_round = resume_point(main_workdir, ckpt, target)
  start = 0
  if saved_round is not None:
    if not np.array_equal(np.asarray(restored['rng']),
                          np.asarray(target['rng'])):
      raise errors.RunRefused(
          f'The checkpoint in {workdir} was written with another '
          'config.seed; use a fresh --workdir.')
    state = jax.tree.map(jnp.asarray, restored['state'])
    start = int(state.round)
    workdir_lib.announce_resume(start, config.num_rounds, workdir)
  current = {'state': state}

  def step(r, this: RoundInput):
    current['state'], m = exp.round_fns.round_step(
        current['state'], this.cohort, exp.round_key(r), round_num=r,
        examples=exp.examples, part_of=this.part_of)
    record = {k: float(v) for k, v in m._asdict().items()
              if not k.startswith('client_')}
    t_acc = time.time()
    record.update(exp.device_metrics(r, this.tiers, m))
    return record, time.time() - t_acc

  def save(done):
    ckpt.save(done, {'state': current['state'], 'rng': target['rng'],
                     'sampler': np.asarray([config.seed, done], np.int64)})

  try:
    last, compile_s = loop_lib.run_rounds(
        config, workdir, start, cohort=exp.cohort, step=step,
        evaluate=lambda done: exp.eval_metrics(current['state'].params,
                                               done),
        save=save, progress=progress, callbacks=callbacks,
        # under jax.distributed only process 0 writes events
        tensorboard=config.tensorboard and jax.process_index() == 0)
  finally:
    ckpt.close()
  state = current['state']
  history = metrics_lib.read_metrics(workdir)
  if not last and history:  # resumed a finished run: report its last round
    last = dict(history[-1])
  if 'test_accuracy' not in last and 'heldout_accuracy' not in last:
    last.update(exp.eval_metrics(state.params, int(state.round)))
  keeps = list(config.get('submodel_keeps', ()))
  if not keeps and any(t.get('name') == 'federated_dropout'
                       for t in config.techniques):
    keeps = [0.25, 0.5, 0.75, 1.0]
  if keeps:
    last.update(exp.submodel_metrics(state.params, tuple(keeps)))
  if config.accounting and not exp.costs:  # resumed a finished run
    for t in range(exp.num_tiers):
      exp.program_cost(max(int(state.round) - 1, 0), t)
  summary = {
      'final_metrics': metrics_lib.to_python(last),
      'rounds': int(state.round),
      'resumed_from_round': start,
      'wall_time_seconds': time.time() - t0,
      'first_round_seconds_incl_compile': compile_s,
      'train_wall_time_seconds_total': float(sum(
          h.get('round_seconds', 0.0) for h in history)),
      'server_steps_skipped': int(sum(
          h.get('server_step_skipped') or 0 for h in history)),
      'failed_rounds': int(sum(loop_lib.failed_round(h) for h in history)),
      'params_sha256': params_sha256(state.params),
      'technique': exp.round_fns.technique.name,
      'chunk_size': exp.chunk_size,
      'chunk_autotune_seconds': exp.autotune_seconds,
      'data_placement': 'device' if exp.examples is not None else 'host',
      'mesh_devices': exp.mesh.size if exp.mesh else 0,
      'processes': jax.process_count(),
      'device_cost': [dict(stage=repr(stage), tier=tier, **cost.as_dict())
                      for (stage, tier), cost in exp.costs.items()],
      'num_params': int(sum(np.size(x)
                            for x in jax.tree.leaves(state.params))),
      # The model every client downloads once before its first round (per
      # round downloads are in metrics.jsonl).
      'initial_download_bits': core.technique.tree_bits(state.params),
      'config': json.loads(config.to_json_best_effort()),
      'versions': versions(),
  }
  workdir_lib.write_atomic(os.path.join(workdir, 'summary.json'),
                           json.dumps(summary, indent=2))
  return summary
