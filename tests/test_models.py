"""Model layers against their Flax references."""

import numpy as np


def test_models_layers_match_flax_reference():
  import flax.linen as nn
  import jax
  from fedjax_eff.models import Im2ColConv
  from fedjax_eff.models.layers import max_pool_2x2
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, 3))
  for padding in ('VALID', 'SAME'):
    conv = Im2ColConv(5, (3, 3), padding=padding)
    p = conv.init(jax.random.key(1), x)
    ref = nn.Conv(5, (3, 3), padding=padding).apply(p, x)
    np.testing.assert_allclose(conv.apply(p, x), ref, atol=1e-5)
  np.testing.assert_array_equal(max_pool_2x2(x),
                                nn.max_pool(x, (2, 2), strides=(2, 2)))
