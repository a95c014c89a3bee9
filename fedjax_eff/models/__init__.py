"""Flax models that expose their layer structure; no federation here."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from fedjax_eff.models.classifiers import CNN, MLP, LogisticRegression
from fedjax_eff.models.layers import Im2ColConv

MODELS = {'logreg': LogisticRegression, 'mlp': MLP, 'cnn': CNN}


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds a model by name, e.g. `get_model('cnn', 62)`."""
  if name not in MODELS:
    raise ValueError(f'model.name={name!r} is not one of {sorted(MODELS)}.')
  return MODELS[name](num_classes=num_classes, **kwargs)


__all__ = ['CNN', 'MLP', 'LogisticRegression', 'Im2ColConv', 'get_model',
           'MODELS']
