"""What a model publishes about itself: the model side of the contract with
techniques.

Techniques (`fedjax_eff/techniques`) read a model only through these types;
models import nothing from techniques.

* `LayerStructure` (`structure_of(model)`): the model's top-level parameter
  groups by role: embedding, ordered layers (input to output), head(s).
* `WidthGroup` (a model's `width_groups`): units kept or dropped together
  by federated dropout, and the parameter axes they index.
* `ForwardPlan`: the keyword arguments a technique passes to the model's
  `__call__` (`depth`, `stop_below`, `layer_gates`, `layer_drop_rate`,
  `task`, `widths`, ...), as an immutable mapping. Plans of several
  techniques merge (`a | b`, `merge_forward`) and the merge raises when two
  set one key to different values, instead of the later one silently
  winning.
* `FORWARD_KEYS` (a class attribute of each model): the forward keys its
  `__call__` accepts, besides its input and `train`. `forward_keys(model)`
  reads it, `check_forward(model, plan)` rejects a plan with a key the model
  does not accept, and `supported_forward(model, **kwargs)` keeps the keys
  it accepts (for techniques whose forward kwargs are an optional saving,
  e.g. `stop_below` on a model without a layer stack).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import jax
import numpy as np


# ------------------------------------------------------------ layer structure

class LayerStructure(NamedTuple):
  """A model's top-level parameter names by role; `layers` ordered input to
  output. Layer-structured techniques address "layer i", "the last n
  layers" or "the head" through it."""
  embed: tuple[str, ...]
  layers: tuple[str, ...]
  head: tuple[str, ...]

  @property
  def num_layers(self) -> int:
    return len(self.layers)

  def layer_index(self, name: str) -> int | None:
    return self.layers.index(name) if name in self.layers else None


def structure_of(model) -> LayerStructure:
  """The structure a model declares (`groups`, else `layer_names`).

  Layer stacks declare `groups = {'embed': ..., 'layers': ..., 'head': ...}`.
  Models without `groups` (the small classifiers) list every layer in
  `layer_names` with the output layer last; that one is the head.
  """
  groups = getattr(model, 'groups', None)
  if groups:
    return LayerStructure(tuple(groups.get('embed', ())),
                          tuple(groups['layers']), tuple(groups['head']))
  names = tuple(model.layer_names)
  return LayerStructure((), names[:-1], names[-1:])


# -------------------------------------------------------------- width groups

class WidthGroup(NamedTuple):
  """Units that are kept or dropped together, and the axes they index.

  A model lists its groups in `width_groups` and runs narrower from the
  forward key `widths=((group name, kept units), ...)`. `members`:
  `(parameter path, axis)` pairs, e.g. `('dense0/kernel', 1)`,
  `('dense0/bias', 0)`, `('head/kernel', 0)`; an axis of length
  `m * width` holds `m` blocks of the units, unit index minor. `depth`: the
  group's position from input to output (federated dropout's `depth` rate
  schedule; a group shared by every block, the residual width, sits in the
  middle, so a linear ramp gives it the blocks' mean rate).

  `scope`: 'units' for the units a layer owns alone (hidden units, heads,
  feed-forward units, a CNN's or an LSTM's channels): federated dropout's
  default. 'all' for the widths that several layers share or that pass
  through a LayerNorm (a layer stack's residual width, a conformer's conv
  channels, a front end's conv channels, an LSTM's embedding width): used
  when federated dropout is asked for `scope='all'`. Either way the
  narrower model is the full one with the dropped units zeroed (LayerNorms
  of a narrowed width keep the full width's statistics:
  `layers.WidthLayerNorm`).
  """
  name: str
  width: int
  members: tuple[tuple[str, int], ...]
  depth: float = 0
  scope: str = 'units'


# -------------------------------------------------------------- forward plan

def _is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def same_value(a, b) -> bool:
  """Whether two forward values are provably equal.

  Python values compare with `==` (tuples elementwise), concrete arrays
  (numpy or jax) by shape and contents. A traced value equals only
  itself: two techniques drawing, say, `layer_gates` each is a conflict
  even if the draws could coincide.
  """
  if a is b:
    return True
  if _is_tracer(a) or _is_tracer(b):
    return False
  if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
    return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
  arrays = (np.ndarray, np.generic, jax.Array)
  if isinstance(a, arrays) or isinstance(b, arrays):
    if a is None or b is None:
      return False
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool(np.array_equal(a, b))
  try:
    return bool(a == b)
  except Exception:  # pylint: disable=broad-except
    return False


class ForwardPlan(Mapping[str, Any]):
  """The keyword arguments a technique passes to `model.apply`: an
  immutable mapping from forward key to value.

  Keys the models of `fedjax_eff.models` accept (each model's
  `FORWARD_KEYS` lists its own):
    depth            run the first n layers only (static int)
    stop_below       no gradient into layers below this one (static int)
    layer_gates      `[L]` bools: skip layer i where False (static or array)
    layer_drop_rate  `[L]` per-step skip probabilities
    task             which task's modules and head (static int)
    widths           `((width group, kept units), ...)`: a narrower model
    features         return the head's input instead of the output
  Values are Python values (static: they shape the program) or arrays
  (e.g. per-client gates drawn inside the round).

  `a | b` (and `ForwardPlan.merge(*plans)`) is the union of two plans;
  a key both set must hold the same value (`same_value`), else ValueError
  naming the key. A plan is a `Mapping`, so `model.apply(v, x, **plan)`,
  `dict(plan)` and `plan == {'depth': 2}` work as with a dict.
  """

  __slots__ = ('_items',)

  def __init__(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]]
               = (), /, **kwargs: Any):
    items = dict(items, **kwargs)
    bad = [k for k in items if not isinstance(k, str)]
    if bad:
      raise TypeError(f'ForwardPlan keys must be str; got {bad}.')
    object.__setattr__(self, '_items', items)

  def __setattr__(self, name, value):
    raise AttributeError('ForwardPlan is immutable; merge with `|`.')

  def __reduce__(self):  # copy/pickle without __setattr__
    return (ForwardPlan, (self._items,))

  def __getitem__(self, key: str) -> Any:
    return self._items[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._items)

  def __len__(self) -> int:
    return len(self._items)

  def __repr__(self) -> str:
    inner = ', '.join(f'{k}={v!r}' for k, v in self._items.items())
    return f'ForwardPlan({inner})'

  def __or__(self, other: Mapping[str, Any]) -> 'ForwardPlan':
    if not isinstance(other, Mapping):
      return NotImplemented
    return ForwardPlan.merge(self, other)

  def __ror__(self, other: Mapping[str, Any]) -> 'ForwardPlan':
    if not isinstance(other, Mapping):
      return NotImplemented
    return ForwardPlan.merge(other, self)

  @staticmethod
  def merge(*plans: Mapping[str, Any] | None,
            names: Sequence[str] | None = None) -> 'ForwardPlan':
    """The union of `plans` (dicts or plans; None = empty).

    Raises ValueError naming the key (and, given `names`, the two plans'
    owners, e.g. technique names) when two plans set one key to values
    that are not `same_value`. Equal values merge; the first one is kept.
    """
    out: dict[str, Any] = {}
    owner: dict[str, int] = {}
    for i, plan in enumerate(plans):
      for k, v in (plan or {}).items():
        if k in out and not same_value(out[k], v):
          who = ''
          if names is not None:
            who = f' by {names[owner[k]]!r} and {names[i]!r}'
          raise ValueError(
              f'forward key {k!r} is set to different values{who}: '
              f'{out[k]!r} vs {v!r}. Two techniques disagree on how the '
              'model runs; drop one or make them agree.')
        if k not in out:
          out[k] = v
          owner[k] = i
    return ForwardPlan(out)

  def without(self, *keys: str) -> 'ForwardPlan':
    """This plan less `keys`."""
    return ForwardPlan({k: v for k, v in self._items.items()
                        if k not in keys})


def merge_forward(parts: Iterable[Mapping[str, Any] | None],
                  names: Sequence[str] | None = None,
                  model=None) -> dict:
  """Merged forward kwargs of several techniques, as a plain dict.

  `parts`: each technique's forward kwargs (dicts or `ForwardPlan`s, None =
  none), in chain order; `names`: their owners for the error message.
  Raises ValueError naming the key when two parts set it to different
  values (`ForwardPlan.merge`). With `model`, also raises if the merged
  plan has a key the model does not accept (`check_forward`).
  """
  plan = ForwardPlan.merge(*parts, names=names)
  if model is not None:
    check_forward(model, plan)
  return dict(plan)


# ------------------------------------------------ what a model's forward takes

def forward_keys(model) -> frozenset[str]:
  """The forward keys `model` declares (`FORWARD_KEYS`, class attribute):
  the keyword arguments of its `__call__` besides its input and `train`.
  A model that declares none accepts none."""
  return frozenset(getattr(type(model), 'FORWARD_KEYS', ()))


def check_forward(model, plan: Mapping[str, Any]) -> None:
  """Raises ValueError if `plan` has a key `model` does not accept."""
  unknown = sorted(set(plan) - forward_keys(model))
  if unknown:
    raise ValueError(
        f'{type(model).__name__} does not accept forward key(s) {unknown}; '
        f'its FORWARD_KEYS are {sorted(forward_keys(model))}.')


def accepts(model, *keys: str) -> bool:
  """Whether `model`'s forward takes every one of `keys`."""
  return set(keys) <= forward_keys(model)


def supported_forward(model, **kwargs: Any) -> ForwardPlan:
  """The plan of `kwargs` that `model` accepts, None values left out.

  For forward kwargs that are an optional saving (`stop_below` on a model
  without a layer stack trains the same, only slower): a key the model
  does not declare is dropped, not an error. Use `ForwardPlan` plus
  `check_forward` where the key is required.
  """
  keys = forward_keys(model)
  return ForwardPlan({k: v for k, v in kwargs.items()
                      if k in keys and v is not None})


__all__ = ['ForwardPlan', 'LayerStructure', 'WidthGroup', 'accepts',
           'check_forward', 'forward_keys', 'merge_forward', 'same_value',
           'structure_of', 'supported_forward']
