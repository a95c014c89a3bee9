"""The Stack Overflow next-token LSTM, with an explicit layer stack.

`LSTMLM` is TFF's `create_recurrent_model` for Stack Overflow (Reddi et al.
2020, "Adaptive Federated Optimization"): Embedding(vocab, 96) ->
LSTM(670) -> Dense(96) -> Dense(vocab), vocab = 10k words + 4 special
tokens (pad 0, OOV, BOS, EOS). With the defaults it has exactly 4,050,748
parameters, as TFF's Keras model:

  embed 10004 * 96                   =   960,384
  lstm_0 4 * 670 * (96 + 670 + 1)    = 2,055,560  (one bias per gate)
  proj 670 * 96 + 96                 =    64,416
  head 96 * 10004 + 10004            =   970,388

Flax's LSTM cells put the gate biases on the recurrent kernels only
(`hi/hf/hg/ho` with bias, `ii/if/ig/io` without), which is Keras's count.

The top-level parameter groups are `embed`, `lstm_0..lstm_{L-1}`, `proj`
and `head`, exposed as `layer_names` and `groups` like the Transformer's
(`transformer._LayerStack`), so the layer-structured techniques (partial
training, ...) address "layer i" the same way. `stop_below` freezes the
layers below a given one without a backward pass through them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_eff.models.structure import WidthGroup

# Size presets. Parameter counts (vocab 10004): tiny 336,932;
# stackoverflow 4,050,748; large 20,051,732.
_SIZES = {
    'tiny': dict(vocab_size=10004, embed_dim=16, lstm_dim=32,
                 num_lstm_layers=1, proj_dim=16),
    'stackoverflow': dict(vocab_size=10004, embed_dim=96, lstm_dim=670,
                          num_lstm_layers=1, proj_dim=96),
    'large': dict(vocab_size=10004, embed_dim=256, lstm_dim=832,
                  num_lstm_layers=3, proj_dim=256),
}

# Flax LSTM cell parameter names: input kernels, recurrent kernels + bias.
_INPUT_GATES = ('ii', 'if', 'ig', 'io')
_HIDDEN_GATES = ('hi', 'hf', 'hg', 'ho')


def lstm_lm_preset(name: str) -> dict[str, Any]:
  """Size kwargs of `LSTMLM`: 'tiny' (tests), 'stackoverflow' or 'large'.

  'stackoverflow' is TFF's model (4,050,748 parameters). 'large' (embed
  256, three LSTM layers of 832, proj 256) has 20,051,732: embed 2,561,024,
  LSTMs 3,624,192 + 5,541,120 + 5,541,120, proj 213,248, head 2,571,028.
  'tiny' (embed 16, LSTM 32, proj 16) has 336,932, nearly all of it the
  10004-token embedding and head; tests pass a smaller `vocab_size`.
  """
  if name not in _SIZES:
    raise ValueError(f'preset={name!r} is not one of {sorted(_SIZES)}.')
  return dict(_SIZES[name])


def _embed_init(key, shape, dtype=jnp.float32):
  """Keras's Embedding default, uniform in [-0.05, 0.05]: flax's default
  (unit variance) feeds the LSTM gates inputs ~10x too large."""
  return jax.random.uniform(key, shape, dtype, -0.05, 0.05)


class LSTMLM(nn.Module):
  """Next-token LSTM: tokens `[B, T]` -> logits `[B, T, vocab_size]`.

  Embedding -> `num_lstm_layers` stacked LSTMs (`nn.RNN`, a `lax.scan` over
  time) -> Dense(`proj_dim`) (none if 0) -> Dense(`vocab_size`) with bias
  (untied). Pad tokens (id 0) are not masked: the model is causal and the
  data pads at the end, so padding only reaches padded positions, which
  the loss ignores. `dropout` (the 'dropout' rng, only when `train`) acts
  on the embedding and each LSTM's output. `num_classes` is ignored (it is
  `get_model`'s signature).

  `__call__(tokens, train=False, *, stop_below=None, features=False)`:

  * `stop_below` (static int): stop gradients at the activations entering
    layer `stop_below` of `layer_names` (or the head, if that is >= the
    number of layers), so the embedding and the layers below get zero
    gradient and no backward pass runs through them.
  * `features`: return the head's input `[B, T, proj_dim or lstm_dim]`.
  * `widths` (federated dropout): `((layer name, kept units), ...)` runs
    narrower LSTMs / projection (`width_groups`).
  """
  vocab_size: int = 10004
  embed_dim: int = 96
  lstm_dim: int = 670
  num_lstm_layers: int = 1
  proj_dim: int = 96
  dropout: float = 0.0
  num_classes: int = 0
  # `structure.forward_keys`: the kwargs of `__call__` a technique may set.
  FORWARD_KEYS = ('stop_below', 'features', 'widths')

  def __post_init__(self):
    if self.num_lstm_layers < 1:
      raise ValueError(f'num_lstm_layers={self.num_lstm_layers} must be '
                       '>= 1.')
    super().__post_init__()

  @property
  def layer_names(self) -> tuple[str, ...]:
    names = tuple(f'lstm_{i}' for i in range(self.num_lstm_layers))
    return names + (('proj',) if self.proj_dim else ())

  @property
  def head_names(self) -> tuple[str, ...]:
    return ('head',)

  @property
  def groups(self) -> dict[str, tuple[str, ...]]:
    return {'embed': ('embed',), 'layers': self.layer_names,
            'head': self.head_names}

  @property
  def width_groups(self):
    """Federated dropout's units: each LSTM's cells (its gates' input and
    recurrent kernels on the cell axis, the recurrent kernels' input axis
    too, and the next layer's input) and the projection's units. A dropped
    cell with all its weights zeroed stays at 0, so a narrower LSTM is the
    masked full one. Scope 'all' adds the embedding width (the embedding
    table's columns and the first LSTM's input); the vocabulary stays."""
    names = self.layer_names + ('head',)
    groups = [WidthGroup('embed', self.embed_dim, (('embed/embedding', 1),) +
                         tuple(('lstm_0/' + g + '/kernel', 0)
                               for g in _INPUT_GATES), -1, 'all')]
    for i, name in enumerate(names[:-1]):
      nxt = names[i + 1]
      reads = (tuple((f'{nxt}/{g}/kernel', 0) for g in _INPUT_GATES)
               if nxt.startswith('lstm_') else ((f'{nxt}/kernel', 0),))
      if name == 'proj':
        own = (('proj/kernel', 1), ('proj/bias', 0))
        width = self.proj_dim
      else:
        own = tuple((f'{name}/{g}/kernel', 1) for g in _INPUT_GATES) + tuple(
            m for g in _HIDDEN_GATES for m in (
                (f'{name}/{g}/kernel', 1), (f'{name}/{g}/kernel', 0),
                (f'{name}/{g}/bias', 0)))
        width = self.lstm_dim
      groups.append(WidthGroup(name, width, own + reads, i))
    return tuple(groups)

  @nn.compact
  def __call__(self, tokens, train: bool = False, *,
               stop_below: int | None = None, features: bool = False,
               widths=None):
    drop = lambda y: (nn.Dropout(self.dropout, deterministic=not train)(y)
                      if self.dropout else y)
    widths = dict(widths or ())
    if self.is_initializing():
      stop_below, widths = None, {}
    h = nn.Embed(self.vocab_size, widths.get('embed', self.embed_dim),
                 embedding_init=_embed_init, name='embed')(tokens)
    h = drop(h)
    for i, name in enumerate(self.layer_names):
      if i == stop_below:
        h = jax.lax.stop_gradient(h)
      if name == 'proj':
        h = nn.Dense(widths.get('proj', self.proj_dim), name='proj')(h)
      else:
        # The cell holds the parameters, so it carries the layer's name.
        h = nn.RNN(nn.OptimizedLSTMCell(widths.get(name, self.lstm_dim),
                                        name=name))(h)
        h = drop(h)
    if stop_below is not None and stop_below >= len(self.layer_names):
      h = jax.lax.stop_gradient(h)
    if features:
      return h
    return nn.Dense(self.vocab_size, name='head')(h)
