"""Fully-local training: every client trains only on its own data, forever.

The baseline of FedYolo (Zhang et al. 2023, "FedYolo: Augmenting Federated
Learning with Pretrained Transformers") and of most personalisation papers:
what would each device reach with no federation at all? Selected by
`config.mode = 'local'`; `train_and_evaluate` hands such configs here.

What runs is the federated program minus the server, so the comparison with
a federated run isolates exactly one thing (the averaging):

* `build.Experiment(config)` builds the data, model, task, technique,
  optimizers and `round_fns`; nothing is re-derived here.
* `config.local.num_clients` training clients (0 = `clients_per_round`) are
  drawn once (seeded) and kept for the whole run.
* Each starts from `exp.init_params` (so `init_checkpoint` applies) and each
  round runs the technique's single-client update of its stage and device
  tier (`core.build_client_update` of that program: `local_steps` steps on a
  batch packed from its own data by `cohort_lib.pack(..., round_num=r)`),
  then applies its own update to its own params: `x <- x - Δ`, since
  `ClientOutput.delta` is `x_start - x_trained`. That is a federated round
  with a cohort of one and FedAvg at server learning rate 1, so techniques
  (head-only, LoRA modules, layer-wise stages, per-tier programs) train
  exactly what they train in a federated run. A non-finite update is
  dropped (the client keeps its params), as the federated round drops it.
* No server, no averaging, no communication: each client downloads the
  initial model once (recorded in the summary) and nothing travels after
  that (`upload_bits` = `download_bits` = 0 every round). The technique's
  upload codec is left out (nothing is uploaded, so e.g. `quantize` does
  not round the local updates).

Execution: client params live stacked on a leading axis `[N, ...]`; per
round, one jitted call per device tier gathers that tier's clients, runs the
single-client update over them with `lax.map(..., batch_size=C)` (a vmap of
`C = config.chunk_size` clients inside a scan, as the federated round
chunks its cohort) and scatters the results back. Client `i`'s randomness is
`fold_in(round_key(r), client index)`, so a client's trajectory depends on
its own data, its index and the seed only: not on the other clients, on `C`
or on the tier grouping.

The run itself is the skeleton every mode shares (`run.session`,
`run.run_rounds`; `LocalMode` is this mode's part): metrics.jsonl,
summary.json (the federated keys where they make sense, plus `mode:
'local'`), TensorBoard events and orbax checkpoints of the stacked params;
a resumed run ends with the same `params_sha256` (of the stacked params) as
an unbroken one. Evaluation is the task's (`exp.evaluation.central`), per
client.
"""

from __future__ import annotations

import functools
import time
import types
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_eff import core
from fedjax_eff.core import codecs
from fedjax_eff.core import placement
from fedjax_eff.core import round as round_lib
from fedjax_eff.data import cohort as cohort_lib
from fedjax_eff.experiment import errors
from fedjax_eff.experiment import metrics as metrics_lib
from fedjax_eff.experiment import run as run_lib
from fedjax_eff.experiment.build import Experiment
from fedjax_eff.experiment.build import params_sha256

PyTree = Any


class LocalStats(NamedTuple):
  """Per client (leading axis): what its local training saw this round."""
  loss_sum: jax.Array
  correct_sum: jax.Array
  num_examples: jax.Array  # loss units (examples; LM: tokens)
  num_scored: jax.Array    # accuracy units
  finite: jax.Array  # False: the update was non-finite and dropped


def build_local_step(client_update: Callable[..., round_lib.ClientOutput],
                     chunk_plan: Callable | None = None,
                     chunk_size: int | None = None) -> Callable:
  """`step(params, batches, mask, ctx, keys, round_num) -> (params, stats)`.

  Every argument but `round_num` has a leading client axis `N` (`params`
  too: one model per client). Each client runs `client_update` from its own
  params and applies its own update; clients never see each other. `C =
  chunk_size` clients are vmapped at a time inside a scan (None: the
  per-backend default of the federated round). A technique's `chunk_plan`
  is drawn per client (every client is its own chunk: there is no cohort).
  Not jitted: callers jit it with whatever they wrap around it.
  """
  def one(xs, round_num):
    params, batches, mask, ctx, key = xs
    cp = (chunk_plan(round_lib.chunk_key(key), round_num)
          if chunk_plan is not None else None)
    out = client_update(params, batches, mask, ctx, key, round_num, cp)
    ok = round_lib.tree_all_finite((out.delta, out.loss_sum))
    # delta = x_start - x_trained: the client's own model moves by -delta.
    new = jax.tree.map(lambda x, d: jnp.where(ok, x - d, x).astype(x.dtype),
                       params, out.delta)
    return new, LocalStats(out.loss_sum, out.correct_sum, out.num_examples,
                           out.num_scored, ok)

  def step(params, batches, mask, ctx, keys, round_num):
    n = mask.shape[0]
    c = placement.chunk_width(chunk_size, n)
    return jax.lax.map(lambda xs: one(xs, round_num),
                       (params, batches, mask, ctx, keys), batch_size=c)

  return step


def stack(params: PyTree, n: int) -> PyTree:
  """`n` copies of `params` on a new leading axis."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape).copy(),
                      params)


def unstack(params: PyTree, i: int) -> PyTree:
  return jax.tree.map(lambda x: x[i], params)


def sample_clients(num_train: int, num: int, seed: int) -> np.ndarray:
  """The simulated clients: `num` distinct training clients, drawn once."""
  if not 0 < num <= num_train:
    raise ValueError(f'config.local.num_clients={num} must be in [1, '
                     f'{num_train}] (the training clients).')
  rng = np.random.default_rng([seed, 0x10CA1])
  return np.sort(rng.choice(num_train, num, replace=False)).astype(np.int64)


def client_eval_metrics(exp: Experiment, params: PyTree, fwd: dict,
                        client_index: int) -> dict[str, float]:
  """One client's model, run as its program runs it (`fwd`), evaluated.

  The task's central metrics (`exp.evaluation.central`, the keys of
  `Experiment.eval_metrics` with one task) on the data the client is
  scored on (`DataBundle.client_view`: with several tasks, the test set
  and held-out clients of the client's own task, with its task's head).
  """
  data, task_kwargs = exp.data.client_view(client_index)
  return exp.evaluation.central(params, data, **dict(fwd, **task_kwargs))


class LocalTrainer:
  """The clients of a local run and one round / one evaluation of them.

  Stateless apart from compiled-function caches: the stacked params are
  passed in and returned, so the loop owns the state (and checkpoints it).
  """

  def __init__(self, exp: Experiment):
    self.exp = exp
    config = exp.config
    num = config.local.num_clients or config.clients_per_round
    self.clients = sample_clients(exp.data.train.num_clients, num,
                                  config.seed)
    self.tiers = np.asarray(exp.tier_of[self.clients], np.int32)
    self.tiered = exp.round_fns.technique.specialize is not None
    # One group per tier present (tier 0 for all when the technique does
    # not specialise per tier: one program, one call).
    groups = self.tiers if self.tiered else np.zeros_like(self.tiers)
    self.groups = {int(t): np.flatnonzero(groups == t)
                   for t in np.unique(groups)}
    self._steps: dict[Any, Callable] = {}

  @property
  def num_clients(self) -> int:
    return len(self.clients)

  def init(self) -> PyTree:
    return stack(self.exp.init_params, self.num_clients)

  def cohort(self, round_num: int) -> cohort_lib.Cohort:
    """Round `round_num`'s batches of every simulated client, packed as the
    federated round packs its cohort (same policies, same shuffles)."""
    cohort = cohort_lib.pack(self.exp.data.train, self.clients,
                             round_num=round_num, **self.exp.packing)
    return cohort._replace(ctx=dict(cohort.ctx, tier=self.tiers))

  def _step(self, stage, tier) -> Callable:
    """The jitted call of one (stage, tier): gather, train, scatter."""
    if (stage, tier) not in self._steps:
      tech = self.exp.round_fns.technique
      program = tech.specialize(stage, tier) if self.tiered else tech
      # Nothing is uploaded, so no codec runs: a client applies its own
      # update exactly as trained (a quantizer would only add noise).
      local_program = program._replace(
          encode=lambda msg, plan, rng: codecs.unsent(msg),
          decode=lambda msg, plan: msg)
      exp = self.exp
      client_update = round_lib.build_client_update(
          exp.model, exp.task, local_program, exp.client_optimizer,
          exp.config.client.prox_mu)
      step = build_local_step(client_update, program.chunk_plan,
                              max(exp.config.chunk_size, 0) or None)

      @functools.partial(jax.jit, donate_argnums=(0,))
      def tier_step(params, sel, batches, mask, ctx, keys, round_num):
        own = jax.tree.map(lambda x: x[sel], params)
        new, stats = step(own, batches, mask, ctx, keys, round_num)
        return jax.tree.map(lambda x, y: x.at[sel].set(y), params,
                            new), stats
      self._steps[(stage, tier)] = tier_step
    return self._steps[(stage, tier)]

  def client_keys(self, round_num: int) -> jax.Array:
    rng = self.exp.round_key(round_num)
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(
        jnp.asarray(self.clients, jnp.int32))

  def round(self, params: PyTree, cohort: cohort_lib.Cohort,
            round_num: int) -> tuple[PyTree, dict[str, Any]]:
    """One round of local training of every client; returns the new
    stacked params and per-client arrays (loss, accuracy, examples, ok)."""
    tech = self.exp.round_fns.technique
    stage = tech.stage(round_num) if tech.stage else None
    keys = self.client_keys(round_num)
    r = jnp.asarray(round_num, jnp.int32)
    n = self.num_clients
    loss, correct, examples, scored = (np.zeros(n, np.float32)
                                       for _ in range(4))
    finite = np.ones(n, bool)
    for tier, sel in self.groups.items():
      take = lambda x: np.asarray(x)[sel]  # pylint: disable=cell-var-from-loop
      params, stats = self._step(stage, tier)(
          params, jnp.asarray(sel, jnp.int32),
          {k: take(v) for k, v in cohort.batches.items()}, take(cohort.mask),
          {k: take(v) for k, v in cohort.ctx.items()}, keys[sel], r)
      loss[sel], correct[sel] = stats.loss_sum, stats.correct_sum
      examples[sel], finite[sel] = stats.num_examples, stats.finite
      scored[sel] = stats.num_scored
    return params, dict(loss_sum=loss, correct_sum=correct,
                        num_examples=examples, num_scored=scored,
                        finite=finite)

  def round_metrics(self, stats: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over clients (that trained and stayed finite) of each client's
    own training loss and accuracy this round."""
    ok = stats['finite'] & (stats['num_examples'] > 0)
    n = np.maximum(stats['num_examples'], 1.0)
    scored = np.maximum(stats['num_scored'], 1.0)
    mean = lambda x: float(np.mean(x[ok])) if ok.any() else float('nan')
    return dict(
        train_loss=mean(stats['loss_sum'] / n),
        train_accuracy=mean(stats['correct_sum'] / scored),
        num_clients=float(self.num_clients),
        num_dropped=float(np.sum(~stats['finite'])),
        upload_bits=0.0, download_bits=0.0)

  def device_metrics(self, round_num: int,
                     cohort: cohort_lib.Cohort) -> dict[str, float]:
    """What each device pays to train (peak memory, FLOPs of its program),
    as in a federated run; its communication is zero."""
    zeros = np.zeros(self.num_clients, np.float32)
    return self.exp.device_metrics(
        round_num, cohort.ctx['tier'], types.SimpleNamespace(
            client_upload_bits=zeros, client_download_bits=zeros),
        cohort.steps_run)

  def forward_kwargs(self, round_num: int, tier: int) -> dict:
    """Static model kwargs of the program a tier-`tier` client ran last."""
    _, program = self.exp.program(max(round_num - 1, 0),
                                  tier if self.tiered else 0)
    return core.technique.server_forward(
        program, self.exp.init_params,
        {'client_index': np.int32(0), 'tier': np.int32(tier)})

  def evaluate(self, params: PyTree, round_num: int
               ) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Every client's model on the evaluation sets: (aggregate, per client).

    Aggregates are means over clients, plus the min and max of
    `test_accuracy` (how unequal the local models are).
    """
    fwds = {t: self.forward_kwargs(round_num, t)
            for t in np.unique(self.tiers)}
    per_client = [
        client_eval_metrics(self.exp, unstack(params, i),
                            fwds[self.tiers[i]], int(self.clients[i]))
        for i in range(self.num_clients)]
    out = {k: float(np.mean([m[k] for m in per_client]))
           for k in per_client[0]} if per_client else {}
    if 'test_accuracy' in out:
      acc = [m['test_accuracy'] for m in per_client]
      out.update(test_accuracy_min=float(np.min(acc)),
                 test_accuracy_max=float(np.max(acc)))
    return out, per_client


class LocalMode:
  """Local rounds of every simulated client (`run.RoundMode`); the
  checkpoint holds the stacked client params and which clients they are."""

  desc = 'local rounds'

  def __init__(self, exp: Experiment):
    self.exp = exp
    self.trainer = LocalTrainer(exp)
    self.params = self.trainer.init()
    self.per_client: list[dict[str, float]] = []

  def state(self) -> dict[str, Any]:
    return {'state': {'params': self.params,
                      'round': np.zeros((), np.int32)},
            'clients': self.trainer.clients}

  def restore(self, restored: dict[str, Any]) -> int:
    if not np.array_equal(np.asarray(restored['clients']),
                          self.trainer.clients):
      raise errors.RunRefused(
          'The checkpoint simulates other clients (config.local.num_clients '
          'or the data changed); use a fresh --workdir.')
    self.params = jax.tree.map(jnp.asarray, restored['state']['params'])
    return int(restored['state']['round'])

  def cohort(self, round_num: int) -> cohort_lib.Cohort:
    return self.trainer.cohort(round_num)

  def step(self, r: int, cohort) -> tuple[dict[str, float], float]:
    self.params, stats = self.trainer.round(self.params, cohort, r)
    record = self.trainer.round_metrics(stats)
    t_acc = time.time()
    record.update(self.trainer.device_metrics(r, cohort))
    return record, time.time() - t_acc

  def evaluate(self, done: int) -> dict[str, float]:
    metrics, self.per_client = self.trainer.evaluate(self.params, done)
    return metrics

  def checkpoint(self, done: int) -> dict[str, Any]:
    return {'state': {'params': self.params,
                      'round': np.asarray(done, np.int32)},
            'clients': self.trainer.clients}

  def finish(self, last: dict[str, Any], rounds: int,
             history: list[dict[str, Any]]) -> dict[str, Any]:
    """Evaluates the clients' final models if this process did not, and
    returns the local summary fields (per-client metrics included)."""
    del history
    exp, trainer = self.exp, self.trainer
    if not self.per_client:  # the last round was not evaluated here
      metrics, self.per_client = trainer.evaluate(self.params, rounds)
      last.update(metrics)
    model_bits = float(core.technique.tree_bits(exp.init_params))
    return {
        'mode': 'local',
        'params_sha256': params_sha256(self.params),
        'technique': exp.round_fns.technique.name,
        # What each device's program costs to train; nothing travels per
        # round (the federated program's bits would, so they are zeroed).
        'device_cost': [dict(row, upload_bits=0.0, download_bits=0.0)
                        for row in exp.cost_table()],
        'num_params': int(sum(np.size(x)
                              for x in jax.tree.leaves(exp.init_params))),
        'initial_download_bits': model_bits,  # per client, as federated
        'num_clients': trainer.num_clients,
        # The only communication of a local run: each client fetches the
        # initial model (fp32) once; nothing travels after that.
        'communication': {
            'initial_download_bits_per_client': model_bits,
            'initial_download_bits_total': model_bits * trainer.num_clients,
            'upload_bits_total': 0.0,
        },
        'clients': [dict(index=int(ci), id=exp.data.train.client_ids[int(ci)],
                         tier=int(t), **metrics_lib.to_python(m))
                    for ci, t, m in zip(trainer.clients, trainer.tiers,
                                        self.per_client)],
    }


def train_local(config: ml_collections.ConfigDict, workdir: str, *,
                progress: bool | None = None,
                allow_config_change: tuple[str, ...] = (),
                callbacks: tuple[Any, ...] = ()) -> dict[str, Any]:
  """Runs (or resumes) local-only training in `workdir`; returns the
  summary (also written to workdir/summary.json), with the workdir
  guarantees of every mode (`run.session`)."""
  return run_lib.session(
      config, workdir, lambda: run_lib.run_rounds(
          config, workdir, LocalMode, progress=progress,
          callbacks=callbacks),
      allow_config_change=allow_config_change, callbacks=callbacks)
