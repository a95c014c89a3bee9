"""Small classifiers: logistic regression, MLP and the EMNIST CNN.

Each model names its layers explicitly (`layer_names`, input to output), so
techniques can address "the last n layers" or "layer 2" without inspecting
parameter paths. Models know nothing about federation.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from fedjax_eff.models.layers import Im2ColConv, max_pool_2x2


class LogisticRegression(nn.Module):
  num_classes: int
  layer_names = ('head',)

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
    return nn.Dense(self.num_classes, name='head')(x)


class MLP(nn.Module):
  num_classes: int
  hidden: Sequence[int] = (200, 200)
  dropout: float = 0.0

  @property
  def layer_names(self):
    return tuple(f'dense{i}' for i in range(len(self.hidden))) + ('head',)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
    for i, h in enumerate(self.hidden):
      x = nn.relu(nn.Dense(h, name=f'dense{i}')(x))
      if self.dropout:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name='head')(x)


class CNN(nn.Module):
  """The EMNIST CNN of FedJAX/TFF (McMahan et al. 2017; Reddi et al. 2020).

  conv3x3(32) -> relu -> conv3x3(64) -> relu -> maxpool 2x2 -> dropout 0.25
  -> dense(128) -> relu -> dropout 0.5 -> dense(num_classes).
  """
  num_classes: int
  features: Sequence[int] = (32, 64)
  hidden: int = 128
  dropout: bool = True
  use_im2col: bool = True
  layer_names = ('conv1', 'conv2', 'dense1', 'head')

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(jnp.float32)
    if x.ndim == 3:
      x = x[..., None]
    for name, f in zip(('conv1', 'conv2'), self.features):
      if self.use_im2col:
        x = Im2ColConv(f, (3, 3), name=name)(x)
      else:
        x = nn.Conv(f, (3, 3), padding='VALID', name=name)(x)
      x = nn.relu(x)
    x = max_pool_2x2(x)
    if self.dropout:
      x = nn.Dropout(0.25, deterministic=not train)(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden, name='dense1')(x))
    if self.dropout:
      x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name='head')(x)
