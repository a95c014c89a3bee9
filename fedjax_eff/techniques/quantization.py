"""Uniform k-bit quantization of client updates with stochastic rounding
(Ro et al. 2022, arXiv 2204.09715; Suresh et al. 2017, arXiv 1611.00429).

Each leaf of the client's delta is cut into blocks of `block_size` values
(0: one block per tensor). A block with range [lo, hi] is sent as k-bit
integers on the grid lo + q (hi - lo) / (2^k - 1), each value rounded up or
down at random with the probability that makes the expectation exact:

  q = floor(t + u),  t = (x - lo) / (hi - lo) * (2^k - 1),  u ~ U[0, 1)

so E[dequantize(q)] = x (unbiased) and |error| <= (hi - lo) / (2^k - 1).

Wire format per trained leaf: the integers (k bits each) and, per block, lo
and hi in fp32 (64 bits). `encode` produces exactly that message (q, lo,
hi) on the client, inside the vmapped round; `decode` dequantizes it on the
server side; the bit count covers the trained entries only (a statically
frozen leaf sends nothing) plus the metadata of every block holding them.

`download_bits` > 0 also quantizes what the server sends down (the view the
client trains from), with its own stochastic rounding; the client's update
is then reported relative to the server's model (merge), so the server's
average stays exact in expectation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_eff.core.technique import Technique, is_frozen, tree_bits


def _blocks(x, block_size):
  """Flattened `x` padded to whole blocks: `[num_blocks, block]`."""
  flat = x.reshape(-1)
  b = block_size or max(flat.size, 1)
  nb = -(-flat.size // b)
  return jnp.pad(flat, (0, nb * b - flat.size)).reshape(nb, b)


def quantize_leaf(x, rng, bits: int, block_size: int = 0):
  """(q, lo, hi): k-bit stochastic quantization of one array."""
  levels = 2 ** bits - 1
  blocks = _blocks(x.astype(jnp.float32), block_size)
  lo = jnp.min(blocks, axis=1)
  hi = jnp.max(blocks, axis=1)
  scale = jnp.where(hi > lo, (hi - lo) / levels, 1.0)
  t = (blocks - lo[:, None]) / scale[:, None]
  u = jax.random.uniform(rng, blocks.shape)
  q = jnp.clip(jnp.floor(t + u), 0, levels)
  q = q.reshape(-1)[:x.size].reshape(x.shape)
  dtype = jnp.uint8 if bits <= 8 else (jnp.uint16 if bits <= 16 else
                                       jnp.uint32)
  return q.astype(dtype), lo, hi


def dequantize_leaf(q, lo, hi, bits: int, block_size: int = 0,
                    dtype=jnp.float32):
  levels = 2 ** bits - 1
  blocks = _blocks(q.astype(jnp.float32), block_size if lo.size > 1 else 0)
  scale = jnp.where(hi > lo, (hi - lo) / levels, 0.0)
  x = lo[:, None] + blocks * scale[:, None]
  return x.reshape(-1)[:q.size].reshape(q.shape).astype(dtype)


def leaf_message_bits(size: int, bits: int, block_size: int = 0) -> int:
  """Exact bits of one leaf's message: k per value, 64 per block."""
  b = block_size or max(size, 1)
  return size * bits + (-(-size // b)) * 64


def _bits(tree, mask, bits, block_size):
  total = 0.0
  for x, m in zip(jax.tree.leaves(tree),
                  jax.tree.structure(tree).flatten_up_to(mask)):
    if is_frozen(m):
      continue
    if m is True or isinstance(m, (bool, np.bool_)):
      total = total + leaf_message_bits(x.size, bits, block_size)
    else:  # dynamic mask: the trained entries, and every block's metadata
      b = block_size or max(x.size, 1)
      n = jnp.sum(jnp.broadcast_to(jnp.asarray(m, jnp.float32), x.shape))
      total = total + n * bits + jnp.where(n > 0, (-(-x.size // b)) * 64, 0)
  return total


def quantize(bits: int = 8, block_size: int = 0,
             download_bits: int = 0) -> Technique:
  """k-bit unbiased quantization of the upload (and optionally download).

  Args:
    bits: k in 1..16 for the upload.
    block_size: values per scale block (0: one block per tensor).
    download_bits: 0 sends the model down in fp32; k in 1..16 quantizes it.
  """
  for name, k in (('bits', bits), ('download_bits', download_bits)):
    if not (name == 'download_bits' and k == 0) and not 1 <= k <= 16:
      raise ValueError(f'quantize {name}={k} must be in 1..16'
                       + (' (or 0: fp32)' if name == 'download_bits' else '')
                       + '.')
  if block_size < 0:
    raise ValueError(f'quantize block_size={block_size} must be >= 0.')

  def encode(delta, mask, plan, rng):
    leaves, treedef = jax.tree.flatten(delta)
    masks = treedef.flatten_up_to(mask)
    keys = jax.random.split(rng, max(len(leaves), 1))
    msg = []
    for x, m, k in zip(leaves, masks, keys):
      if is_frozen(m):  # nothing is sent: an empty (all-zero) message
        z = jnp.zeros((1,), jnp.float32)
        msg.append((jnp.zeros(x.shape, jnp.uint8), z, z))
      else:
        msg.append(quantize_leaf(x, k, bits, block_size))
    return treedef.unflatten(msg), _bits(delta, mask, bits, block_size)

  def decode(msg, plan):
    return jax.tree.map(
        lambda m: dequantize_leaf(*m, bits, block_size), msg,
        is_leaf=lambda m: isinstance(m, tuple) and len(m) == 3)

  if not download_bits:
    return Technique(name=f'quantize{bits}', encode=encode, decode=decode)

  def plan(rng, round_num, ctx):
    return rng  # the download's rounding noise

  def view(params, rng):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(rng, max(len(leaves), 1))
    return treedef.unflatten([
        dequantize_leaf(*quantize_leaf(x, k, download_bits, block_size),
                        download_bits, block_size, x.dtype)
        for x, k in zip(leaves, keys)])

  def merge(server_params, delta, mask, rng):
    # The client started from the quantized view; report its move from the
    # server's model so the server lands on the client's model.
    start = view(server_params, rng)
    delta = jax.tree.map(lambda d, s, v, m: d + (s - v) * jnp.asarray(
        m, d.dtype), delta, server_params, start, mask)
    cov = jax.tree.map(lambda d, m: jnp.broadcast_to(
        jnp.asarray(m, d.dtype), d.shape), delta, mask)
    return delta, cov

  def download(params, rng):
    return _bits(params, jax.tree.map(lambda _: True, params),
                 download_bits, block_size)

  return Technique(name=f'quantize{bits}_down{download_bits}', plan=plan,
                   view=view, encode=encode, decode=decode, merge=merge,
                   download=download)


__all__ = ['quantize', 'quantize_leaf', 'dequantize_leaf',
           'leaf_message_bits']
