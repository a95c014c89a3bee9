"""Exact sizes of pytrees: bits on the wire, bytes in memory.

Counts are Python ints computed from shapes and dtypes alone, so they work on
concrete arrays and on `jax.ShapeDtypeStruct`s alike, never allocate, and do
not overflow or round the way an int32/float32 counter inside a jitted
program would (a 1B-parameter model is 3.2e10 bits).

Masks follow the trainable-mask convention of `core/technique.py`: a mask is a
pytree matching the values (or a prefix of it: `{'encoder': False}` covers
every leaf under 'encoder'); a leaf that is a Python bool or int (or a
concrete 0-d array) selects or drops the whole leaf. `leaf_bits` also takes a
concrete array mask leaf, broadcast against the value, and then counts its
nonzero entries: what a per-parameter (dynamic) mask uploads.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

PyTree = Any


def mask_leaves(tree: PyTree, mask: PyTree | None) -> list[Any]:
  """One mask entry per leaf of `tree` (in `jax.tree.leaves` order).

  `mask=None` selects every leaf; a prefix mask is broadcast down to the
  leaves it covers.
  """
  treedef = jax.tree.structure(tree)
  if mask is None:
    return [True] * treedef.num_leaves
  return treedef.flatten_up_to(jax.tree.broadcast(mask, tree))


def static_flag(m: Any) -> bool | None:
  """The truth value of a static mask leaf, or None for an array mask.

  Static: Python bools/ints and concrete 0-d (numpy or jax) arrays.
  """
  if isinstance(m, (bool, int, np.bool_, np.integer)):
    return bool(m)
  if isinstance(m, jax.core.Tracer):
    return None
  if hasattr(m, 'shape') and tuple(m.shape) == ():
    return bool(m)
  return None


def shape_dtype(x: Any) -> tuple[tuple[int, ...], Any]:
  """(shape, dtype) of an array, a ShapeDtypeStruct or a Python scalar."""
  if hasattr(x, 'shape') and hasattr(x, 'dtype'):
    return tuple(x.shape), x.dtype
  aval = jax.typeof(x)  # Python scalars: their default (canonical) dtype
  return tuple(aval.shape), aval.dtype


def dtype_bits(dtype: Any) -> int:
  """Bits per value; a PRNG key counts as its raw key data (e.g. 2 uint32)."""
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), dtype))
    return math.prod(data.shape) * np.dtype(data.dtype).itemsize * 8
  return np.dtype(dtype).itemsize * 8


def _count(leaf: Any, m: Any) -> int:
  """How many values of `leaf` mask entry `m` selects."""
  shape, _ = shape_dtype(leaf)
  flag = static_flag(m)
  if flag is not None:
    return math.prod(shape) if flag else 0
  if isinstance(m, jax.core.Tracer):
    raise TypeError(
        'leaf_bits needs a concrete mask; inside a jitted program count with '
        'array ops (e.g. jnp.sum(mask)) instead.')
  return int(np.count_nonzero(np.broadcast_to(np.asarray(m), shape)))


def leaf_bits(tree: PyTree, mask: PyTree | None = None,
              bits_per_value: int | None = 32) -> int:
  """Exact bits of the values of `tree` that `mask` selects.

  Args:
    tree: arrays or `jax.ShapeDtypeStruct`s (only shapes are read).
    mask: None (every leaf), or a (prefix) pytree of static bools or
      concrete array masks; see the module docstring.
    bits_per_value: bits each value costs on the wire (32: float32; 8, 4, 1
      for quantized messages). None: each leaf's own dtype width.
  """
  total = 0
  for leaf, m in zip(jax.tree.leaves(tree), mask_leaves(tree, mask)):
    n = _count(leaf, m)
    if n:
      width = (bits_per_value if bits_per_value is not None
               else dtype_bits(shape_dtype(leaf)[1]))
      total += n * int(width)
  return total


def tree_bytes(tree: PyTree, mask: PyTree | None = None) -> int:
  """Bytes the selected leaves of `tree` occupy at their own dtypes."""
  return bits_to_bytes(leaf_bits(tree, mask, bits_per_value=None))


def bits_to_bytes(bits: int) -> int:
  """Whole bytes needed for `bits` (rounded up: a message is sent in bytes)."""
  return -(-int(bits) // 8)
