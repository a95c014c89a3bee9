"""Layers that stay fast inside `lax.scan` on XLA:CPU.

XLA:CPU computes convolution weight-gradients inside `scan`/`while` loops
very slowly (measured, see DESIGN.md). `Im2ColConv` expresses a convolution
as shifted slices concatenated along channels followed by one matmul, whose
gradients are slices, pads and matmuls: fast on every backend. Its kernel has
`nn.Conv`'s shape `(kh, kw, in, out)` and the same result, so checkpoints are
interchangeable and `use_im2col=False` switches back to `nn.Conv`.

`max_pool_2x2` pools by reshape-and-max: its gradient is a cheap elementwise
select, where `nn.max_pool`'s is a select-and-scatter that cost the EMNIST
CNN ~17% of its training step on XLA:CPU (measured inside `lax.scan`).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Im2ColConv(nn.Module):
  """2-D convolution (NHWC), stride 1, 'VALID' or 'SAME' padding."""
  features: int
  kernel_size: Sequence[int] = (3, 3)
  padding: str = 'VALID'
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    cin = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init,
                        (kh, kw, cin, self.features))
    if self.padding == 'SAME':
      ph, pw = kh - 1, kw - 1
      x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2),
                      (pw // 2, pw - pw // 2), (0, 0)))
    elif self.padding != 'VALID':
      raise ValueError(f"padding must be 'VALID' or 'SAME', got "
                       f'{self.padding!r}.')
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    patches = jnp.concatenate(
        [x[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)],
        axis=-1)
    y = patches @ kernel.reshape(kh * kw * cin, self.features)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,))
    return y


def max_pool_2x2(x):
  """2x2 max pooling, stride 2, 'VALID' (an odd last row/column is dropped),
  equal in value to `nn.max_pool(x, (2, 2), strides=(2, 2))`."""
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2, :]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class WidthLayerNorm(nn.Module):
  """LayerNorm of a width narrowed by federated dropout, `x.shape[-1]` of
  `full` channels, with the statistics the full-width LayerNorm computes
  when the dropped channels are zero: `mean = sum(x) / full`,
  `var = sum(x^2) / full - mean^2`. Parameters `scale` and `bias` as
  `nn.LayerNorm`'s, narrowed. So a sub-model whose residual (or conv)
  width is narrowed computes exactly the full model with the dropped
  channels' weights zeroed: a dropped channel enters as 0, and its zeroed
  scale and bias keep it 0 on the way out.
  """
  full: int
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (d,))
    bias = self.param('bias', nn.initializers.zeros, (d,))
    y = jnp.asarray(x, jnp.float32)
    mean = y.sum(-1, keepdims=True) / self.full
    var = jnp.maximum((y * y).sum(-1, keepdims=True) / self.full
                      - mean * mean, 0.0)
    y = (y - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale + bias).astype(x.dtype)


def layer_norm(x, name: str, full: int = 0, epsilon: float = 1e-6):
  """`nn.LayerNorm(epsilon, name=name)(x)`, or, when `x` is narrower than
  `full` channels (federated dropout), `WidthLayerNorm` with the same
  parameter names. Call inside a compact method: the norm is a child of
  the caller."""
  if not full or x.shape[-1] == full:
    return nn.LayerNorm(epsilon=epsilon, name=name)(x)
  return WidthLayerNorm(full, epsilon, name=name)(x)
