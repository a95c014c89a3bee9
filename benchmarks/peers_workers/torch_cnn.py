"""The PyTorch models of the pfl and Flower workers.

`simple_cnn` (the cifar10 workload) is pfl-research's CNN; `mlp_2nn` (the
femnist workload) is McMahan et al.'s 2NN, flatten, dense(200), ReLU,
dense(200), ReLU, dense(num_classes); `model_for(workload)` picks one.

pfl-research's `simple_cnn`:

Layer for layer `benchmarks/model/pytorch/cnn.py:simple_cnn` of
apple/pfl-research (that file ships with pfl-research's benchmarks, not with
the `pfl` package): NHWC -> NCHW transpose, conv3x3(32), ReLU, conv3x3(64),
ReLU, maxpool 2x2, dropout .25, flatten, dense(128), ReLU, dropout .5,
dense(num_classes); Glorot-uniform weights; mean cross-entropy loss and a
`metrics` method, the interface `pfl.model.pytorch.PyTorchModel` expects.
"""

from __future__ import annotations

import types

import torch
from torch import nn
import torch.nn.functional as F


class Transpose2D(nn.Module):
  """NHWC (TensorFlow layout, as the data is stored) -> NCHW."""

  def forward(self, x):
    return x.permute((0, 3, 1, 2))


# pylint: disable=redefined-builtin,expression-not-assigned
def _loss(self, inputs, targets, eval=False):
  self.eval() if eval else self.train()
  return F.cross_entropy(self(inputs), targets.long(), reduction='mean')


@torch.no_grad()
def _metrics(self, inputs, targets, eval=True):
  from pfl.metrics import Weighted  # pylint: disable=import-outside-toplevel
  self.eval() if eval else self.train()
  logits = self(inputs)
  n = len(inputs)
  return {
      'loss': Weighted(F.cross_entropy(logits, targets.long(),
                                       reduction='sum').item(), n),
      'accuracy': Weighted((logits.argmax(-1) == targets.long()).float()
                           .sum().item(), n),
  }
# pylint: enable=redefined-builtin,expression-not-assigned


def simple_cnn(input_shape=(32, 32, 3), num_outputs: int = 10) -> nn.Module:
  in_channels = input_shape[-1]
  pooled = (input_shape[0] - 4) // 2
  model = nn.Sequential(
      Transpose2D(),
      nn.Conv2d(in_channels, 32, kernel_size=(3, 3)),
      nn.ReLU(),
      nn.Conv2d(32, 64, kernel_size=(3, 3)),
      nn.ReLU(),
      nn.MaxPool2d((2, 2)),
      nn.Dropout(0.25),
      nn.Flatten(),
      nn.Linear(pooled * pooled * 64, 128),
      nn.ReLU(),
      nn.Dropout(0.5),
      nn.Linear(128, num_outputs),
  )
  for m in model.modules():
    if isinstance(m, (nn.Conv2d, nn.Linear)):
      nn.init.xavier_uniform_(m.weight)
  model.loss = types.MethodType(_loss, model)
  model.metrics = types.MethodType(_metrics, model)
  return model


def mlp_2nn(input_shape=(28, 28, 1), num_outputs: int = 62,
            hidden=(200, 200)) -> nn.Module:
  """McMahan et al.'s 2NN (784-200-200-62 on FEMNIST); Glorot-uniform
  weights as `simple_cnn`, the same `loss` / `metrics` interface."""
  width = 1
  for d in input_shape:
    width *= d
  layers = [nn.Flatten()]
  for h in hidden:
    layers += [nn.Linear(width, h), nn.ReLU()]
    width = h
  layers.append(nn.Linear(width, num_outputs))
  model = nn.Sequential(*layers)
  for m in model.modules():
    if isinstance(m, nn.Linear):
      nn.init.xavier_uniform_(m.weight)
  model.loss = types.MethodType(_loss, model)
  model.metrics = types.MethodType(_metrics, model)
  return model


def model_for(workload: str = 'cifar10') -> nn.Module:
  """The workload's model (`common.WORKLOADS[workload]['model']`)."""
  import common  # pylint: disable=import-outside-toplevel
  w = common.WORKLOADS[workload]
  if w['model'] == 'cnn':
    return simple_cnn(w['image_shape'], w['num_classes'])
  return mlp_2nn(w['image_shape'], w['num_classes'], w['mlp_hidden'])


_CACHE: dict = {}


def cached_model(workload: str = 'cifar10') -> nn.Module:
  """One module per process (e.g. per Ray actor), reused by the ephemeral
  Flower clients it hosts; they overwrite its weights before training."""
  if workload not in _CACHE:
    _CACHE[workload] = model_for(workload)
  return _CACHE[workload]


def cached_simple_cnn(input_shape=(32, 32, 3), num_outputs: int = 10
                      ) -> nn.Module:
  """One module per process (e.g. per Ray actor), reused by the ephemeral
  Flower clients it hosts; they overwrite its weights before training."""
  key = ('cnn', tuple(input_shape), num_outputs)
  if key not in _CACHE:
    _CACHE[key] = simple_cnn(input_shape, num_outputs)
  return _CACHE[key]


def num_params(model: nn.Module) -> int:
  return int(sum(p.numel() for p in model.parameters()))


def params_finite(model: nn.Module) -> bool:
  return all(bool(torch.isfinite(p).all()) for p in model.parameters())
