"""Federated layer-wise learning and depth dropout (Guo et al. 2023,
arXiv 2309.05213).

Layer-wise learning: a server schedule names the active layer of each round
(`LayerSchedule`: R rounds per layer in a given order, optionally a final
joint phase). Clients train only the active layer and the head sitting on
its output; layers below run forward only (frozen, no backward: the static
mask makes them constants and the model `stop_gradient`s the activations
entering the active layer); layers above are not run (`depth`). Only the
active layer and the head travel up; what travels down is what the device
runs (embedding, the layers up to the active one, the head).

Each stage is its own compiled program (`Technique.stage/specialize`), so
the simulator's memory and FLOPs shrink like the device's.

The head is a knob: `carry` (one head, carried from stage to stage),
`per_layer` (each layer its own head, fresh when its stage begins; needs a
model built with `per_layer_heads=True`), `reinit` (one head, reset to its
initial values when each stage begins: the view hands clients the initial
head in the stage's first round and the merge reports the update relative
to the server's head, so the server lands on the clients' average).

Depth dropout: during local training each frozen layer below the active one
is skipped (residual identity) with probability p; the active layer is
never dropped. `mode` says who draws the gates:

* `client`: per client, a dynamic `[L]` gate vector (exact; a select under
  vmap, so the simulator still computes every layer);
* `chunk`: per chunk of the cohort, unbatched, so the model's `lax.cond`
  really skips the layer: the simulation gets cheaper, as the device does.
  With the CPU default C = 1 a chunk is one client; with C > 1 the clients
  of a chunk share one draw;
* `step`: per local step (the model draws the gates with the dropout rng).

XLA's cost analysis of a conditional counts its most expensive branch, so
the device cost is accounted from static programs: in `client` and `chunk`
modes each client reports how many layers its gates skipped (the technique's
`variant`) and is charged the compiled cost of the program that skips that
many (`device_variant`), so the per-round FLOPs are those of the gates
actually drawn; in `step` mode (gates drawn inside the model, per step) a
typical device that skips round(p * a) of the a frozen layers (`device`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_eff.core.technique import Technique, hparam, tree_bits
from fedjax_eff.models.structure import ForwardPlan, accepts, forward_keys
from fedjax_eff.techniques import structure as structure_lib

HEADS = ('carry', 'per_layer', 'reinit')
DROPOUT_MODES = ('client', 'chunk', 'step')
JOINT = ('joint',)


class LayerSchedule(NamedTuple):
  """Which layer is active in which round (host side, pure Python)."""
  order: tuple[int, ...]
  rounds_per_layer: int
  final_joint: bool = False

  @classmethod
  def make(cls, num_layers: int, rounds_per_layer: int,
           order: str | Sequence[int] = 'forward',
           final_joint: bool = False) -> 'LayerSchedule':
    if order == 'forward':
      order = range(num_layers)
    elif order == 'backward':
      order = range(num_layers - 1, -1, -1)
    elif isinstance(order, str):
      raise ValueError(f"order={order!r}: 'forward', 'backward' or a list of "
                       'layer indices.')
    order = tuple(int(i) for i in order)
    if not order or any(not 0 <= i < num_layers for i in order):
      raise ValueError(f'order={order} must list layers in [0, {num_layers}).')
    if rounds_per_layer < 1:
      raise ValueError(f'rounds_per_layer={rounds_per_layer} must be >= 1.')
    return cls(order, int(rounds_per_layer), bool(final_joint))

  @property
  def layer_rounds(self) -> int:
    return len(self.order) * self.rounds_per_layer

  def stage(self, round_num: int) -> tuple:
    """('layer', layer, position in order) while that layer is active, then
    JOINT, or (without a joint phase) the last layer's stage again."""
    i = min(round_num // self.rounds_per_layer, len(self.order) - 1)
    if self.final_joint and round_num >= self.layer_rounds:
      return JOINT
    return ('layer', self.order[i], i)

  def stage_start(self, stage) -> int:
    """The first round of `stage`."""
    return self.layer_rounds if stage == JOINT else (
        stage[2] * self.rounds_per_layer)

  @staticmethod
  def active(stage) -> int | None:
    return None if stage == JOINT else stage[1]


def _check_model(model, what):
  s = structure_lib.structure_of(model)
  needed = ('depth', 'stop_below', 'layer_gates')
  missing = [k for k in needed if k not in forward_keys(model)]
  if missing:
    raise ValueError(f'{what} needs a layer-structured model (transformer, '
                     f'vit) whose forward takes {missing}; '
                     f'{type(model).__name__} does not.')
  return s


def layerwise(model, schedule: LayerSchedule, head: str = 'carry',
              init_params=None) -> Technique:
  """Layer-wise training on `schedule` (see the module docstring)."""
  s = _check_model(model, 'layerwise')
  if head not in HEADS:
    raise ValueError(f'layerwise head={head!r} is not one of {HEADS}.')
  if head == 'per_layer' and len(s.head) != s.num_layers:
    raise ValueError("layerwise head='per_layer' needs a model with "
                     'per_layer_heads=True (one head per layer).')
  if head != 'per_layer' and len(s.head) != 1:
    raise ValueError(f'layerwise head={head!r} needs one head; the model has '
                     f'{len(s.head)} (per_layer_heads=True pairs with '
                     "head='per_layer').")
  if head == 'reinit' and init_params is None:
    raise ValueError("layerwise head='reinit' needs the model's initial "
                     'params (init_params).')

  def specialize(stage, tier):
    del tier
    a = schedule.active(stage)
    if a is None:  # the joint phase: everything trains, full depth
      head_name = s.head[-1]
      names = set(s.embed) | set(s.layers) | {head_name}
      used = names
      fwd = ForwardPlan()
    else:
      head_name = s.head[a] if head == 'per_layer' else s.head[0]
      # The embedding trains with layer 0 (the layer that reads it).
      names = {s.layers[a], head_name} | (set(s.embed) if a == 0 else set())
      used = set(s.embed) | set(s.layers[:a + 1]) | {head_name}
      fwd = ForwardPlan(depth=a + 1, stop_below=None if a == 0 else a)
    start_round = schedule.stage_start(stage)

    def trainable(params, plan):
      return structure_lib.names_mask(params, names)

    def download(params, plan):
      return tree_bits(params, structure_lib.names_mask(params, used))

    if head != 'reinit':
      return Technique(name='layerwise', trainable=trainable,
                       forward=lambda plan: fwd, download=download)

    def plan(rng, round_num, ctx):
      return round_num == start_round  # the stage's first round: fresh head

    def view(params, fresh):
      return {k: (jax.tree.map(lambda i, p: jnp.where(fresh, i, p),
                               init_params[k], v) if k == head_name else v)
              for k, v in params.items()}

    def merge(server_params, delta, mask, fresh):
      # The client moved from the initial head; report the move from the
      # server's head, so the server's average lands on the clients' heads.
      start = view(server_params, fresh)
      delta = {k: (jax.tree.map(lambda d, sp, st: d + (sp - st), v,
                                server_params[k], start[k])
                   if k == head_name else v) for k, v in delta.items()}
      cov = jax.tree.map(lambda d, m: jnp.broadcast_to(
          jnp.asarray(m, d.dtype), d.shape), delta, mask)
      return delta, cov

    return Technique(name='layerwise', plan=plan, view=view,
                     trainable=trainable, forward=lambda plan: fwd,
                     merge=merge, download=download)

  return Technique(name='layerwise', stage=schedule.stage,
                   specialize=specialize)


# The depth-dropout rate as a replica value (`core.technique.hparam`):
# replicas of one program that differ only in p > 0 ('client' mode).
DEPTH_DROPOUT_HPARAM = 'layerwise.depth_dropout'


def depth_gates(rng, num_layers: int, active: int | None, p):
  """`[L]` gates: layers below `active` kept with probability 1 - p (`p` a
  Python float or, for a replica's own rate, a traced scalar)."""
  if active is None or (isinstance(p, (int, float)) and p <= 0):
    return jnp.ones((num_layers,), bool)
  keep = jax.random.bernoulli(rng, 1.0 - p, (num_layers,))
  return jnp.where(jnp.arange(num_layers) < active, keep, True)


def depth_dropout(model, schedule: LayerSchedule, p: float,
                  mode: str = 'client') -> Technique:
  """Skips frozen layers below the active one with probability `p`."""
  s = _check_model(model, 'depth_dropout')
  if not 0.0 <= p < 1.0:
    raise ValueError(f'depth_dropout p={p} must be in [0, 1).')
  if mode not in DROPOUT_MODES:
    raise ValueError(f'depth_dropout mode={mode!r} is not one of '
                     f'{DROPOUT_MODES}.')
  if mode == 'step' and not accepts(model, 'layer_drop_rate'):
    raise ValueError("depth_dropout mode='step' needs a model whose forward "
                     'takes layer_drop_rate.')
  n = s.num_layers

  def skipping(k):
    # A device that skips k of the frozen layers below the active one, as
    # static gates (which k does not matter for its cost: the blocks of a
    # layer stack are alike).
    gates = np.arange(n) >= k
    return Technique(name='depth_dropout',
                     forward=lambda plan: ForwardPlan(layer_gates=gates))

  def typical_device(a):
    # Skips round(p * a) of the a frozen layers below the active one.
    return skipping(int(round(p * (a or 0))))

  def skipped(gates):  # the variant: how many layers this client skips
    return jnp.sum(~gates).astype(jnp.int32)

  def specialize(stage, tier):
    del tier
    a = schedule.active(stage)
    device = lambda: typical_device(a)
    if mode == 'client':
      return Technique(
          name='depth_dropout',
          plan=lambda rng, r, ctx: depth_gates(
              rng, n, a, hparam(ctx, DEPTH_DROPOUT_HPARAM, p)),
          forward=lambda gates: ForwardPlan(layer_gates=gates),
          device=device, variant=skipped, device_variant=skipping)
    if mode == 'chunk':
      return Technique(
          name='depth_dropout',
          chunk_plan=lambda rng, r: depth_gates(rng, n, a, p),
          plan=lambda rng, r, ctx: ctx['chunk'],
          forward=lambda gates: ForwardPlan(layer_gates=gates),
          device=device, variant=skipped, device_variant=skipping)
    rates = np.where(np.arange(n) < (a if a is not None else 0), p, 0.0)
    return Technique(name='depth_dropout',
                     forward=lambda plan: ForwardPlan(layer_drop_rate=rates),
                     device=device)

  return Technique(name='depth_dropout', stage=schedule.stage,
                   specialize=specialize)
