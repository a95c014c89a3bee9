"""Conformer speech encoder with a CTC head (Gulati et al. 2020).

Log-mel frames `[B, T, n_mels]` -> convolutional subsampling (time and
frequency by `subsample`) -> conformer blocks -> LayerNorm + Dense per
frame -> CTC logits `[B, T', num_classes]`, plus `logit_paddings` `[B, T']`
(1.0 = padded frame) for `optax.ctc_loss`.

`ConformerCTC` is a `_LayerStack` like `Transformer` and `ViT`, so its tree
is `{'embed', 'block_0'..'block_{L-1}', 'head'}` and every layer-structured
technique (`depth`, `stop_below`, `layer_gates`, `layer_drop_rate`,
per-layer heads, LoRA/adapters/prompts) works on it unchanged. The front
end (subsampling convs, projection, optional learned positions) is the one
'embed' group.

Padding never reaches a real frame: padded input frames are zeroed, the
'VALID' subsampling convs of a real output frame read only real input
frames (that is what the length formula `subsampled_length` says), the
attention masks padded keys and the conformer's depthwise conv sees zeros
at padded frames (`ConvModule`). Batches of different padded lengths give
the same logits at real frames.

Positions are rotary by default (Su et al. 2021: relative, parameter-free,
no maximum length; `transformer.apply_rotary`); 'learned' adds absolute
positions over `max_len` subsampled frames, 'none' relies on the
depthwise convs alone.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fedjax_eff.models.structure import WidthGroup
from fedjax_eff.models.transformer import _LayerStack

SUBSAMPLES = (1, 2, 4)
POSITIONS = ('rotary', 'none', 'learned')

# Size presets (num_layers, d_model, heads, mlp, conv kernel). Exact
# parameter counts (`jax.eval_shape`) with 40 mels, 29 classes, subsample 4
# and rotary positions:
#   tiny    (tests)                                    36,725
#   cpu     (CPU experiments)                       1,035,197
#   small   Conformer (S) encoder                   8,153,165
#   medium  Conformer (M) encoder                  25,561,885
#   10m     (S) widths, 20 blocks                  10,096,589
#   30m     (M) widths, 19 blocks                  30,131,485
# Gulati et al.'s 10.3M (S) and 30.7M (M) include their one-layer LSTM
# RNN-T decoder; the encoders alone are the 'small' and 'medium' counts
# (80 mels add 207,360 to 'small': a wider front-end Dense). '10m' and
# '30m' spend a ~10M / ~30M budget on encoder depth instead, for a CTC
# model of the paper's size.
_SIZES = {
    'tiny': dict(num_layers=2, d_model=32, num_heads=2, mlp_dim=64,
                 conv_kernel=5, subsample_channels=8),
    'cpu': dict(num_layers=4, d_model=96, num_heads=4, mlp_dim=384,
                conv_kernel=15),
    'small': dict(num_layers=16, d_model=144, num_heads=4, mlp_dim=576,
                  conv_kernel=32),
    'medium': dict(num_layers=16, d_model=256, num_heads=4, mlp_dim=1024,
                   conv_kernel=32),
}
_SIZES['10m'] = dict(_SIZES['small'], num_layers=20)
_SIZES['30m'] = dict(_SIZES['medium'], num_layers=19)


def conformer_ctc_preset(name: str) -> dict[str, Any]:
  """Size kwargs of `ConformerCTC` (counts at 40 mels, 29 classes):

  * 'tiny': tests (36,725 parameters);
  * 'cpu': d 96, 4 blocks, 4 heads, mlp 384, kernel 15 (1,035,197);
  * 'small': Conformer (S), d 144, 16 blocks, 4 heads, mlp 576, kernel 32
    (8,153,165: the paper's 10.3M counts its LSTM decoder too);
  * 'medium': Conformer (M), d 256, 16 blocks, mlp 1024 (25,561,885);
  * '10m': 'small' with 20 blocks (10,096,589);
  * '30m': 'medium' with 19 blocks (30,131,485).
  """
  if name not in _SIZES:
    raise ValueError(f'preset={name!r} is not one of {sorted(_SIZES)}.')
  return dict(_SIZES[name])


def subsampled_length(n, subsample: int = 4):
  """Frames left of `n` after `subsample` (1, 2 or 4): each 3x3 stride-2
  'VALID' conv maps n to `(n - 1) // 2` (never below 0). Works on ints and
  arrays (per-example lengths)."""
  if subsample not in SUBSAMPLES:
    raise ValueError(f'subsample={subsample} is not one of {SUBSAMPLES}.')
  for _ in range(subsample.bit_length() - 1):
    n = (n - 1) // 2
  return jnp.maximum(n, 0) if hasattr(n, 'shape') else max(n, 0)


def _frame_mask(t: int, lengths):
  """`[B, t]` bool, True at frames before each example's length."""
  return jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]


class SubsampleConv(nn.Module):
  """3x3 conv, stride 2 in both axes, 'VALID': `[B, T, F, C] ->
  [B, (T-1)//2, (F-1)//2, features]`.

  Strided shifted slices concatenated along channels, then one matmul (as
  `layers.Im2ColConv`): XLA:CPU computes conv weight-gradients inside
  `scan` (the simulator's client loop) slowly, slices and matmuls fast. The
  kernel has `nn.Conv`'s layout `(3, 3, C, features)` and its result.
  """
  features: int

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (3, 3, cin, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    t, f = (x.shape[1] - 1) // 2, (x.shape[2] - 1) // 2
    patches = jnp.concatenate(
        [x[:, i:i + 2 * t - 1:2, j:j + 2 * f - 1:2]
         for i in range(3) for j in range(3)], axis=-1)
    return patches @ kernel.reshape(9 * cin, self.features) + bias


class SpeechEmbed(nn.Module):
  """The front end: ESPnet's `Conv2dSubsampling` (two 3x3 stride-2 convs
  with ReLU over (time, frequency), `channels` each, then `Dense(d_model)`
  over channels x remaining frequencies) for `subsample` 4, one conv for 2,
  only the Dense for 1; plus learned absolute positions (`pos`,
  `[max_len, d_model]`) when `position='learned'`.

  `(x [B, T, n_mels], x_len [B]) -> (h [B, T', d_model], key_mask [B, T'])`
  with padded frames of `h` zero. Input frames at or past `x_len` are
  zeroed first and every conv's padded output rows again, so garbage in the
  padding cannot leak (the 'VALID' convs of real frames read only real
  frames anyway).
  """
  d_model: int
  subsample: int = 4
  channels: int = 0  # 0 = d_model
  position: str = 'rotary'
  max_len: int = 512
  # Federated dropout: kept channels of conv i (absent or 0 = `channels`).
  conv_widths: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x, x_len):
    x = jnp.asarray(x, jnp.float32)
    x_len = jnp.asarray(x_len, jnp.int32)
    if subsampled_length(x.shape[1], self.subsample) < 1:
      raise ValueError(f'{x.shape[1]} input frames leave none after '
                       f'subsample={self.subsample}.')
    h = x[..., None]  # [B, T, F, 1]
    h = h * _frame_mask(h.shape[1], x_len)[..., None, None]
    n = x_len
    for i in range(self.subsample.bit_length() - 1):
      kept = self.conv_widths[i] if i < len(self.conv_widths) else 0
      h = nn.relu(SubsampleConv(kept or self.channels or self.d_model,
                                name=f'conv_{i}')(h))
      n = subsampled_length(n, 2)
      h = h * _frame_mask(h.shape[1], n)[..., None, None].astype(h.dtype)
    b, t = h.shape[:2]
    h = nn.Dense(self.d_model, name='out')(h.reshape(b, t, -1))
    if self.position == 'learned':
      if t > self.max_len:
        raise ValueError(f'{t} subsampled frames > max_len={self.max_len}.')
      pos = self.param('pos', nn.initializers.normal(0.02),
                       (self.max_len, self.d_model))
      h = h + pos[:t]
    key_mask = _frame_mask(t, n)
    return h * key_mask[..., None].astype(h.dtype), key_mask


class ConformerCTC(_LayerStack):
  """Conformer speech encoder with a per-frame CTC head.

  `__call__((x, x_len), train=False, *, depth=None, layer_gates=None,
  stop_below=None, features=False, layer_drop_rate=None, task=0)`:
  `x` `[B, T, n_mels]` float log-mels, `x_len` `[B]` int frame counts ->
  `(logits [B, T', num_classes], logit_paddings [B, T'] float32)` with
  `T' = subsampled_length(T, subsample)` and 1.0 at frames at or past
  `subsampled_length(x_len)`: exactly `optax.ctc_loss`'s
  `(logits, logit_paddings)`. `num_classes` counts the CTC blank. With
  `features=True` the first element is the head's LayerNorm output
  `[B, T', d_model]`. `depth`, `layer_gates`, `stop_below`,
  `layer_drop_rate` and `task` as in `Transformer`.

  Blocks are `ConformerBlock`s (LayerNorm for the paper's BatchNorm:
  clients keep no batch statistics), non-causal. `n_mels` documents the
  expected feature width (the front end's Dense takes its input size from
  the data). Presets: `conformer_ctc_preset`.
  """
  num_classes: int = 29
  block_type: str = 'conformer'
  n_mels: int = 40
  subsample: int = 4
  subsample_channels: int = 0  # 0 = d_model
  position: str = 'rotary'
  max_len: int = 512

  def __post_init__(self):
    if self.subsample not in SUBSAMPLES:
      raise ValueError(f'subsample={self.subsample} is not one of '
                       f'{SUBSAMPLES}.')
    if self.position not in POSITIONS:
      raise ValueError(f'position={self.position!r} is not one of '
                       f'{POSITIONS}.')
    if self.num_classes < 2:
      raise ValueError(f'num_classes={self.num_classes} must count the blank '
                       'and at least one label.')
    super().__post_init__()

  @property
  def rotary(self) -> bool:
    return self.position == 'rotary'

  @property
  def _out_dim(self) -> int:
    return self.num_classes

  @property
  def _num_convs(self) -> int:
    return self.subsample.bit_length() - 1

  def _embed(self, inputs, train, widths):
    x, x_len = inputs
    embed = SpeechEmbed(
        widths.get('residual', self.d_model), self.subsample,
        self.subsample_channels or self.d_model, self.position, self.max_len,
        tuple(widths.get(f'embed/conv_{i}', 0)
              for i in range(self._num_convs)), name='embed')
    h, key_mask = embed(x, x_len)
    if self.dropout:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return embed, h, key_mask

  def _pool(self, h, key_mask):
    del key_mask
    return h  # A prediction per frame: no pooling.

  def _embed_residual(self):
    pos = (('embed/pos', 1),) if self.position == 'learned' else ()
    return (('embed/out/kernel', 1), ('embed/out/bias', 0), *pos)

  def _front_end_groups(self):
    """Scope 'all': each subsampling conv's output channels (its kernel
    and bias, and the input axis of what reads them: the next conv, or the
    front end's `out` Dense, whose input is the flattened `[F', C]` map,
    channel-minor). The mel bins stay: the data fixes them."""
    n, ch = self._num_convs, self.subsample_channels or self.d_model
    groups = []
    for i in range(n):
      reads = (f'embed/conv_{i + 1}/kernel', 2) if i + 1 < n else (
          'embed/out/kernel', 0)
      groups.append(WidthGroup(
          f'embed/conv_{i}', ch, ((f'embed/conv_{i}/kernel', 3),
                                  (f'embed/conv_{i}/bias', 0), reads),
          i - n, 'all'))
    return tuple(groups)

  @nn.compact
  def __call__(self, inputs, train: bool = False, *, depth: int | None = None,
               layer_gates=None, stop_below: int | None = None,
               features: bool = False, layer_drop_rate=None, task: int = 0,
               widths=None):
    x, x_len = inputs
    out = self._run((x, x_len), train, depth, layer_gates, stop_below,
                    features, layer_drop_rate, task, widths)
    lengths = subsampled_length(jnp.asarray(x_len, jnp.int32), self.subsample)
    paddings = 1.0 - _frame_mask(out.shape[1], lengths).astype(jnp.float32)
    return out, paddings
