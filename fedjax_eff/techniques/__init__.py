"""The technique registry: config entries -> one composed `Technique`.

`config.techniques` is a list (in the spirit of `optax.chain`); each entry
is a ConfigDict with a `name` and that technique's knobs. Factories get a
`TechniqueContext` (the model, its initial params, and a `measure` function
that compiles a device program and returns its `accounting.DeviceCost`), so
techniques that depend on the model's layers or on measured device cost can
be built from config. The round builder never changes.

Registered:
  identity            plain FedAvg
  partial_training    layers / regex; fixed, per_round, per_client
  layerwise           layer-wise schedule (+ depth_dropout, its mode)
  last_n              the last n layers, one n per device tier
  budgeted_last_n     last n per tier, chosen from budgets by measured cost
  quantize            k-bit stochastic quantization of the upload (download)
  modules             FedYolo: per-task LoRA / adapter / prompt modules and
                      heads on a frozen backbone (head-only, full baselines)
  federated_dropout   per-client dense sub-models of the model's width
                      groups, per-layer rates, a keep ratio per device tier
  topk                top-k sparsification of the upload (+ error feedback)
  compress            a chain of codecs (topk, quantize, in any order),
                      optionally with error feedback (client state)
  scaffold            SCAFFOLD control variates (server + client state)
  secure_aggregation  SecAgg simulated: clip, rotation, integer grid, ring
                      sum, the distributed discrete Gaussian
                      (privacy/secagg.py); uniform client weights
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import numpy as np

from fedjax_eff.core import codecs
from fedjax_eff.core.technique import Technique, chain, identity
from fedjax_eff.privacy import secagg
from fedjax_eff.techniques import compression
from fedjax_eff.techniques import last_n as last_n_lib
from fedjax_eff.techniques import federated_dropout as federated_dropout_lib
from fedjax_eff.techniques import layerwise as layerwise_lib
from fedjax_eff.techniques.task_modules import modules, task_routing
from fedjax_eff.techniques.partial import partial_training
from fedjax_eff.techniques import quantization as quantization_lib
from fedjax_eff.techniques.quantization import quantize
from fedjax_eff.techniques.scaffold import scaffold
from fedjax_eff.techniques.structure import LayerStructure, structure_of


class TechniqueContext(NamedTuple):
  """What factories may read besides their own knobs.

  model, init_params: the model and its initial parameters.
  measure(technique) -> accounting.DeviceCost of its device program.
  num_tasks: tasks of the data (> 0: `task_routing` is chained last, so
    each client runs its task's head and modules).
  submodel_keeps: keep ratios of the nested sub-models to report
    (`config.submodel_keeps`); () = federated dropout's default, and none
    without federated dropout.
  """
  model: Any = None
  init_params: Any = None
  measure: Callable[[Technique], Any] | None = None
  client_learning_rate: float | None = None  # the client optimizer's
  num_tasks: int = 0
  submodel_keeps: tuple[float, ...] = ()
  # The run's client weighting and largest cohort ('' / 0: unknown), for
  # techniques that need uniform weights and bounded sums (SecAgg).
  weighting: str = ''
  max_clients: int = 0


def _layerwise(ctx, rounds_per_layer, order='forward', final_joint=False,
               head='carry', depth_dropout=0.0, depth_dropout_mode='client'):
  s = structure_of(ctx.model)
  schedule = layerwise_lib.LayerSchedule.make(
      s.num_layers, rounds_per_layer,
      order if isinstance(order, str) else tuple(order), final_joint)
  t = layerwise_lib.layerwise(ctx.model, schedule, head, ctx.init_params)
  if depth_dropout:
    t = chain(t, layerwise_lib.depth_dropout(ctx.model, schedule,
                                             depth_dropout,
                                             depth_dropout_mode))
  return t


def _budgeted_last_n(ctx, budgets, train_head=True):
  if ctx.measure is None:
    raise ValueError('budgeted_last_n needs a measure function (the '
                     'experiment provides one).')
  return last_n_lib.budgeted_last_n(ctx.model, [dict(b) for b in budgets],
                                    ctx.measure, train_head)


def _compress(ctx, codecs, error_feedback=False):
  del ctx
  return compression.compress(
      [compression.codec_from_config(c) for c in codecs], error_feedback)


def _secure_aggregation(ctx, **kw):
  if ctx.weighting and ctx.weighting != 'uniform':
    raise ValueError("the ring sum adds each client once: set "
                     "config.client.weighting='uniform' (got "
                     f'{ctx.weighting!r}).')
  if ctx.max_clients:
    secagg.check_exact(kw.get('bits', 16), ctx.max_clients)
  return secagg.secure_aggregation(**kw)


def _scaffold(ctx, client_learning_rate=None):
  lr = client_learning_rate or ctx.client_learning_rate
  if lr is None:
    raise ValueError('scaffold needs client_learning_rate (the client '
                     "optimizer's; the experiment provides it).")
  return scaffold(lr, follow_client_optimizer=not client_learning_rate)


REGISTRY: dict[str, Callable[..., Technique]] = {
    'identity': lambda ctx: identity(),
    'partial_training': lambda ctx, **kw: partial_training(
        ctx.model, **{k: tuple(v) if k == 'layers' else v
                      for k, v in kw.items()}),
    'layerwise': _layerwise,
    'last_n': lambda ctx, n, train_head=True: last_n_lib.last_n(
        ctx.model, n if isinstance(n, int) else tuple(n), train_head),
    'budgeted_last_n': _budgeted_last_n,
    'quantize': lambda ctx, **kw: quantize(**kw),
    'federated_dropout': lambda ctx, rate=0.25, tier_rates=(), **kw: (
        federated_dropout_lib.federated_dropout(
            ctx.model, ctx.init_params,
            tuple(rate) if isinstance(rate, (list, tuple)) else rate,
            tier_rates=tuple(tier_rates),
            keeps=(tuple(ctx.submodel_keeps)
                   or federated_dropout_lib.NESTED_KEEPS), **kw)),
    'topk': lambda ctx, **kw: compression.topk(**kw),
    'compress': _compress,
    'scaffold': _scaffold,
    'secure_aggregation': _secure_aggregation,
    'modules': lambda ctx, kinds=('lora',), **kw: modules(
        ctx.model, ctx.init_params,
        kinds if isinstance(kinds, str) else tuple(kinds), **kw),
}


def replica_knobs(entry) -> dict[str, tuple[str, Any, Any]]:
  """The knobs of one `config.techniques` entry that replicas of one
  program may differ in (`experiment/replicas.py`): {knob: (its name in
  `ServerState.hparams`, its value there, its structural class)}. Replicas
  share a program when their classes agree; the technique's plan reads the
  value (`core.technique.hparam`).

    layerwise  depth_dropout p > 0 in 'client' mode (p = 0 builds no
               depth dropout; 'chunk' draws before the plan, 'step'
               passes static rates to the model)
    quantize   bits, within one code dtype (1-8: uint8, 9-16: uint16)
  """
  entry = dict(entry)
  name = entry.get('name')
  if name == 'layerwise':
    p = entry.get('depth_dropout', 0.0)
    if p > 0 and entry.get('depth_dropout_mode', 'client') == 'client':
      return {'depth_dropout': (layerwise_lib.DEPTH_DROPOUT_HPARAM,
                                np.asarray(p, np.float32), 'p>0')}
  if name == 'quantize':
    k = entry.get('bits', 8)
    if isinstance(k, int) and 1 <= k <= 16:
      return {'bits': (quantization_lib.BITS_HPARAM, np.asarray(k, np.int32),
                       f'codes:uint{codecs.code_width(k)}')}
  return {}


def replica_hparams(entries: Iterable[Any] | None) -> dict[str, Any]:
  """{hparams name: value} of every replica knob of `entries`; a knob
  that two entries share is refused (one name each in the state)."""
  out = {}
  for entry in entries or ():
    for knob, (key, value, _) in replica_knobs(entry).items():
      if key in out:
        raise ValueError(f'Two techniques set the replica value {key!r} '
                         f'({knob}): replicas would not know whose.')
      out[key] = value
  return out


def build(entries: Iterable[Any] | None,
          context: TechniqueContext | None = None) -> Technique:
  """Builds the composed technique from `config.techniques` entries.

  Then, from `context`: a run without federated dropout that asks for
  nested sub-models (`submodel_keeps`, e.g. federated dropout's full-width
  baseline) reports them too; with several tasks, `task_routing` comes
  last.
  """
  context = context or TechniqueContext()
  techniques, names = [], []
  for i, entry in enumerate(entries or ()):
    entry = dict(entry)
    name = entry.pop('name', None)
    if name not in REGISTRY:
      raise ValueError(f'config.techniques[{i}].name={name!r} is not one of '
                       f'{sorted(REGISTRY)}.')
    try:
      techniques.append(REGISTRY[name](context, **entry))
    except (TypeError, ValueError) as e:
      raise ValueError(f'config.techniques[{i}] ({name}): {e}') from e
    names.append(name)
  technique = chain(*techniques)
  if context.submodel_keeps and 'federated_dropout' not in names:
    nested = Technique(report=federated_dropout_lib.submodel_report(
        context.model, context.submodel_keeps))
    technique = technique._replace(report=chain(technique, nested).report)
  if context.num_tasks:
    technique = chain(technique, task_routing(context.model))
  return technique


__all__ = ['REGISTRY', 'LayerStructure', 'TechniqueContext', 'build',
           'replica_hparams', 'replica_knobs', 'structure_of',
           'task_routing']
