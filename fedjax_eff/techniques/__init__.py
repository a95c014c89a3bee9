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
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

from fedjax_eff.core.technique import Technique, chain, identity
from fedjax_eff.techniques import last_n as last_n_lib
from fedjax_eff.techniques import federated_dropout as federated_dropout_lib
from fedjax_eff.techniques import layerwise as layerwise_lib
from fedjax_eff.techniques.task_modules import modules, task_routing
from fedjax_eff.techniques.partial import partial_training
from fedjax_eff.techniques.quantization import quantize
from fedjax_eff.techniques.structure import LayerStructure, structure_of


class TechniqueContext(NamedTuple):
  model: Any = None
  init_params: Any = None
  measure: Callable[[Technique], Any] | None = None


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
            tier_rates=tuple(tier_rates), **kw)),
    'modules': lambda ctx, kinds=('lora',), **kw: modules(
        ctx.model, ctx.init_params,
        kinds if isinstance(kinds, str) else tuple(kinds), **kw),
}


def build(entries: Iterable[Any] | None,
          context: TechniqueContext | None = None) -> Technique:
  """Builds the composed technique from `config.techniques` entries."""
  context = context or TechniqueContext()
  techniques = []
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
  return chain(*techniques)


__all__ = ['REGISTRY', 'LayerStructure', 'TechniqueContext', 'build',
           'structure_of', 'task_routing']
