"""Quantized updates: unbiased, bounded error, exact bits, trains like fp32.

The quantizer is a technique value (`techniques.quantize`): encode on the
client and decode on the server run inside the vectorised round, which must
still equal the reference loop; what travels is counted exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_eff import core
from fedjax_eff.techniques import quantization as q
from fedjax_eff.techniques.partial import partial_training
from tests import helpers


def test_stochastic_rounding_is_unbiased():
  x = jax.random.normal(jax.random.key(0), (64,))
  keys = jax.random.split(jax.random.key(1), 4000)
  deq = jax.vmap(lambda k: q.dequantize_leaf(*q.quantize_leaf(x, k, 2), 2))(
      keys)
  step = (x.max() - x.min()) / 3
  # Each value's rounding error has std <= step / 2: the mean of 4000 is
  # within 5 sigma of x, while a biased (nearest) rounding is not.
  err = np.abs(np.asarray(deq.mean(0) - x))
  assert err.max() < 5 * float(step) / 2 / np.sqrt(4000)
  nearest = np.abs(np.asarray(
      x.min() + jnp.round((x - x.min()) / step) * step - x))
  assert nearest.mean() > 10 * err.mean()


@pytest.mark.parametrize('bits', [1, 2, 4, 8, 16])
@pytest.mark.parametrize('block', [0, 16])
def test_error_is_bounded_by_one_step_per_block(bits, block):
  x = jax.random.normal(jax.random.key(bits), (10, 7)) * 3.0
  qq, lo, hi = q.quantize_leaf(x, jax.random.key(2), bits, block)
  deq = q.dequantize_leaf(qq, lo, hi, bits, block)
  assert qq.dtype == (jnp.uint8 if bits <= 8 else jnp.uint16)
  assert int(qq.max()) <= 2 ** bits - 1
  step = np.asarray((hi - lo) / (2 ** bits - 1))
  flat = np.pad(np.abs(np.asarray(deq - x)).reshape(-1),
                (0, (-70) % (block or 70))).reshape(len(step), -1)
  assert np.all(flat <= step[:, None] * (1 + 1e-5) + 1e-6)
  assert len(step) == (1 if block == 0 else -(-70 // block))


def test_bit_count_formula_and_round_upload_are_exact():
  assert q.leaf_message_bits(70, 4) == 70 * 4 + 64
  assert q.leaf_message_bits(70, 4, 16) == 70 * 4 + 5 * 64
  kw, params = helpers.tiny_setup(model='mlp', model_kwargs={'hidden': (8,)})
  kw['technique'] = core.chain(
      partial_training(kw['model'], layers=(), train_head=True),
      q.quantize(bits=4, block_size=16))
  fns = core.build_round(**kw, chunk_size=2, donate=False)
  _, m = fns.round_step(fns.init(params), helpers.tiny_cohort(),
                        jax.random.key(0))
  expected = sum(q.leaf_message_bits(x.size, 4, 16)
                 for x in jax.tree.leaves(params['head']))
  np.testing.assert_array_equal(np.asarray(m.client_upload_bits), expected)
  full = sum(32 * x.size for x in jax.tree.leaves(params))
  assert float(m.download_bits) == full


def test_quantized_round_equals_reference_with_quantized_download():
  kw, params = helpers.tiny_setup(model='mlp', model_kwargs={'hidden': (8,)})
  kw['technique'] = q.quantize(bits=8, block_size=32, download_bits=8)
  cohort = helpers.tiny_cohort()
  fns = core.build_round(**kw, chunk_size=3, donate=False)
  s1, m1 = fns.round_step(fns.init(params), cohort, jax.random.key(3))
  s2, m2 = core.build_reference_round(**kw)(fns.init(params), cohort,
                                            jax.random.key(3))
  assert helpers.max_abs_diff(s1.params, s2.params) < 1e-5
  down = sum(q.leaf_message_bits(x.size, 8, 32)
             for x in jax.tree.leaves(params))
  np.testing.assert_array_equal(np.asarray(m1.client_download_bits), down)
  np.testing.assert_allclose(np.asarray(m1.client_upload_bits),
                             m2['client_upload_bits'])


def test_8_bit_training_follows_full_precision():
  kw, params = helpers.tiny_setup(model='mlp', model_kwargs={'hidden': (16,)})
  runs = {}
  for name, tech in (('fp32', core.identity()),
                     ('q8', q.quantize(bits=8)), ('q1', q.quantize(bits=1))):
    fns = core.build_round(**dict(kw, technique=tech), chunk_size=7,
                           donate=False)
    state = fns.init(params)
    losses = []
    for r in range(8):
      state, m = fns.round_step(state, helpers.tiny_cohort(round_num=r),
                                jax.random.key(r))
      losses.append(float(m.train_loss))
    runs[name] = (state.params, losses)
  moved = helpers.max_abs_diff(runs['fp32'][0], params)
  gap8 = helpers.max_abs_diff(runs['q8'][0], runs['fp32'][0])
  gap1 = helpers.max_abs_diff(runs['q1'][0], runs['fp32'][0])
  assert gap8 < 0.05 * moved, (gap8, moved)
  assert gap1 > 5 * gap8  # fewer bits, further from fp32
  np.testing.assert_allclose(runs['q8'][1], runs['fp32'][1], rtol=0.02)
