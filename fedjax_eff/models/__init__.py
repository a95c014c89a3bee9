"""Flax models that expose their layer structure; no federation here.

`structure` holds what a model publishes to techniques: its
`LayerStructure`, its `WidthGroup`s, and the `ForwardPlan` keys its
`__call__` accepts (each model's `FORWARD_KEYS`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from fedjax_eff.models.classifiers import CNN, MLP, LogisticRegression
from fedjax_eff.models.layers import Im2ColConv
from fedjax_eff.models.lstm_lm import LSTMLM, lstm_lm_preset
from fedjax_eff.models.structure import (ForwardPlan, LayerStructure,
                                         WidthGroup, merge_forward,
                                         structure_of)
from fedjax_eff.models.speech import ConformerCTC, conformer_ctc_preset
from fedjax_eff.models.transformer import (ConformerLM, ViT, Transformer,
                                           transformer_preset, vit_preset)

MODELS = {'logreg': LogisticRegression, 'mlp': MLP, 'cnn': CNN,
          'transformer': Transformer, 'vit': ViT, 'lstm_lm': LSTMLM,
          'conformer_lm': ConformerLM, 'conformer_ctc': ConformerCTC}

# Models with size presets: `get_model(name, n, preset='small', ...)`.
PRESETS = {'transformer': transformer_preset, 'vit': vit_preset,
           'lstm_lm': lstm_lm_preset, 'conformer_ctc': conformer_ctc_preset}


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds a model by name, e.g. `get_model('cnn', 62)`.

  For 'transformer' and 'vit', `preset` ('tiny' by default, 'small',
  'base') fills the size kwargs; for 'lstm_lm' ('tiny' by default,
  'stackoverflow', 'large') likewise, and for 'conformer_ctc' ('tiny',
  'cpu', 'small', 'medium', '10m', '30m'). Explicit kwargs override it.
  """
  if name not in MODELS:
    raise ValueError(f'model.name={name!r} is not one of {sorted(MODELS)}.')
  if name in PRESETS:
    kwargs = {**PRESETS[name](kwargs.pop('preset', 'tiny')), **kwargs}
  # Config lists (ml_collections) become tuples: Flax fields must hash.
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in kwargs.items()}
  return MODELS[name](num_classes=num_classes, **kwargs)


__all__ = ['CNN', 'MLP', 'LogisticRegression', 'Im2ColConv', 'Transformer',
           'ViT', 'ConformerLM', 'ConformerCTC', 'LSTMLM', 'transformer_preset',
           'vit_preset', 'lstm_lm_preset', 'conformer_ctc_preset', 'get_model',
           'MODELS', 'PRESETS', 'ForwardPlan', 'LayerStructure', 'WidthGroup',
           'merge_forward', 'structure_of']
