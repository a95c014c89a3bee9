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

from fedjax_eff.core import codecs
from fedjax_eff.core.codecs import dequantize_leaf, quantize_leaf
from fedjax_eff.core.technique import Technique, hparam


# The upload's bits as a replica value (`core.technique.hparam`): replicas
# of one program whose bits share a code dtype (1-8: uint8, 9-16: uint16).
BITS_HPARAM = 'quantize.bits'


def leaf_message_bits(size: int, bits: int, block_size: int = 0) -> int:
  """Exact bits of one leaf's message: k per value, 64 per block."""
  b = block_size or max(size, 1)
  return size * bits + (-(-size // b)) * 64


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

  codec = codecs.quantize_codec(bits, block_size)
  # plan: (the download's rounding key, a replica's own upload bits)
  encode = lambda msg, plan, rng: codec.encode(msg, rng, plan[1])
  decode = lambda msg, plan: codec.decode(msg)

  def plan(rng, round_num, ctx):
    del round_num
    return rng if download_bits else None, hparam(ctx, BITS_HPARAM, None)

  if not download_bits:
    return Technique(name=f'quantize{bits}', plan=plan, encode=encode,
                     decode=decode)

  def view(params, plan):
    rng = plan[0]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(rng, max(len(leaves), 1))
    return treedef.unflatten([
        dequantize_leaf(*quantize_leaf(x, k, download_bits, block_size),
                        download_bits, block_size, x.dtype)
        for x, k in zip(leaves, keys)])

  def merge(server_params, delta, mask, plan):
    # The client started from the quantized view; report its move from the
    # server's model so the server lands on the client's model.
    start = view(server_params, plan)
    delta = jax.tree.map(lambda d, s, v, m: d + (s - v) * jnp.asarray(
        m, d.dtype), delta, server_params, start, mask)
    cov = jax.tree.map(lambda d, m: jnp.broadcast_to(
        jnp.asarray(m, d.dtype), d.shape), delta, mask)
    return delta, cov

  def download(params, plan):
    return float(sum(leaf_message_bits(x.size, download_bits, block_size)
                     for x in jax.tree.leaves(params)))

  return Technique(name=f'quantize{bits}_down{download_bits}', plan=plan,
                   view=view, encode=encode, decode=decode, merge=merge,
                   download=download)


__all__ = ['quantize', 'quantize_leaf', 'dequantize_leaf',
           'leaf_message_bits']
