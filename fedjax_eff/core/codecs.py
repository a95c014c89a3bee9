"""Codecs: what a client's update becomes on the wire, and back.

A codec is a pair of pure functions over *wire trees* (pytrees whose leaves
are `Wire` nodes, or nodes built from them):

  msg = encode(tree, rng)      tree: a wire tree (any codec's output)
  tree = decode(msg)           the wire tree `encode` received, same structure

so codecs are closed under composition: `chain_codecs(a, b)` encodes with
`a` then `b` and decodes with `b` then `a`. Bits are counted on the final
message only (`message_bits`): each `Wire` node says how many bits one of
its values costs and how many of its values travel.

The tree a round starts from is the client's delta in the shape of the
model it trained (`to_wire(delta, mask)`):

  * a statically frozen leaf (mask `False`) becomes an unsent `Wire`: it
    costs nothing and every codec passes it through;
  * a fully trained leaf (mask `True`) sends all of its values (fp32: 32
    bits each);
  * a dynamically masked leaf sends `count = Σ mask` values (the server
    knows the mask from the plan it shares with the client).

Codecs here:
  quantize_codec  k-bit unbiased stochastic quantization per block (Suresh
                  et al. 2017; Ro et al. 2022): k bits per value plus lo, hi
                  per block (64 bits).
  topk_codec      top-k sparsification by magnitude (Aji & Heafield 2017;
                  Stich et al. 2018): k values plus k indices of
                  ceil(log2 n) bits each.

Either order composes. Top-k then quantization quantizes the k kept values
(the indices are integers and pass through). Quantization then top-k keeps
the k codes whose dequantized values are largest in magnitude; a dropped
entry decodes to its block's code nearest zero (within half a grid step of
0), which the server computes from the lo and hi it receives.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


@struct.dataclass
class Wire:
  """Values that travel: `count` of them (all when None) at `bits` each.

  `sent=False` marks a statically frozen leaf: it travels not at all and
  codecs leave it as it is (its `values` are the zeros the server reads).
  """
  values: jax.Array
  count: Any = None  # None: every value; else a traced scalar
  bits: int = struct.field(pytree_node=False, default=32)
  sent: bool = struct.field(pytree_node=False, default=True)
  # A traced bits-per-value overriding `bits` (a replica's own quantization
  # bits, `core.technique.hparam`); `bits` is then the code dtype's width.
  traced_bits: Any = None

  def num_bits(self):
    if not self.sent:
      return 0.0
    if self.traced_bits is not None:
      n = self.values.size if self.count is None else self.count
      return jnp.asarray(n, jnp.float32) * jnp.asarray(self.traced_bits,
                                                       jnp.float32)
    if self.count is None:
      return float(self.values.size * self.bits)
    return jnp.asarray(self.count, jnp.float32) * self.bits


@struct.dataclass
class Quantized:
  """One leaf as k-bit codes on a per-block grid lo + q (hi - lo)/(2^k-1)."""
  codes: Any  # Wire of unsigned codes (or a Sparse of them)
  lo: Wire    # [num_blocks] fp32
  hi: Wire
  levels: Any = None  # traced 2^k - 1 (a replica's own k), else from bits
  bits: int = struct.field(pytree_node=False, default=8)
  block_size: int = struct.field(pytree_node=False, default=0)
  source_bits: int = struct.field(pytree_node=False, default=32)
  dtype: Any = struct.field(pytree_node=False, default=jnp.float32)


@struct.dataclass
class Sparse:
  """k of a leaf's entries: their values and their flat indices.

  `fill` is what the decoder puts at the entries not sent (0 for values;
  the zero code for quantization codes); it is not on the wire, the
  decoder knows or derives it. `count` is the dense leaf's own count.
  """
  values: Wire
  indices: Wire
  fill: Any
  count: Any = None
  shape: tuple = struct.field(pytree_node=False, default=())


def is_frozen(mask_leaf) -> bool:
  """True for a statically frozen leaf (the Python bool `False`)."""
  return mask_leaf is False or (isinstance(mask_leaf, np.bool_)
                                and not mask_leaf)


def mask_as_array(mask_leaf, shape, dtype=jnp.float32) -> jax.Array:
  """A mask leaf (static bool or array) broadcast to `shape`."""
  return jnp.broadcast_to(jnp.asarray(mask_leaf, dtype), shape)


def is_node(x) -> bool:
  return isinstance(x, (Wire, Quantized, Sparse))


class Codec(NamedTuple):
  """`encode(tree, rng) -> msg`, `decode(msg) -> tree` over wire trees."""
  name: str
  encode: Callable[[PyTree, jax.Array], PyTree]
  decode: Callable[[PyTree], PyTree]


def to_wire(tree: PyTree, mask: PyTree, bits: int = 32) -> PyTree:
  """The client's delta as a wire tree (see the module docstring)."""
  def leaf(x, m):
    if is_frozen(m):
      return Wire(x, None, bits, sent=False)
    if m is True or isinstance(m, (bool, np.bool_)):
      return Wire(x, None, bits)
    return Wire(x, jnp.sum(mask_as_array(m, x.shape)), bits)
  return jax.tree.map(leaf, tree, mask)


def from_wire(msg: PyTree) -> PyTree:
  """The values of a decoded wire tree (the inverse of `to_wire`)."""
  return jax.tree.map(lambda w: w.values, msg,
                      is_leaf=lambda x: isinstance(x, Wire))


def message_bits(msg: PyTree):
  """Exact bits of a message: Σ over its `Wire` nodes of count x bits.

  A Python float when every count is static (exact to 2^53 and usable at
  trace time), an array otherwise.
  """
  total = 0.0
  static = 0.0
  for w in jax.tree.leaves(msg, is_leaf=lambda x: isinstance(x, Wire)):
    if not isinstance(w, Wire):  # e.g. a Sparse's fill: not on the wire
      continue
    b = w.num_bits()
    if isinstance(b, float):
      static += b
    else:
      total = total + b
  if isinstance(total, float):
    return static
  return total + static


def unsent(msg: PyTree) -> PyTree:
  """`msg` with nothing on the wire (0 bits), values kept: e.g. local
  training, where a client applies its own update."""
  return jax.tree.map(lambda w: w.replace(sent=False), msg,
                      is_leaf=lambda x: isinstance(x, Wire))


def identity_codec() -> Codec:
  return Codec('fp32', lambda tree, rng: tree, lambda msg: msg)


def chain_codecs(*codecs: Codec) -> Codec:
  """Encode with each codec in order, decode in reverse (closed)."""
  if len(codecs) == 1:
    return codecs[0]

  def encode(tree, rng):
    keys = jax.random.split(rng, max(len(codecs), 1))
    for c, k in zip(codecs, keys):
      tree = c.encode(tree, k)
    return tree

  def decode(msg):
    for c in reversed(codecs):
      msg = c.decode(msg)
    return msg
  return Codec('+'.join(c.name for c in codecs), encode, decode)


# Quantization.

def _blocks(x, block_size):
  """Flattened `x` padded to whole blocks: `[num_blocks, block]`."""
  flat = x.reshape(-1)
  b = block_size or max(flat.size, 1)
  nb = -(-flat.size // b)
  return jnp.pad(flat, (0, nb * b - flat.size)).reshape(nb, b)


def _code_dtype(bits):
  return jnp.uint8 if bits <= 8 else (jnp.uint16 if bits <= 16 else
                                      jnp.uint32)


def code_width(bits: int) -> int:
  """Bits of the integer dtype k-bit codes are held in (8, 16 or 32)."""
  return jnp.dtype(_code_dtype(bits)).itemsize * 8


def levels_of(bits) -> Any:
  """2^k - 1 grid steps: a Python int for a static k, an exact float32
  for a traced one (`jnp.left_shift` on int32: no exp2 rounding)."""
  if isinstance(bits, (int, np.integer)):
    return 2 ** int(bits) - 1
  k = jnp.asarray(bits, jnp.int32)
  return (jnp.left_shift(jnp.int32(1), k) - 1).astype(jnp.float32)


def quantize_leaf(x, rng, bits: int, block_size: int = 0, levels=None):
  """(q, lo, hi): k-bit stochastic quantization of one array.

  q = floor(t + u), t = (x - lo) / (hi - lo) * (2^k - 1), u ~ U[0, 1):
  E[dequantize(q)] = x and |error| <= (hi - lo) / (2^k - 1). `levels`
  (traced 2^k - 1, k <= `bits`) overrides the grid; `bits` then only
  sets the code dtype.
  """
  levels = levels_of(bits) if levels is None else levels
  blocks = _blocks(x.astype(jnp.float32), block_size)
  lo = jnp.min(blocks, axis=1)
  hi = jnp.max(blocks, axis=1)
  scale = jnp.where(hi > lo, (hi - lo) / levels, 1.0)
  t = (blocks - lo[:, None]) / scale[:, None]
  u = jax.random.uniform(rng, blocks.shape)
  q = jnp.clip(jnp.floor(t + u), 0, levels)
  q = q.reshape(-1)[:x.size].reshape(x.shape)
  return q.astype(_code_dtype(bits)), lo, hi


def dequantize_leaf(q, lo, hi, bits: int, block_size: int = 0,
                    dtype=jnp.float32, levels=None):
  levels = levels_of(bits) if levels is None else levels
  blocks = _blocks(q.astype(jnp.float32), block_size if lo.size > 1 else 0)
  scale = jnp.where(hi > lo, (hi - lo) / levels, 0.0)
  x = lo[:, None] + blocks * scale[:, None]
  return x.reshape(-1)[:q.size].reshape(q.shape).astype(dtype)


def zero_codes(q, lo, hi, bits: int, block_size: int = 0):
  """Per entry of `q`: its block's code nearest the value 0."""
  levels = 2 ** bits - 1
  scale = jnp.where(hi > lo, (hi - lo) / levels, 1.0)
  z = jnp.clip(jnp.round(-lo / scale), 0, levels)
  b = (block_size if lo.size > 1 else 0) or max(q.size, 1)
  z = jnp.repeat(z, b)[:q.size].reshape(q.shape)
  return z.astype(q.dtype)


def quantize_codec(bits: int = 8, block_size: int = 0) -> Codec:
  """k-bit unbiased stochastic quantization of every float `Wire`.

  Each node draws its rounding noise from its own key (`split(rng, n)`
  over the message's n `Wire` nodes, in flattening order). `encode(tree,
  rng, traced_bits)`: a traced k' (a replica's own, `code_width(k') ==
  code_width(bits)`) sets the grid and the bit count; `bits` the codes'
  dtype.
  """
  if not 1 <= bits <= 16:
    raise ValueError(f'quantize bits={bits} must be in 1..16.')
  if block_size < 0:
    raise ValueError(f'quantize block_size={block_size} must be >= 0.')

  def encode(tree, rng, traced_bits=None):
    levels = None if traced_bits is None else levels_of(traced_bits)
    nodes, treedef = jax.tree.flatten(
        tree, is_leaf=lambda x: isinstance(x, (Wire, Quantized)))
    keys = jax.random.split(rng, max(len(nodes), 1))
    out = []
    for w, k in zip(nodes, keys):
      if not (isinstance(w, Wire) and w.sent
              and jnp.issubdtype(w.values.dtype, jnp.floating)):
        out.append(w)
        continue
      q, lo, hi = quantize_leaf(w.values, k, bits, block_size, levels)
      meta = None if w.count is None else jnp.where(
          w.count > 0, lo.size, 0)
      out.append(Quantized(Wire(q, w.count, bits, traced_bits=traced_bits),
                           Wire(lo, meta, 32), Wire(hi, meta, 32), levels,
                           bits, block_size, w.bits, w.values.dtype))
    return treedef.unflatten(out)

  def decode(msg):
    def leaf(n):
      if not isinstance(n, Quantized):
        return n
      return Wire(dequantize_leaf(n.codes.values, n.lo.values, n.hi.values,
                                  n.bits, n.block_size, n.dtype, n.levels),
                  n.codes.count, n.source_bits)
    return jax.tree.map(
        leaf, msg, is_leaf=lambda x: isinstance(x, (Wire, Quantized)))

  return Codec(f'quantize{bits}', encode, decode)


# Top-k sparsification.

def index_bits(size: int) -> int:
  """Bits of one flat index into `size` entries: ceil(log2 size), >= 1."""
  return max(1, math.ceil(math.log2(max(size, 2))))


def topk_count(size: int, fraction: float | None, k: int | None) -> int:
  """k for a leaf of `size` entries: `k`, or ceil(fraction x size), in
  [1, size]."""
  n = k if k is not None else math.ceil(fraction * size)
  return int(min(max(n, 1), size))


def _select(w: Wire, rank: jax.Array, k: int, fill) -> Sparse:
  """The k entries of `w` largest in `rank`, as a `Sparse` of `w`."""
  flat = w.values.reshape(-1)
  _, idx = jax.lax.top_k(rank.reshape(-1), k)
  count = None if w.count is None else jnp.minimum(w.count, k)
  return Sparse(Wire(flat[idx], count, w.bits),
                Wire(idx.astype(jnp.int32), count, index_bits(flat.size)),
                fill, w.count, w.values.shape)


def _densify(s: Sparse) -> Wire:
  size = math.prod(s.shape)
  dense = jnp.broadcast_to(jnp.asarray(s.fill, s.values.values.dtype),
                           (size,)) if np.ndim(s.fill) == 0 else (
                               s.fill.reshape(-1))
  dense = dense.at[s.indices.values].set(s.values.values)
  return Wire(dense.reshape(s.shape), s.count, s.values.bits)


def topk_codec(fraction: float | None = None, k: int | None = None) -> Codec:
  """Keeps the k largest-magnitude entries of every sent leaf.

  k per leaf: `k`, or ceil(`fraction` x size) (at least 1, at most the
  leaf's size). A leaf with a dynamic count sends min(k, count) values.
  """
  if (fraction is None) == (k is None):
    raise ValueError('topk needs exactly one of fraction or k.')
  if fraction is not None and not 0.0 < fraction <= 1.0:
    raise ValueError(f'topk fraction={fraction} must be in (0, 1].')
  if k is not None and k < 1:
    raise ValueError(f'topk k={k} must be >= 1.')

  def encode(tree, rng):
    del rng  # deterministic

    def leaf(n):
      if isinstance(n, Wire) and n.sent and jnp.issubdtype(
          n.values.dtype, jnp.floating):
        kk = topk_count(n.values.size, fraction, k)
        return _select(n, jnp.abs(n.values), kk, 0.0)
      if isinstance(n, Quantized) and isinstance(n.codes, Wire) and (
          n.codes.sent):
        q = n.codes.values
        kk = topk_count(q.size, fraction, k)
        lo, hi = n.lo.values, n.hi.values
        deq = dequantize_leaf(q, lo, hi, n.bits, n.block_size)
        z = zero_codes(q, lo, hi, n.bits, n.block_size)
        return n.replace(codes=_select(n.codes, jnp.abs(deq), kk, z))
      return n
    return jax.tree.map(leaf, tree, is_leaf=is_node)

  def decode(msg):
    def leaf(n):
      if isinstance(n, Sparse):
        return _densify(n)
      if isinstance(n, Quantized) and isinstance(n.codes, Sparse):
        return n.replace(codes=_densify(n.codes))
      return n
    return jax.tree.map(leaf, msg, is_leaf=is_node)

  name = f'top{k}' if k is not None else f'top{fraction:g}'
  return Codec(name, encode, decode)


# Bytes on the wire.

def _unsigned(bits: int):
  return {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits]


def pack_bits(codes: jax.Array, bits: int) -> jax.Array:
  """`codes` as a little-endian bit stream: `[ceil(n bits / 8)]` uint8.

  Value i of the flattened `codes` (an unsigned integer < 2^bits, or any
  array whose itemsize is exactly `bits`) occupies bits [i b, (i + 1) b) of
  the stream. Values are packed in groups of G = 32 / gcd(b, 32), whose
  G b bits fill exactly b/gcd(b, 32) 32-bit words; each word of a group is
  a static sum of shifted values, so XLA fuses the packing into one pass
  that writes only the packed words (no temporaries the size of `codes`).
  """
  flat = codes.reshape(-1)
  width = flat.dtype.itemsize * 8
  if not 1 <= bits <= 32:
    raise ValueError(f'pack_bits: bits={bits} must be in 1..32.')
  if width == bits:  # already dense: the bytes themselves
    if bits == 8:
      return jax.lax.bitcast_convert_type(flat, jnp.uint8)
    return jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(flat, _unsigned(bits)), jnp.uint8
    ).reshape(-1)
  if jnp.issubdtype(flat.dtype, jnp.floating):
    raise ValueError(f'pack_bits: {flat.dtype} values cannot travel at '
                     f'{bits} bits (quantize them first).')
  n = flat.size
  group = 32 // math.gcd(bits, 32)
  words = group * bits // 32
  groups = -(-n // group)
  u = jnp.pad(flat, (0, groups * group - n)).reshape(groups, group)
  out = []
  for w in range(words):
    acc = jnp.zeros((groups,), jnp.uint32)
    for p in range(group):
      first, last = p * bits, (p + 1) * bits  # bit range of value p
      if last <= 32 * w or first >= 32 * (w + 1):
        continue
      shift = first - 32 * w
      v = u[:, p].astype(jnp.uint32)
      acc = acc | (v << shift if shift >= 0 else v >> -shift)
    out.append(acc)
  stream = jax.lax.bitcast_convert_type(jnp.stack(out, axis=1), jnp.uint8)
  return stream.reshape(-1)[:-(-n * bits // 8)]


def unpack_bits(stream: jax.Array, bits: int, n: int,
                dtype=jnp.uint32) -> jax.Array:
  """The inverse of `pack_bits`: `[n]` values of `dtype` from the stream."""
  stream = stream.reshape(-1)
  if jnp.dtype(dtype).itemsize * 8 == bits:
    if bits == 8:
      return jax.lax.bitcast_convert_type(stream, dtype)
    return jax.lax.bitcast_convert_type(
        stream.reshape(-1, bits // 8), dtype).reshape(-1)
  pad = (-stream.size) % 4
  words = jax.lax.bitcast_convert_type(
      jnp.pad(stream, (0, pad)).reshape(-1, 4), jnp.uint32)
  words = jnp.pad(words, (0, 1))
  start = np.arange(n, dtype=np.int64) * bits
  lo = words[start // 32] >> (start % 32).astype(np.uint32)
  spill = (start % 32) + bits > 32
  hi = jnp.where(spill, words[start // 32 + 1] << (
      (32 - start % 32) % 32).astype(np.uint32), 0)
  mask = np.uint32((1 << bits) - 1) if bits < 32 else np.uint32(0xFFFFFFFF)
  return ((lo | hi) & mask).astype(dtype)


def pack(msg: PyTree) -> list:
  """The bytes of a message: per sent `Wire` with a static count, its
  values when they are already dense (fp32 at 32 bits, 8-bit codes in
  uint8), else a uint8 stream (`pack_bits` of its values at its bits,
  padded to a whole byte). A `Wire` with a dynamic count is packed at its full size (an upper
  bound: how many of its values travel is known only at run time).

  The total size of the streams is Σ ceil(count x bits / 8) over the
  message's Wires: `message_bits(msg) / 8` up to one byte per Wire.
  """
  out = []
  for w in jax.tree.leaves(msg, is_leaf=lambda x: isinstance(x, Wire)):
    if isinstance(w, Wire) and w.sent:
      if w.values.dtype.itemsize * 8 == w.bits:  # dense already: as is
        out.append(w.values)  # (a bitcast to bytes would cost XLA work)
      else:
        out.append(pack_bits(w.values, w.bits))
  return out


def packed_bytes(msg: PyTree) -> int:
  """Σ ceil(count x bits / 8) over the sent Wires of `msg` (static counts;
  a dynamic count counts all of its values): the bytes of `pack(msg)`."""
  total = 0
  for w in jax.tree.leaves(msg, is_leaf=lambda x: isinstance(x, Wire)):
    if isinstance(w, Wire) and w.sent:
      total += -(-math.prod(np.shape(w.values)) * w.bits // 8)
  return total


__all__ = ['Codec', 'Quantized', 'Sparse', 'Wire', 'chain_codecs',
           'dequantize_leaf', 'from_wire', 'identity_codec', 'index_bits',
           'message_bits', 'pack', 'pack_bits', 'packed_bytes', 'quantize_codec',
           'unpack_bits', 'unsent', 'quantize_leaf', 'to_wire',
           'topk_codec', 'topk_count', 'zero_codes']
