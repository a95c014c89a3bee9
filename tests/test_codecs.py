"""Codecs compose: decode returns what encode received, in either order,
and bits are the exact size of the final message."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_eff.core import codecs as C


def _tree():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {'a': jax.random.normal(k1, (10, 20)),
          'b': jax.random.normal(k2, (7,)),
          'frozen': jnp.zeros((5,))}


MASK = {'a': True, 'b': True, 'frozen': False}
TOPK = C.topk_codec(fraction=0.1)
Q8 = C.quantize_codec(8)
ORDERS = {'topk': [TOPK], 'quantize': [Q8], 'topk,quantize': [TOPK, Q8],
          'quantize,topk': [Q8, TOPK]}


def _hand_bits(order, sizes=(200, 7)):
  """Bits from the formulas: k values at their width, ceil(log2 n)-bit
  indices, k-bit codes plus 64 bits of lo/hi per quantized tensor."""
  total = 0
  for n in sizes:
    k = math.ceil(0.1 * n) if 'topk' in order else n
    value_bits = 8 if 'quantize' in order else 32
    total += k * value_bits
    if 'topk' in order:
      total += k * math.ceil(math.log2(n))
    if 'quantize' in order:
      total += 64
  return total


@pytest.mark.parametrize('order', list(ORDERS))
def test_chain_is_closed_and_bits_are_exact(order):
  codec = C.chain_codecs(*ORDERS[order])
  wire = C.to_wire(_tree(), MASK)
  msg = codec.encode(wire, jax.random.key(1))
  back = codec.decode(msg)
  assert jax.tree.structure(back) == jax.tree.structure(wire)
  assert C.message_bits(msg) == _hand_bits(order)
  # Frozen leaves travel not at all and come back as they were.
  np.testing.assert_array_equal(C.from_wire(back)['frozen'], np.zeros(5))


def test_topk_keeps_the_largest_entries_in_either_order():
  x = _tree()
  for order in ('topk', 'topk,quantize', 'quantize,topk'):
    got = C.from_wire(C.chain_codecs(*ORDERS[order]).decode(
        C.chain_codecs(*ORDERS[order]).encode(C.to_wire(x, MASK),
                                              jax.random.key(2))))
    a, ga = np.asarray(x['a']).reshape(-1), np.asarray(got['a']).reshape(-1)
    top = np.argsort(-np.abs(a))[:20]
    rest = np.setdiff1d(np.arange(200), top)
    step = (a.max() - a.min()) / 255
    # The kept entries are the 20 largest (to one quantization step) ...
    np.testing.assert_allclose(ga[top], a[top], atol=step * 1.001)
    # ... and the dropped ones decode to 0 (quantized: within half a step).
    assert np.max(np.abs(ga[rest])) <= (0 if order == 'topk' else
                                         step / 2 + 1e-6)


def test_quantize_is_unbiased_and_counts_dynamic_masks():
  x = {'a': jnp.linspace(-1, 1, 64)}
  mask = {'a': (jnp.arange(64) % 2).astype(jnp.float32)}
  wire = C.to_wire(jax.tree.map(lambda v, m: v * m, x, mask), mask)
  msgs = jax.vmap(lambda k: Q8.encode(wire, k))(
      jax.random.split(jax.random.key(3), 2000))
  mean = jax.vmap(lambda m: C.from_wire(Q8.decode(m))['a'])(msgs).mean(0)
  np.testing.assert_allclose(mean, x['a'] * mask['a'], atol=2e-3)
  one = Q8.encode(wire, jax.random.key(4))
  assert float(C.message_bits(one)) == 32 * 8 + 64  # 32 trained entries


def test_topk_counts_at_most_the_trained_entries():
  mask = {'a': (jnp.arange(10) < 3).astype(jnp.float32)}
  wire = C.to_wire({'a': jnp.arange(10.0) * mask['a']}, mask)
  msg = C.topk_codec(k=5).encode(wire, jax.random.key(0))
  # Only 3 entries trained: 3 values and 3 indices of 4 bits travel.
  assert float(C.message_bits(msg)) == 3 * 32 + 3 * 4


def test_bad_codec_knobs_are_one_line_errors():
  with pytest.raises(ValueError, match='exactly one'):
    C.topk_codec()
  with pytest.raises(ValueError, match='fraction'):
    C.topk_codec(fraction=1.5)
  with pytest.raises(ValueError, match='bits'):
    C.quantize_codec(0)
