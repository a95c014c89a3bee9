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
from fedjax_eff.models.structure import WidthGroup


class LogisticRegression(nn.Module):
  num_classes: int
  layer_names = ('head',)
  FORWARD_KEYS = ()  # `structure.forward_keys`: no forward kwargs

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
    return nn.Dense(self.num_classes, name='head')(x)


def _dense_group(name: str, width: int, following: str, depth: int):
  """The hidden units of dense/conv layer `name` (output axis last) and
  the input axis of the layer that reads them."""
  return WidthGroup(name, width, ((f'{name}/kernel', -1), (f'{name}/bias', 0),
                                  (f'{following}/kernel', -2)), depth)


class MLP(nn.Module):
  """Dense layers with ReLU. `widths` (federated dropout) narrows hidden
  layers by name: `widths=(('dense0', 50),)`."""
  num_classes: int
  hidden: Sequence[int] = (200, 200)
  dropout: float = 0.0
  FORWARD_KEYS = ('widths',)

  @property
  def layer_names(self):
    return tuple(f'dense{i}' for i in range(len(self.hidden))) + ('head',)

  @property
  def width_groups(self):
    names = self.layer_names
    return tuple(_dense_group(names[i], h, names[i + 1], i)
                 for i, h in enumerate(self.hidden))

  @nn.compact
  def __call__(self, x, train: bool = False, widths=None):
    x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
    widths = dict(widths or ())
    for i, h in enumerate(self.hidden):
      x = nn.relu(nn.Dense(widths.get(f'dense{i}', h), name=f'dense{i}')(x))
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
  FORWARD_KEYS = ('widths',)

  @property
  def width_groups(self):
    """Conv channels and dense units. conv2's channels reach dense1
    through the flattened `[H, W, C]` map: channel-minor blocks."""
    names = self.layer_names
    return tuple(_dense_group(names[i], w, names[i + 1], i) for i, w in
                 enumerate(tuple(self.features) + (self.hidden,)))

  @nn.compact
  def __call__(self, x, train: bool = False, widths=None):
    x = x.astype(jnp.float32)
    if x.ndim == 3:
      x = x[..., None]
    widths = dict(widths or ())
    features = [widths.get(n, f) for n, f in zip(('conv1', 'conv2'),
                                                 self.features)]
    hidden = widths.get('dense1', self.hidden)
    for name, f in zip(('conv1', 'conv2'), features):
      if self.use_im2col:
        x = Im2ColConv(f, (3, 3), name=name)(x)
      else:
        x = nn.Conv(f, (3, 3), padding='VALID', name=name)(x)
      x = nn.relu(x)
    x = max_pool_2x2(x)
    if self.dropout:
      x = nn.Dropout(0.25, deterministic=not train)(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(hidden, name='dense1')(x))
    if self.dropout:
      x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name='head')(x)
