"""Federated dropout (Caldas et al. 2018; Guliani et al. 2022, technique 5).

Each round, each client trains a physically smaller dense sub-model: in
every *width group* of the model (the hidden units of a dense layer, the
heads of an attention layer, the channels of a convolution) it keeps a
random set of `round((1 - p_l) * width_l)` units, gathers the weights that
touch them, trains, and uploads the sub-model's update; the server scatters
each update back and divides every parameter by the weight of the clients
that kept it (the round's coverage), so a parameter nobody kept keeps its
value. What the device downloads, trains, stores and uploads is the smaller
model; so is what the simulator computes (static shapes per tier, the kept
indices per client under `vmap`).

Width groups are declared by the model (`model.width_groups`: `WidthGroup`
entries, `fedjax_eff.models.structure`, re-exported here, naming the
parameter axes indexed by the group's units). An axis of length
`m * width` holds `m` blocks of the group's units with the unit index
minor (index `j * width + u`): a GLU's two halves, or a flattened
`[H, W, C]` feature map feeding a dense layer. The model's `__call__`
takes a static `widths=((group name, kept units), ...)` and builds its
layers that narrow.

What drops (`scope`):

* 'units' (default; what every run did before scope existed): the units a
  layer owns alone: an MLP's hidden units, a CNN's conv channels and dense
  units, attention heads, feed-forward units, an LSTM's cells. In a
  Transformer or Conformer that leaves the residual width, the conformer's
  conv channels, the front end and the head full, so at keep 0.25 the
  'cpu' Conformer CTC is still 0.46 of its parameters.
* 'all': also every width several layers share or that passes through a
  LayerNorm: the residual (model) width of a layer stack (one group for
  the whole stack: the residual stream ties the embedding, every block and
  the heads), a conformer's conv-module channels, the speech front end's
  subsampling-conv channels, an LSTM's embedding width. LayerNorms of a
  narrowed width normalise with the full width's statistics
  (`models.layers.WidthLayerNorm`), so the sub-model is still exactly the
  full model with the dropped units zeroed: nested sub-models, coverage
  and the masked-model tests hold as for 'units'. At keep 0.25 the 'cpu'
  Conformer CTC is then 0.066 of its parameters (the CNN, whose
  groups were all 'units' already, 0.063 either way).

What stays full, whatever the scope, and why: the input features (mel
bins, pixels, token ids: the data fixes them), the outputs (classes,
vocabulary, CTC labels: the loss needs every one), the head size inside
attention (rotary pairs and the `1/sqrt(head_dim)` scale are per head, so
heads drop whole), a depthwise conv's taps and a sequence's positions
(lengths, not widths), and LoRA/adapter modules (refused with dropout).

Per-group dropout rates `p_l` (`group_rates`): `constant`, by `size`
(`p * width_l / max width`), by `params` (`p * P_l / max P`, `P_l` the
parameters whose axes the group indexes), by `depth` (a linear ramp from
`rate_first` at the first group to `rate` at the last) or an explicit
list. With `tier_rates`, each device tier drops at its own base rate (a
static program per tier, one round). `submodel` extracts a nested
sub-model (the first, or chosen, units at one keep ratio) to evaluate
alone; the technique's `report` evaluates the nested sub-models at the end
of a run (`submodel_report`).

Equal sub-model size across schedules (`kept_fraction`, `calibrate_rate`;
`target_fraction=` of the technique). A client keeps
`k_l = max(1, round((1 - p_l) w_l))` units of group `l`, so a parameter
leaf with axes `a` of length `n_a` keeps
`prod_a (k_{g(a)} / w_{g(a)} if a is a member of group g(a) else 1)`
of its entries, and the sub-model keeps the fraction

    F(p) = sum_leaves size_leaf * prod_{member axes a} k_{g(a)}(p) / w_{g(a)}
           / sum_leaves size_leaf

of the parameters (a dense kernel between two dropped groups keeps
`(1 - p_a)(1 - p_b)`, the first layer's and the head's only one factor).
The draw is random only in which units, not how many, so this is also the
expected fraction. Under each schedule every `p_l` is a non-decreasing
function of the base rate `p` (`constant` `p`; `size`/`params` `c_l p`
with `c_l` in (0, 1]; `depth` `rate_first + (p - rate_first) t_l` with
`t_l` in [0, 1]), so every `k_l` and F are non-increasing in `p`, and
`calibrate_rate` bisects `p` in [0, 1) for `F(p) = target` (60 halvings),
then takes whichever side of the step F makes at that point lies closer to
the target. Schedules are compared at equal F; the rounding of `k_l`
leaves each within a unit's share of the target (reported).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_eff.core.technique import Technique, mask_as_array
from fedjax_eff.models.structure import ForwardPlan, WidthGroup, accepts

PyTree = Any
SCHEDULES = ('constant', 'size', 'params', 'depth')
SCOPES = ('units', 'all')
# Keep ratios of the nested sub-models a run with federated dropout reports.
NESTED_KEEPS = (0.25, 0.5, 0.75, 1.0)


def width_groups(model, scope: str = 'units') -> tuple[WidthGroup, ...]:
  """The model's width groups in `scope` ('units': the layers' own units;
  'all': every width the stack allows; module docstring)."""
  if scope not in SCOPES:
    raise ValueError(f'federated_dropout scope={scope!r} is not one of '
                     f'{SCOPES}.')
  groups = tuple(g for g in tuple(getattr(model, 'width_groups', ()) or ())
                 if scope == 'all' or g.scope == 'units')
  if not groups:
    raise ValueError(f'{type(model).__name__} declares no width groups '
                     '(`width_groups`); federated dropout needs a model '
                     'that does (mlp, cnn, transformer, vit, conformer_*).')
  return groups


def group_params(groups: Sequence[WidthGroup], params: PyTree
                 ) -> tuple[int, ...]:
  """Per group, the parameters whose axes it indexes (member leaves,
  each counted once per group): the `params` schedule's size."""
  shapes = _shapes(params)
  return tuple(sum(int(np.prod(shapes[p])) for p in
                   dict.fromkeys(path for path, _ in g.members))
               for g in groups)


def group_rates(groups: Sequence[WidthGroup], rate, schedule='constant',
                rate_first: float = 0.0, params: PyTree = None
                ) -> tuple[float, ...]:
  """`p_l` per group from a base `rate` (or an explicit list); `params`
  (the model's parameters or their shapes) for the `params` schedule."""
  if isinstance(rate, (list, tuple)):
    if len(rate) != len(groups):
      raise ValueError(f'federated_dropout rate list has {len(rate)} '
                       f'entries for {len(groups)} width groups '
                       f'{[g.name for g in groups]}.')
    rates = tuple(float(r) for r in rate)
  elif schedule == 'constant':
    rates = (float(rate),) * len(groups)
  elif schedule == 'size':
    widest = max(g.width for g in groups)
    rates = tuple(float(rate) * g.width / widest for g in groups)
  elif schedule == 'params':
    if params is None:
      raise ValueError("federated_dropout schedule='params' needs the "
                       'parameters (their shapes).')
    sizes = group_params(groups, params)
    rates = tuple(float(rate) * n / max(sizes) for n in sizes)
  elif schedule == 'depth':
    lo, hi = min(g.depth for g in groups), max(g.depth for g in groups)
    span = max(hi - lo, 1)
    rates = tuple(rate_first + (float(rate) - rate_first) * (g.depth - lo)
                  / span for g in groups)
  else:
    raise ValueError(f'federated_dropout schedule={schedule!r} is not one '
                     f'of {SCHEDULES} (or give a list of rates).')
  bad = [r for r in rates if not 0.0 <= r < 1.0]
  if bad:
    raise ValueError(f'federated_dropout rates must be in [0, 1); got {bad}.')
  return rates


def kept_counts(groups: Sequence[WidthGroup], rates: Sequence[float]
                ) -> tuple[int, ...]:
  """`round((1 - p_l) * width_l)` units per group, at least one."""
  return tuple(max(1, int(math.floor((1.0 - p) * g.width + 0.5)))
               for g, p in zip(groups, rates))


def _shapes(params: PyTree, prefix: str = '') -> dict[str, tuple]:
  """`{'a/b/kernel': shape}` of a nested dict of arrays (or shapes)."""
  out = {}
  for k, v in params.items():
    if isinstance(v, dict) or hasattr(v, 'items'):
      out.update(_shapes(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = tuple(np.shape(v))
  return out


def kept_fraction(groups: Sequence[WidthGroup], params: PyTree,
                  counts: Sequence[int]) -> float:
  """The fraction of `params`' entries in the sub-model that keeps
  `counts[l]` units of group `l` (module docstring: F)."""
  shapes = _shapes(params)
  scale = {p: [1.0] * len(s) for p, s in shapes.items()}
  for g, k in zip(groups, counts):
    for path, axis in g.members:
      scale[path][axis] *= k / g.width
  total = sum(int(np.prod(s)) for s in shapes.values())
  kept = sum(int(np.prod(s)) * float(np.prod(scale[p]))
             for p, s in shapes.items())
  return kept / total


def schedule_fraction(groups: Sequence[WidthGroup], params: PyTree, rate,
                      schedule: str = 'constant', rate_first: float = 0.0
                      ) -> float:
  """F at base `rate` under `schedule`: the kept fraction of the
  parameters."""
  return kept_fraction(groups, params, kept_counts(groups, group_rates(
      groups, rate, schedule, rate_first, params)))


def calibrate_rate(groups: Sequence[WidthGroup], params: PyTree,
                   target: float, schedule: str = 'constant',
                   rate_first: float = 0.0) -> float:
  """The base rate whose sub-model keeps the fraction of the parameters
  closest to `target` under `schedule` (bisection on the non-increasing
  F; module docstring). Raises if the schedule cannot reach `target`."""
  if not 0.0 < target <= 1.0:
    raise ValueError(f'target_fraction={target} must be in (0, 1].')
  lo = rate_first if schedule == 'depth' else 0.0
  # Highest base rate group_rates accepts (every p_l < 1).
  hi = 1.0 - 1e-9
  frac = lambda r: schedule_fraction(groups, params, r, schedule, rate_first)
  if frac(lo) < target:
    raise ValueError(f'federated_dropout: schedule {schedule!r} keeps '
                     f'{frac(lo):.3f} of the parameters at its lowest rate '
                     f'{lo}; target_fraction={target} needs less dropout.')
  if frac(hi) > target:
    raise ValueError(f'federated_dropout: schedule {schedule!r} keeps '
                     f'{frac(hi):.3f} of the parameters even at rate ~1 '
                     f'(rate_first={rate_first}); target_fraction={target}'
                     ' is out of its reach.')
  a, b = lo, hi  # frac(a) >= target >= frac(b)
  for _ in range(60):
    m = 0.5 * (a + b)
    if frac(m) >= target:
      a = m
    else:
      b = m
  return min((a, b), key=lambda r: (abs(frac(r) - target), r))


def describe(model, params: PyTree, rate=0.25, schedule: str = 'constant',
             rate_first: float = 0.0, scope: str = 'units',
             target_fraction: float | None = None) -> dict:
  """What a federated-dropout setting trains: the base rate (calibrated
  when `target_fraction` is given), per group its rate and kept units, and
  the kept fraction of the parameters."""
  groups = width_groups(model, scope)
  if target_fraction is not None:
    rate = calibrate_rate(groups, params, target_fraction, schedule,
                          rate_first)
  rates = group_rates(groups, rate, schedule, rate_first, params)
  counts = kept_counts(groups, rates)
  return dict(rate=rate, schedule=schedule, rate_first=rate_first,
              scope=scope, fraction=kept_fraction(groups, params, counts),
              groups={g.name: dict(width=g.width, rate=r, kept=k)
                      for g, r, k in zip(groups, rates, counts)})


# ----------------------------------------------------------- gather/scatter --

def _get(tree, path: str):
  for k in path.split('/'):
    tree = tree[k]
  return tree


def _set(tree, path: str, value):
  """A copy of nested dict `tree` with `path` replaced (shares the rest)."""
  head, _, rest = path.partition('/')
  out = dict(tree)
  out[head] = _set(tree[head], rest, value) if rest else value
  return out


def take_units(x: jax.Array, idx: jax.Array, axis: int,
               width: int) -> jax.Array:
  """The entries of `x` on `axis` that belong to units `idx` of `width`."""
  axis %= x.ndim
  n = x.shape[axis]
  m = n // width
  y = x.reshape(x.shape[:axis] + (m, width) + x.shape[axis + 1:])
  y = jnp.take(y, idx, axis=axis + 1)
  return y.reshape(x.shape[:axis] + (m * idx.shape[0],) + x.shape[axis + 1:])


def put_units(x: jax.Array, idx: jax.Array, axis: int, width: int,
              full: int) -> jax.Array:
  """Inverse of `take_units`: `x` scattered into zeros of length `full`."""
  axis %= x.ndim
  m = full // width
  k = idx.shape[0]
  y = x.reshape(x.shape[:axis] + (m, k) + x.shape[axis + 1:])
  out = jnp.zeros(x.shape[:axis] + (m, width) + x.shape[axis + 1:], x.dtype)
  index = (slice(None),) * (axis + 1) + (idx,)
  out = out.at[index].set(y)
  return out.reshape(x.shape[:axis] + (full,) + x.shape[axis + 1:])


def check_groups(groups: Sequence[WidthGroup], params: PyTree):
  """Every member exists and its axis is a whole number of unit blocks."""
  for g in groups:
    for path, axis in g.members:
      try:
        leaf = _get(params, path)
      except (KeyError, TypeError):
        raise ValueError(f'width group {g.name!r}: no parameter {path!r}.'
                         ) from None
      n = np.shape(leaf)[axis]
      if n % g.width:
        raise ValueError(f'width group {g.name!r}: {path} axis {axis} has '
                         f'length {n}, not a multiple of width {g.width}.')


def gather(params: PyTree, groups: Sequence[WidthGroup],
           indices: Sequence[jax.Array]) -> PyTree:
  """The sub-model: every member axis narrowed to its group's kept units."""
  for g, idx in zip(groups, indices):
    for path, axis in g.members:
      params = _set(params, path, take_units(_get(params, path), idx, axis,
                                             g.width))
  return params


def scatter(sub: PyTree, like: PyTree, groups: Sequence[WidthGroup],
            indices: Sequence[jax.Array]) -> PyTree:
  """A sub-model-shaped tree back in `like`'s shapes, zeros elsewhere.

  Undoes `gather` in reverse order, so a leaf narrowed by two groups
  (e.g. a recurrent kernel) is widened on each axis in turn.
  """
  steps = [(g, idx, path, axis) for g, idx in zip(groups, indices)
           for path, axis in g.members]
  # Each member's full length, before any narrowing of its leaf.
  full = {(path, axis): np.shape(_get(like, path))[axis]
          for _, _, path, axis in steps}
  for g, idx, path, axis in reversed(steps):
    sub = _set(sub, path, put_units(_get(sub, path), idx, axis, g.width,
                                    full[(path, axis)]))
  return sub


# -------------------------------------------------------------- technique --

def federated_dropout(model, init_params: PyTree, rate=0.25,
                      schedule: str = 'constant', rate_first: float = 0.0,
                      tier_rates: Sequence[float] = (),
                      keeps: Sequence[float] = NESTED_KEEPS,
                      scope: str = 'units',
                      target_fraction: float | None = None) -> Technique:
  """Each client trains a random dense sub-model of the model's width
  groups in `scope` (module docstring). `tier_rates[t]` replaces `rate` for
  device tier `t`. `target_fraction`: the base rate is calibrated so the
  sub-model keeps that fraction of the parameters under `schedule`
  (`calibrate_rate`; `rate` is then ignored). Its `report` evaluates the
  nested sub-models of the same groups at `keeps` (`submodel_report`)."""
  groups = width_groups(model, scope)
  check_groups(groups, init_params)
  if not accepts(model, 'widths'):
    raise ValueError(f'{type(model).__name__}.__call__ takes no `widths`: '
                     'it cannot run a narrower sub-model.')
  if target_fraction is not None:
    if tier_rates or isinstance(rate, (list, tuple)):
      raise ValueError('federated_dropout: target_fraction calibrates one '
                       'base rate; it does not combine with tier_rates or '
                       'a list of rates.')
    rate = calibrate_rate(groups, init_params, float(target_fraction),
                          schedule, rate_first)

  def program(base_rate, name):
    counts = kept_counts(groups, group_rates(groups, base_rate, schedule,
                                             rate_first, init_params))
    widths = tuple((g.name, n) for g, n in zip(groups, counts))

    def plan(rng, round_num, ctx):
      del round_num, ctx
      keys = jax.random.split(rng, len(groups))
      return tuple(
          jnp.sort(jax.random.permutation(k, g.width)[:n]).astype(jnp.int32)
          for k, g, n in zip(keys, groups, counts))

    def merge(server_params, delta, mask, indices):
      cov = jax.tree.map(lambda d, m: mask_as_array(m, d.shape, d.dtype),
                         delta, mask)
      return (scatter(delta, server_params, groups, indices),
              scatter(cov, server_params, groups, indices))

    return Technique(
        name=name, plan=plan,
        view=lambda params, indices: gather(params, groups, indices),
        forward=lambda indices: ForwardPlan(widths=widths), merge=merge)

  report = submodel_report(model, keeps, scope)
  if not tier_rates:
    return program(rate, 'federated_dropout')._replace(report=report)
  tiers = tuple(tier_rates)
  base = program(tiers[0], 'federated_dropout')
  programs = {t: program(r, f'federated_dropout_tier{t}')
              for t, r in enumerate(tiers)}

  def specialize(stage, tier):
    del stage
    if tier not in programs:
      raise ValueError(f'federated_dropout: no rate for device tier {tier} '
                       f'(tier_rates={list(tiers)}).')
    return programs[tier]
  return base._replace(specialize=specialize, report=report)


def submodel(model, params: PyTree, keep: float, which: str = 'first',
             rng: jax.Array | None = None, scope: str = 'units'
             ) -> tuple[PyTree, ForwardPlan]:
  """A nested sub-model at keep ratio `keep` in every width group of
  `scope`: its params and the forward kwargs that run it alone.

  `which='first'`: units 0..k-1 (Guliani et al.'s nested sub-models);
  `'random'`: a random subset from `rng`.
  """
  if not 0.0 < keep <= 1.0:
    raise ValueError(f'keep={keep} must be in (0, 1].')
  groups = width_groups(model, scope)
  counts = kept_counts(groups, [1.0 - keep] * len(groups))
  if which == 'first':
    indices = [jnp.arange(n, dtype=jnp.int32) for n in counts]
  elif which == 'random':
    keys = jax.random.split(rng if rng is not None else jax.random.key(0),
                            len(groups))
    indices = [jnp.sort(jax.random.permutation(k, g.width)[:n])
               for k, g, n in zip(keys, groups, counts)]
  else:
    raise ValueError(f"which={which!r} is not 'first' or 'random'.")
  return (gather(params, groups, indices),
          ForwardPlan(widths=tuple((g.name, n)
                                   for g, n in zip(groups, counts))))


def submodel_report(model, keeps: Sequence[float] = NESTED_KEEPS,
                    scope: str = 'units'):
  """`Technique.report` of the nested sub-models (Guliani et al.: a model
  trained with federated dropout serves smaller devices as it is).

  `report(params, evaluate)`: for each `keep` of `keeps`, the sub-model of
  the first `keep` of every width group's units (`submodel`) evaluated
  alone, `evaluate(sub_params, widths=...)`, each metric `m` reported as
  `keep<keep>/m` (e.g. `keep0.5/test_accuracy`).
  """
  keeps = tuple(float(k) for k in keeps)

  def report(params, evaluate):
    out = {}
    for keep in keeps:
      sub, forward = submodel(model, params, keep, scope=scope)
      for k, v in evaluate(sub, **forward).items():
        out[f'keep{keep:g}/{k}'] = v
    return out
  return report
