"""Masks built from a model's layer structure.

Models name their parameter groups (`models/structure.py`: `LayerStructure`,
`structure_of`, re-exported here): an ordered list of layers (input to
output), the embedding and the head(s). Layer-structured
techniques address "layer i", "the last n layers" or a path regex through
this one view, and turn the choice into a trainable mask over the top-level
parameter names: static Python bools when the choice is fixed at trace time
(a real saving: no gradient, no optimizer state, no upload), arrays when it
is drawn per round or per client.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp

from fedjax_eff.models.structure import LayerStructure, structure_of

PyTree = Any


def path_name(path) -> str:
  """'block_3/attn/query/kernel' for a `jax.tree_util` key path."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return '/'.join(parts)


def static_mask(params: PyTree, trains) -> PyTree:
  """Static mask: leaf -> `trains(top_level_name, path)` as a Python bool."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(trains(path_name(path[:1]), path_name(path))),
      params)


def names_mask(params: PyTree, names: Iterable[str],
               pattern: str | None = None) -> PyTree:
  """Static mask training the named top-level groups and regex matches."""
  names = set(names)
  rx = re.compile(pattern) if pattern else None
  return static_mask(params, lambda top, path: top in names or (
      rx is not None and rx.search(path) is not None))


def layer_gate_mask(params: PyTree, structure: LayerStructure,
                    layer_on: jax.Array, others: bool | jax.Array) -> PyTree:
  """Dynamic mask: a leaf of layer i trains iff `layer_on[i]`; leaves that
  belong to no layer get `others` (static bool or array)."""
  def leaf(path, _):
    i = structure.layer_index(path_name(path[:1]))
    if i is None:
      return others
    return layer_on[i].astype(jnp.float32)
  return jax.tree_util.tree_map_with_path(leaf, params)


def check_layers(structure: LayerStructure, layers: Sequence[int],
                 what: str) -> tuple[int, ...]:
  layers = tuple(int(i) for i in layers)
  bad = [i for i in layers if not 0 <= i < structure.num_layers]
  if bad:
    raise ValueError(f'{what}: layer indices {bad} are outside [0, '
                     f'{structure.num_layers}) of {structure.layers}.')
  return layers
