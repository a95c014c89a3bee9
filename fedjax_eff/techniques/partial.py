"""Partial variable training (Ro et al. 2022, arXiv 2204.09715, §3).

Clients download the full model, train only a subset of its variables and
upload only that subset; the server averages each variable over the clients
that trained it (the round's per-parameter coverage), and a variable nobody
trained keeps its value.

The subset is named by layer indices (into the model's ordered layers,
`structure.LayerStructure`) and/or a regex over parameter paths, and is

* `fixed`: the same every round. The mask is static: frozen leaves are
  constants of the client program, so no gradient is computed for them, no
  backward pass runs below the lowest trainable layer (autodiff has nothing
  to carry there; layer-structured models also `stop_gradient` the
  activations entering it), the client optimizer holds no state for them
  and nothing of them is uploaded. What a device saves, the simulator saves.
* `per_round`: `num_layers` layers drawn each round, the same for every
  client (key: `fold_in(key(seed), round)`).
* `per_client`: `num_layers` layers drawn per client (the client's plan key).

Drawn subsets are dynamic masks: exact semantics, but the simulator still
computes full gradients (DESIGN.md, "Heterogeneous devices"); the device
cost is accounted for a typical draw run as a fixed subset (`device`). Non-layer
parameters (embedding, head, norms outside blocks) follow `train_embed` /
`train_head` / `pattern` and are static.

A tied LM (`Transformer.tied_output`: logits = LN(h) E^T, the token
embedding E is the output layer) with `train_head` trains E as the output
layer: its gradient comes from the logits only (the activations entering
the lowest trained layer are cut, `stop_below`), and E is uploaded
(vocab x d_model values). Freezing it would freeze the output layer.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_eff.core.technique import Technique
from fedjax_eff.models.structure import supported_forward
from fedjax_eff.techniques import structure as structure_lib

MODES = ('fixed', 'per_round', 'per_client')


def partial_training(model, layers: Sequence[int] = (),
                     pattern: str | None = None, mode: str = 'fixed',
                     num_layers: int = 0, train_head: bool = True,
                     train_embed: bool = False, seed: int = 0,
                     top_fraction: float = 0.0) -> Technique:
  """Trains the chosen layers (plus head / embedding / regex matches).

  Args:
    model: the model (its `groups` or `layer_names` give the layer order).
    layers: layer indices trained in `fixed` mode.
    pattern: a regex over parameter paths ('block_3/mlp/.*'); matching leaves
      train too (static, any mode).
    mode: `fixed`, `per_round` or `per_client`.
    num_layers: how many layers `per_round` / `per_client` draw.
    train_head, train_embed: whether the head / embedding groups train.
    seed: the `per_round` draw's seed.
    top_fraction: in `fixed` mode, also train the top `ceil(top_fraction *
      L)` of the model's L layers (Ro et al.'s "half the layers" is 0.5),
      so a config stays right when the model's depth is overridden.
  """
  s = structure_lib.structure_of(model)
  if not 0.0 <= top_fraction <= 1.0:
    raise ValueError(f'partial_training top_fraction={top_fraction} is not '
                     'in [0, 1].')
  if top_fraction:
    n = s.num_layers
    top = min(n, max(1, math.ceil(top_fraction * n - 1e-9)))
    layers = tuple(sorted(set(layers) | set(range(n - top, n))))
  if mode not in MODES:
    raise ValueError(f'partial_training mode={mode!r} is not one of {MODES}.')
  layers = structure_lib.check_layers(s, layers, 'partial_training.layers')
  if pattern:
    re.compile(pattern)
  if mode != 'fixed' and not 0 < num_layers <= s.num_layers:
    raise ValueError(f'partial_training mode={mode!r} needs 0 < num_layers '
                     f'<= {s.num_layers}; got {num_layers}.')
  fixed_names = set()
  if train_head:
    fixed_names |= set(s.head)
  if train_embed:
    fixed_names |= set(s.embed)
  # A tied LM's output layer is its token embedding: the head trains it
  # (through its output role only: below the lowest trained layer the
  # backward pass still stops), else the output layer would stay frozen.
  tied = getattr(model, 'tied_output', None)
  output = (f'^{re.escape(tied)}$' if tied and train_head and not train_embed
            else None)
  either = '|'.join(f'(?:{r})' for r in (pattern, output) if r) or None

  if mode == 'fixed':
    names = fixed_names | {s.layers[i] for i in layers}
    if not names and not pattern:
      raise ValueError('partial_training trains nothing: give layers, a '
                       'pattern or train_head/train_embed.')
    lowest = min([s.layer_index(n) for n in names if n in s.layers] or
                 [s.num_layers])
    stop_below = None if (train_embed or lowest == 0) else lowest
    if pattern:
      stop_below = None  # a regex may reach below the lowest named layer
    fwd = supported_forward(model, stop_below=stop_below,
                            train_output=True if output else None)
    return Technique(
        name='partial_training',
        trainable=lambda params, plan: structure_lib.names_mask(
            params, names, either),
        forward=lambda plan: fwd)

  def plan(rng, round_num, ctx):
    if mode == 'per_round':
      rng = jax.random.fold_in(jax.random.key(seed), round_num)
    chosen = jax.random.choice(rng, s.num_layers, (num_layers,),
                               replace=False)
    return jnp.zeros((s.num_layers,), bool).at[chosen].set(True)

  def trainable(params, layer_on):
    others = structure_lib.names_mask(params, fixed_names, either)
    dynamic = structure_lib.layer_gate_mask(params, s, layer_on, False)
    return jax.tree.map(
        lambda o, d: True if o is True else d, others, dynamic)

  def device():
    # A typical device: `num_layers` layers drawn once (seeded), fixed.
    drawn = np.random.default_rng(seed).choice(s.num_layers, num_layers,
                                               replace=False)
    return partial_training(model, layers=tuple(sorted(drawn)),
                            pattern=pattern, mode='fixed',
                            train_head=train_head, train_embed=train_embed)

  return Technique(name=f'partial_training_{mode}', plan=plan,
                   trainable=trainable, device=device)
