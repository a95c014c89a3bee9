"""What a run is built from: `Experiment(config)`.

Derives, from a config and nothing else, the data (`data.registry.load`),
the model (`models.get_model`, with the kwargs the data needs), the task
and its evaluation (`data.task_registry`), the composed technique
(`techniques.build`), the optimizers, each client's tier, the placement of
the examples and the compiled round (`core.build_round`). It names no
technique, task or model: each of those is a registry lookup. Every run
mode (`train.py` federated, `local.py`, `pretrain.py`) starts from one.
"""

from __future__ import annotations

import inspect
import platform
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax

from fedjax_eff import accounting
from fedjax_eff import core
from fedjax_eff import models
from fedjax_eff import techniques as techniques_lib
from fedjax_eff.core import evaluation as evaluation_lib
from fedjax_eff.data import cohort as cohort_lib
from fedjax_eff.data import registry as data_registry
from fedjax_eff.data import task_registry
from fedjax_eff.experiment import checkpoints
from fedjax_eff.experiment import device_time as device_time_lib
from fedjax_eff.experiment import init_checkpoint
from fedjax_eff.experiment import placement
from fedjax_eff.experiment.validation import validate_config
from fedjax_eff.privacy import setup as privacy_setup


def params_sha256(params: Any) -> str:
  """SHA-256 of the parameters' bytes, leaves in sorted-path order."""
  return checkpoints.tree_sha256(params)


def versions() -> dict[str, str]:
  """Versions of Python, this package and its main dependencies, and the
  JAX backend and devices (recorded in every summary)."""
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


# Optimizer knobs that decide the state's structure (momentum 0 has no
# trace) or its initial value: program constants, never injected.
STRUCTURAL_KWARGS = ('momentum', 'initial_accumulator', 'nesterov')


def injected_kwargs(kwargs: dict) -> dict:
  """The numeric optimizer knobs `injected_optimizer` makes values."""
  return {k: v for k, v in kwargs.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)
          and k not in STRUCTURAL_KWARGS}


def injected_optimizer(name: str, learning_rate: float, **kwargs):
  """`core.make_optimizer`, its learning rate and numeric constants (a
  FedAdam's b1, b2, eps) values of its state (`optax.inject_hyperparams`):
  replicas of one program each keep their own."""
  numeric = injected_kwargs(kwargs)
  static = {k: v for k, v in kwargs.items() if k not in numeric}

  def factory(learning_rate, **hp):
    return core.make_optimizer(name, learning_rate, **static, **hp)
  # (optax binds hyperparameters by the factory's signature: name them)
  factory.__signature__ = inspect.Signature([
      inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD)
      for k in ('learning_rate', *numeric)])
  return optax.inject_hyperparams(factory)(learning_rate=learning_rate,
                                           **numeric)


def server_learning_rate(config) -> float:
  """`server.learning_rate`, scaled with the cohort size K by
  `server.lr_scaling` (Charles et al. 2021): 1, sqrt(K / K0) or K / K0,
  K0 = `server.lr_reference_clients`."""
  s = config.server
  ratio = config.clients_per_round / s.get('lr_reference_clients', 10)
  scale = {'none': 1.0, 'sqrt': ratio ** 0.5, 'linear': ratio}[
      s.get('lr_scaling', 'none')]
  return s.learning_rate * scale


def check_chunk_width(technique, num_rounds: int, num_tiers: int) -> None:
  """Refuses the per-backend chunk width for a technique that draws one
  choice per chunk (depth dropout's 'chunk' mode): its results would
  depend on the backend."""
  stages = ({technique.stage(r) for r in range(max(num_rounds, 1))}
            if technique.stage else {None})
  for stage in stages:
    for tier in range(num_tiers):
      t = (technique.specialize(stage, tier) if technique.specialize
           else technique)
      if t.chunk_plan is not None:
        raise ValueError(
            f'{technique.name} draws one choice per chunk of clients, so '
            'its results depend on the chunk width: set config.chunk_size '
            '(the clients sharing one draw); the default (0) differs per '
            'backend.')


def build_model(config: ml_collections.ConfigDict,
                data: data_registry.DataBundle):
  """`config.model`, with the kwargs the data needs (`data.model_kwargs`,
  e.g. one head per task) unless the config sets them. The output size is
  the number of classes unless `config.model.kwargs.num_classes` says
  otherwise (e.g. a contrastive projection's dimension)."""
  kwargs = dict(config.model.kwargs)
  needed = data.model_kwargs
  model_cls = models.MODELS.get(config.model.name)
  lacking = [k for k in needed if not hasattr(model_cls, k)]
  if model_cls is not None and lacking:
    raise ValueError(f'config.data.tasks needs a model with per-task heads '
                     f'(fields {lacking}), not '
                     f'config.model.name={config.model.name!r}.')
  for k, v in needed.items():
    kwargs.setdefault(k, v)
  return models.get_model(config.model.name,
                          kwargs.pop('num_classes', data.num_classes),
                          **kwargs)


class RoundInput(NamedTuple):
  """What the loop prefetches for a round."""
  cohort: Any           # Cohort or IndexedCohort (this process's part)
  part_of: Any          # (K, tiers) when split across processes, else None
  tiers: np.ndarray     # [K] device tier of every client of the cohort
  sampled: int = 0      # clients drawn (< K with Poisson sampling: the
                        # rest of the slots are absent)
  overflow: int = 0     # Poisson: clients drawn beyond the slots, left out
  sim: dict | None = None  # devices in time: the round's sim_* metrics


class Experiment:
  """Everything a run is built from, derived from a config (no state)."""

  def __init__(self, config: ml_collections.ConfigDict,
               replica_hparams: bool = False):
    """`replica_hparams`: the learning rates, FedProx μ and the technique
    knobs that keep shapes (`techniques.replica_knobs`) are values of the
    server state (`ServerState.hparams`, optimizers built with
    `optax.inject_hyperparams`), so replicas that differ in them share one
    program (`experiment/replicas.py`)."""
    validate_config(config)
    self.config = config
    self.replica_hparams = replica_hparams
    self.data = data_registry.load(config.data)
    self.sampler = cohort_lib.make_sampler(
        config.get('sampling', 'fixed'), self.data.train.num_clients,
        config.clients_per_round, config.seed)
    self.device_time = None  # (devices in time: set up once the round is)
    c = config.client
    # S: `client.local_steps`, or with `client.epochs` the steps of the
    # largest training client (each client runs its own, the rest padded).
    self.local_steps = c.local_steps if not c.epochs else (
        cohort_lib.epoch_steps(self.data.train.client_sizes, c.batch_size,
                               c.epochs, c.max_examples))
    # How every round packs its clients (`data.cohort.pack`).
    self.packing = dict(
        steps=self.local_steps, batch_size=c.batch_size, seed=config.seed,
        policy_large=c.policy_large, policy_small=c.policy_small,
        weighting=c.weighting, epochs=c.epochs, max_examples=c.max_examples)
    self.model = build_model(config, self.data)
    self.task, self.evaluation = task_registry.build(
        config.task, self.model, config.eval_batch_size)
    # evaluate(params, arrays, segments=None, **forward): loss, accuracy.
    self.evaluate = self.evaluation.evaluate
    self.base_key = jax.random.key(config.seed)
    c = config.client
    make = injected_optimizer if replica_hparams else core.make_optimizer
    self.client_optimizer = make(
        c.optimizer, c.learning_rate, **dict(c.optimizer_kwargs))
    s = config.server
    self.server_optimizer = make(
        s.optimizer, server_learning_rate(config),
        **dict(s.optimizer_kwargs))
    example = self.data.train.client(0)
    self.example_batch = {k: np.zeros((c.batch_size,) + v.shape[1:], v.dtype)
                          for k, v in example.items()}
    self._measured: dict[Any, accounting.DeviceCost] = {}
    # Initialise on the data's own dtype: token models embed integers.
    x_dtype = example['x'].dtype if 'x' in example else np.float32
    init_input = np.zeros((1,) + tuple(self.data.input_shape), x_dtype)
    if self.task.init_inputs is not None:  # e.g. speech: (frames, lengths)
      init_input = self.task.init_inputs(init_input)
    self.init_params = self.model.init(
        jax.random.fold_in(self.base_key, 0x1417), init_input)['params']
    if config.init_checkpoint:
      self.init_params = init_checkpoint.load_params(
          config.init_checkpoint, self.init_params,
          skip=config.init_checkpoint_skip)
    self.technique = techniques_lib.build(
        config.techniques, techniques_lib.TechniqueContext(
            self.model, self.init_params, self.device_cost,
            num_tasks=len(self.data.tasks),
            submodel_keeps=tuple(config.get('submodel_keeps', ())),
            client_learning_rate=c.learning_rate,
            weighting=c.weighting,
            max_clients=self.sampler.slots))
    # Client-level DP: first in the chain, with its accountant.
    self.technique, self.privacy = privacy_setup.build(
        config, self.data.train.num_clients, self.technique,
        num_params=int(sum(np.size(x) for x in jax.tree.leaves(
            self.init_params))))
    # A client's tier is its device class, or its task (its static
    # program, dispatched like a tier).
    self.tier_of, self.num_tiers = self.data.client_tiers(
        list(config.devices.tier_fractions), config.seed)
    # (replicas of one program beside a clients mesh: a 2-D mesh)
    self.mesh = placement.make_mesh(
        config.mesh_clients,
        config.get('mesh_replicas', 0) if replica_hparams else 0)
    self.resident, self.examples = None, None
    if config.mode == 'federated' and placement.on_device(
        config.data_placement, placement.nbytes(self.data.train)):
      self.resident = cohort_lib.ResidentData.of(self.data.train)
      self.examples = placement.put_replicated(self.resident.examples,
                                               self.mesh)
    self.autotune_seconds = None
    self.split_cohort = False
    chunk = config.chunk_size
    if chunk == -1 and jax.process_count() > 1:
      raise ValueError('config.chunk_size=-1 (autotune) runs in one process; '
                       'with several, tune once on one process and pass the '
                       'chosen config.chunk_size.')
    if chunk == -1 and config.mode == 'federated':
      chunk, self.autotune_seconds = self.autotune_chunk_size()
    self.chunk_size = core.placement.chunk_width(max(chunk, 0),
                                                 config.clients_per_round)
    placement.check_round_fits(
        config, steps=self.local_steps, example_bytes=sum(
            v.dtype.itemsize * int(np.prod(v.shape[1:]))
            for v in example.values()),
        param_bytes=int(sum(x.nbytes for x in jax.tree.leaves(
            self.init_params))),
        on_device_data=self.examples is not None,
        chunk=min(self.chunk_size, config.clients_per_round),
        activation_bytes=lambda: placement.activation_bytes_per_example(
            self.model, self.task, self.init_params, self.example_batch))
    if config.chunk_size == 0:
      check_chunk_width(self.technique, config.num_rounds, self.num_tiers)
    self.round_fns = self.build_round(self.chunk_size)
    # Per-client technique state (error feedback, SCAFFOLD): on the device
    # beside device-resident data, in host memory otherwise.
    self.host_store = None
    if self.client_store == 'host' and core.technique.stateful(
        self.round_fns.technique):
      self.host_store = self.round_fns.host_store(self.init_params)
    self.costs: dict[Any, accounting.DeviceCost] = {}
    self.variant_costs: dict[Any, accounting.DeviceCost] = {}
    # Devices in time: profiles, availability, tiers that fit, the clock.
    if device_time_lib.enabled(config):
      self.device_time = self.make_device_time()
    # Each process packs only the clients its own devices train.
    self.split_cohort = self.mesh is not None and jax.process_count() > 1
    if self.split_cohort and self.device_time is not None:
      raise ValueError('config.devices.profiles runs in one process.')
    if self.split_cohort and config.get('sampling') == 'poisson':
      raise ValueError("config.sampling='poisson' runs in one process (each "
                       'process packs only its own slots).')

  def make_device_time(self) -> device_time_lib.DeviceTime:
    """Each client's device profile; its tier by memory (or the drawn
    one, excluded if its memory cannot hold it); the clock."""
    profiles = device_time_lib.make_profiles(self.config,
                                             self.data.train.num_clients)
    peaks = [float(self.program_cost(0, t).peak_bytes or 0.0)
             for t in range(self.num_tiers)]
    self.tier_of, eligible = device_time_lib.memory_tiers(
        profiles, peaks, self.tier_of, self.config.devices.tiers_by_memory)
    if not eligible.any():
      raise ValueError(
          'No simulated device can hold a program of this run (peak '
          f"{min(peaks) / 2**20:.1f} MiB at the smallest tier; "
          'config.devices.profiles).')
    steps = cohort_lib.local_steps_of(self.data.train.client_sizes,
                                      **self.packing)
    return device_time_lib.DeviceTime(
        self.config, profiles, lambda r, t: self.program_cost(r, t),
        self.tier_of, eligible, step_share=steps / self.local_steps)

  def build_round(self, chunk_size: int, donate: bool = True
                  ) -> core.RoundFns:
    return core.build_round(
        self.model, self.task, self.technique, self.client_optimizer,
        self.server_optimizer, chunk_size=chunk_size,
        prox_mu=self.config.client.prox_mu, num_tiers=self.num_tiers,
        donate=donate, mesh=self.mesh,
        # Replicas on a mesh axis: a vmap, which XLA partitions along it.
        vmap_replicas=True if self.config.get('mesh_replicas') else None,
        population=self.data.train.num_clients,
        client_state_limit_bytes=int(
            self.config.get('client_state_limit_gib', 4.0) * 2 ** 30),
        client_store=self.client_store,
        lanes=bool(self.config.get('lanes', False)))

  @property
  def client_store(self) -> str:
    """Where per-client technique state lives: with the data."""
    return 'device' if self.examples is not None else 'host'

  def client_state_bytes(self, state: core.ServerState) -> int:
    """Memory of the client-state store (device or host), in bytes."""
    if self.host_store is not None:
      return self.host_store.nbytes
    return int(sum(x.nbytes for x in jax.tree.leaves(state.clients)))

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
    state = self.round_fns.init(self.init_params)
    if self.replica_hparams:
      c = self.config.client
      state = state._replace(hparams={
          'client_learning_rate': np.asarray(c.learning_rate, np.float32),
          'prox_mu': np.asarray(c.prox_mu, np.float32),
          # technique knobs that keep shapes (a depth-dropout rate, bits)
          **techniques_lib.replica_hparams(self.config.techniques)})
    return state

  def cohort(self, round_num: int) -> RoundInput:
    """Round `round_num`'s cohort: row indices into the device-resident
    examples, or (host placement) the examples packed on the host. Under
    `jax.distributed`, only the clients of this process's slots."""
    over, sim = 0, None
    slots = self.sampler.slots
    if self.device_time is not None:  # who is online and finishes in time
      planned = self.device_time.round(round_num)
      ids, sampled, sim = planned.ids, planned.aggregated, planned.record
      slots = self.device_time.slots
    elif isinstance(self.sampler, cohort_lib.PoissonSampler):
      ids, over = self.sampler.draw(round_num)
      sampled = len(ids)
    else:
      ids = self.sampler.sample(round_num)
      sampled = len(ids)
    ids = cohort_lib.padded_ids(ids, slots)
    tiers = self.tier_of[ids]
    part_of, mine = None, ids
    if self.split_cohort:
      part_of = (len(ids), tiers)
      mine = ids[np.minimum(self.round_fns.local_part(*part_of),
                            len(ids) - 1)]
    kw = dict(self.packing, round_num=round_num,
              ctx={'tier': self.tier_of[mine]})
    if self.resident is not None:
      cohort = cohort_lib.pack_index(self.resident, mine, **kw)
    else:
      cohort = cohort_lib.pack(self.data.train, mine, **kw)
    if sampled < len(ids):  # the slots beyond the clients aggregated
      cohort = cohort_lib.pad_absent(cohort, sampled)  # are empty
    return RoundInput(cohort, part_of, tiers, sampled, over, sim)

  def device_cost(self, technique) -> accounting.DeviceCost:
    """What one device pays to run `technique` (a static program).

    Cached by what defines the program: the technique's name, its static
    trainable mask and static forward kwargs, NumPy ones included (e.g. a
    depth-dropout variant's gates; so e.g. the n chosen for a tier reuses
    the measurement made while choosing it).
    """
    ctx = {'client_index': np.int32(0), 'tier': np.int32(0)}
    found = core.technique.trace_plan(core.chain(technique),
                                      self.init_params, ctx)
    key = (technique.name, str(jax.tree.leaves(found['flags'])),
           str(sorted(found['forward'].items())),
           str(sorted(found['forward_arrays'].items())))
    if key not in self._measured:
      self._measured[key] = accounting.client_cost(
          self.model, self.task, technique, self.client_optimizer,
          self.init_params, self.example_batch,
          self.local_steps, ctx, self.config.client.prox_mu)
    return self._measured[key]

  def program(self, round_num: int, tier: int = 0):
    """The technique clients of `tier` run in round `round_num`."""
    tech = self.round_fns.technique
    stage = tech.stage(round_num) if tech.stage else None
    if tech.specialize:
      return stage, tech.specialize(stage, tier)
    return stage, tech

  def program_cost(self, round_num: int, tier: int,
                   variant: int | None = None) -> accounting.DeviceCost:
    """The cost of tier `tier`'s program in round `round_num`: a typical
    device's, or that of one program variant (`Technique.variant`, e.g.
    the layers depth dropout skipped)."""
    stage, program = self.program(round_num, tier)
    key = (stage, tier if self.round_fns.technique.specialize else 0)
    if variant is not None and program.device_variant:
      key += (int(variant),)
      if key not in self.variant_costs:
        self.variant_costs[key] = self.device_cost(
            core.technique.device_program(program, variant))
      return self.variant_costs[key]
    if key not in self.costs:
      self.costs[key] = self.device_cost(
          core.technique.device_program(program))
    return self.costs[key]

  def cost_table(self) -> list[dict]:
    """Every program measured so far: stage, tier, variant (of a technique
    with per-client program variants; None for a typical device) and its
    `DeviceCost.as_dict()`, for summary.json."""
    rows = [dict(stage=repr(k[0]), tier=k[1], variant=None, **c.as_dict())
            for k, c in self.costs.items()]
    rows += [dict(stage=repr(k[0]), tier=k[1], variant=k[2], **c.as_dict())
             for k, c in sorted(self.variant_costs.items(),
                                key=lambda kv: repr(kv[0]))]
    return rows

  def device_metrics(self, round_num: int, tiers, m,
                     steps=None) -> dict[str, float]:
    """Per-client device cost of the round: means over the cohort and per
    tier (bits as measured in the round; peak, training state and FLOPs
    from the compiled single-client program each client ran: its tier's,
    or its own variant's when the round reports variants, e.g. the gates
    depth dropout drew); `tiers`: each client's tier.

    `steps` (`[K]`, `Cohort.steps_run`): the local steps each device ran.
    A device's FLOPs are then its own, one step's FLOPs x its steps
    (clients with fewer examples, or `client.epochs` over fewer, run
    fewer steps than the cohort's S), and `device_local_steps` is their
    mean. Peak memory stays that of the S-step program (an upper bound for
    a shorter client: its batches are fewer)."""
    tiers = np.asarray(tiers)
    scale = np.ones(len(tiers))
    if steps is not None and len(steps) == len(tiers):
      scale = np.asarray(steps, np.float64) / self.local_steps
    up = np.asarray(m.client_upload_bits)
    down = np.asarray(m.client_download_bits)
    variants = getattr(m, 'client_variant', ())
    variants = None if isinstance(variants, tuple) else np.asarray(variants)
    out: dict[str, float] = {}
    names = ('device_peak_bytes', 'device_training_state_bytes',
             'device_flops_per_round')
    cost_of = {k: np.zeros(len(tiers)) for k in names}

    def put(sel, cost):
      for k, v in zip(names, (cost.peak_bytes, cost.training_state_bytes,
                              cost.flops_per_round)):
        cost_of[k][sel] = v or 0
      cost_of['device_flops_per_round'][sel] *= scale[sel]
    for t in range(self.num_tiers):
      sel = tiers == t
      if self.config.accounting:
        if variants is None:
          put(sel, self.program_cost(round_num, t))
        else:
          for v in np.unique(variants[sel]):
            put(sel & (variants == v), self.program_cost(round_num, t, v))
      if self.num_tiers > 1 and sel.any():
        out[f'tier{t}/upload_bits'] = float(up[sel].mean())
        out[f'tier{t}/download_bits'] = float(down[sel].mean())
        if self.config.accounting:
          for k in names:
            out[f'tier{t}/{k}'] = float(cost_of[k][sel].mean())
    if self.config.accounting:
      out.update({k: float(v.mean()) for k, v in cost_of.items()})
    if steps is not None and len(steps) == len(tiers):
      out['device_local_steps'] = float(np.mean(steps))
    return out

  def round_key(self, round_num: int) -> jax.Array:
    return jax.random.fold_in(self.base_key, round_num)

  def forward(self, params, round_num: int, tier: int = 0) -> dict:
    """Static model kwargs of the program a tier-`tier` client ran in the
    last round before `round_num` (e.g. layer-wise: the active depth and
    its head), as the server evaluates it."""
    _, program = self.program(max(round_num - 1, 0), tier)
    return core.technique.server_forward(
        program, params, {'client_index': np.int32(0),
                          'tier': np.int32(tier)})

  def eval_metrics(self, params, round_num: int) -> dict[str, float]:
    """The task's central metrics of the server model as the programs of
    `round_num` run it (`core.evaluation.metrics`)."""
    return evaluation_lib.metrics(
        self.evaluation, params, self.data,
        lambda tier: self.forward(params, round_num, tier))

  def technique_report(self, params) -> dict[str, float]:
    """What the technique reports of the final model (`Technique.report`,
    e.g. federated dropout's nested sub-models), each evaluated with the
    task's per-split metrics on this data."""
    if self.technique.report is None:
      return {}
    return self.technique.report(
        params, lambda p, **forward: self.evaluation.splits(
            p, self.data, **forward))
