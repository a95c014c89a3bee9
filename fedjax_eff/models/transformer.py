"""Pre-LN Transformer (text) and ViT (images) with an explicit layer stack.

Techniques for training big models on small devices act per layer: train
only the top blocks (`stop_below`), train a shallower prefix (`depth`), skip
blocks per client (`layer_gates`), grow a stack layer by layer with a fresh
head per layer (`per_layer_heads`), or probe the representation (`features`).
So the models here keep one fixed parameter tree with top-level names

  {'embed': ..., 'block_0': ..., ..., 'block_{L-1}': ..., 'head': ...}

(`'head_0'..'head_{L-1}'` with `per_layer_heads`), exposed as `layer_names`,
`head_names` and `groups`, and the blocks are a Python list, not `nn.scan`:
each block is its own subtree and its own static choice (`depth`,
`stop_below`). `benchmarks/layer_stack.py` measures what the list costs
against `nn.scan` in compile time and step time.

`model.init` always creates every block and every head, whatever `depth`,
`layer_gates` or `stop_below` say, so one tree serves every call.

The blocks are Transformer blocks or, with `block_type='conformer'`,
Conformer blocks (attention plus a depthwise convolution, `ConformerLM`;
the speech encoder `speech.ConformerCTC`): the stack around them is the
same.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_eff.models.layers import WidthLayerNorm, layer_norm
from fedjax_eff.models.structure import WidthGroup

# Layer counts, widths and heads of the size presets. Parameter counts:
#   transformer (vocab 10k, max_len 256, 10 classes, linear head):
#     tiny 345,674; small 7,367,178; base 43,085,834.
#   vit (28x28x1, patch 4, mean pooling, 10 classes): tiny 19,594;
#     small 4,758,538; base 37,868,554.
_SIZES = {
    'tiny': dict(num_layers=2, d_model=32, num_heads=2, mlp_dim=64),
    'small': dict(num_layers=6, d_model=256, num_heads=4, mlp_dim=1024),
    'base': dict(num_layers=12, d_model=512, num_heads=8, mlp_dim=2048),
}


def transformer_preset(name: str) -> dict[str, Any]:
  """Size kwargs of `Transformer`: 'tiny' (tests), 'small' or 'base'.

  'base' (12 layers, d_model 512, mlp 2048, 8 heads) has 43,085,834
  parameters with vocab 10k, max_len 256 and 10 classes (37.8M in the
  blocks, 5.1M in the token embedding).
  """
  if name not in _SIZES:
    raise ValueError(f'preset={name!r} is not one of {sorted(_SIZES)}.')
  return dict(_SIZES[name])


def vit_preset(name: str) -> dict[str, Any]:
  """Size kwargs of `ViT` (patch 4): 'tiny' (tests), 'small' or 'base'.

  'base' has 37,868,554 parameters on 28x28x1 images with 10 classes.
  """
  return dict(transformer_preset(name), patch_size=4)


# Where LoRA may attach inside a block: these kernel paths, matched by
# `lora_targets` (a regex), e.g. 'attn/(query|value)' (Hu et al.'s default).
LORA_SITES = ('attn/query', 'attn/key', 'attn/value', 'attn/out', 'mlp_in',
              'mlp_out')
ADAPTER_SITES = ('attn', 'mlp')
BLOCK_TYPES = ('transformer', 'conformer')
# The forward keys of every layer stack's `__call__` (Transformer,
# ConformerLM, ViT, ConformerCTC): see `fedjax_eff.models.structure`.
STACK_FORWARD_KEYS = ('depth', 'layer_gates', 'stop_below', 'features',
                      'layer_drop_rate', 'task', 'widths')


def module_pattern(kind: str, task: int) -> str:
  """Regex over parameter paths for the PEFT modules of `kind` and `task`.

  Modules are named `lora_<site>_t<task>` (inside the block / its `attn`),
  `adapter_<site>_t<task>` (inside the block) and `prompt_t<task>` (top
  level), so a technique can train exactly one task's modules with a static
  mask.
  """
  if kind == 'lora':
    return rf'(^|/)lora_[a-z_]+_t{task}/'
  if kind == 'adapter':
    return rf'(^|/)adapter_[a-z]+_t{task}/'
  if kind == 'prompt':
    return rf'^prompt_t{task}$'
  raise ValueError(f"module kind {kind!r} is not 'lora', 'adapter' or "
                   "'prompt'.")


class LoRA(nn.Module):
  """Low-rank update `(x @ a) @ b * alpha / rank` of one Dense kernel.

  `b` starts at zero (Hu et al. 2021), so a fresh module leaves the
  pretrained function unchanged; `a` is He-uniform. `x` is `[..., d_in]`,
  the output `[..., *out_shape]`.
  """
  rank: int
  alpha: float
  out_shape: tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    a = self.param('a', nn.initializers.he_uniform(),
                   (x.shape[-1], self.rank))
    b = self.param('b', nn.initializers.zeros,
                   (self.rank, int(np.prod(self.out_shape))))
    y = (x @ a) @ b * (self.alpha / self.rank)
    return y.reshape(x.shape[:-1] + tuple(self.out_shape))


class Adapter(nn.Module):
  """Bottleneck adapter (Houlsby et al. 2019): `x + up(gelu(down(x)))`.

  `up` starts at zero, so a fresh adapter is the identity.
  """
  dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.Dense(self.dim, name='down')(x))
    return x + nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros,
                        name='up')(y)


class PeftSpec(NamedTuple):
  """Which PEFT modules a block carries, one set per task (all created at
  init; `task` picks the set a call uses)."""
  lora_rank: int = 0
  lora_alpha: float = 0.0
  lora_targets: str = 'attn/(query|value)'
  adapter_dim: int = 0
  adapter_sites: str = 'mlp'   # 'attn' | 'mlp' | 'attn,mlp'
  num_tasks: int = 1

  def lora_on(self, site: str) -> bool:
    return bool(self.lora_rank) and re.fullmatch(self.lora_targets,
                                                 site) is not None

  def adapter_on(self, site: str) -> bool:
    return bool(self.adapter_dim) and site in self.adapter_sites.split(',')


def _per_task(spec: PeftSpec, task: int, init: bool, make, x):
  """`make(t)(x)` for the call's task; at init every task's module is
  created (one tree for every call), only `task`'s output is used."""
  out = None
  for t in (range(spec.num_tasks) if init else (task,)):
    y = make(t)(x)
    if t == task:
      out = y
  return out


def apply_rotary(x, positions=None, base: float = 10_000.0):
  """Rotary position embedding (Su et al. 2021, RoFormer) of `x`
  `[..., T, heads, head_dim]` at `positions` (`[T]`, default `0..T-1`).

  Feature pairs `(i, i + head_dim/2)` rotate by `position * base^(-2i/
  head_dim)` (the "rotate half" layout), so `<rot(q, m), rot(k, n)>`
  depends on `m - n` only: attention sees relative positions, with no
  position parameters and no maximum length, which suits speech frames of
  any duration.
  """
  hd = x.shape[-1]
  if hd % 2:
    raise ValueError(f'rotary embeddings need an even head_dim, got {hd}.')
  half = hd // 2
  if positions is None:
    positions = jnp.arange(x.shape[-3])
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = jnp.asarray(positions, jnp.float32)[:, None] * inv_freq  # [T, hd/2]
  cos = jnp.cos(angle)[:, None, :].astype(x.dtype)  # [T, 1, hd/2]
  sin = jnp.sin(angle)[:, None, :].astype(x.dtype)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Attention(nn.Module):
  """Multi-head self-attention with the parameter layout of
  `nn.MultiHeadDotProductAttention` (`query/key/value` kernels
  `[d, heads, head_dim]`, `out` kernel `[heads, head_dim, d]`) and optional
  LoRA updates on any of its four projections.

  `rotary` applies `apply_rotary` to each head's queries and keys before the
  dot product (no parameters: the tree is the same either way). Off by
  default, so every existing model and imported checkpoint is unchanged.
  `kept_heads` runs a sub-model with fewer heads of the same head size
  (federated dropout); `head_dim` fixes the head size when the input is
  narrower than the model width (federated dropout of the residual width).
  """
  num_heads: int
  peft: PeftSpec = PeftSpec()
  rotary: bool = False
  kept_heads: int = 0  # federated dropout: run this many heads (0 = all)
  head_dim: int = 0  # 0 = input width // num_heads

  @nn.compact
  def __call__(self, x, mask=None, task: int = 0):
    d = x.shape[-1]
    h = self.num_heads
    if d % h and not self.head_dim:
      raise ValueError(f'd_model={d} is not divisible by num_heads={h}.')
    shape = (self.kept_heads or h, self.head_dim or d // h)
    init = self.is_initializing()
    spec = self.peft

    def proj(name, y, out_shape, axis=-1):
      out = nn.DenseGeneral(out_shape, axis=axis, name=name)(y)
      if spec.lora_on(f'attn/{name}'):
        flat = y.reshape(y.shape[:-2] + (-1,)) if axis != -1 else y
        out = out + _per_task(
            spec, task, init,
            lambda t: LoRA(spec.lora_rank, spec.lora_alpha or spec.lora_rank,
                           tuple(np.atleast_1d(out_shape)),
                           name=f'lora_{name}_t{t}'), flat)
      return out

    q, k, v = (proj(n, x, shape) for n in ('query', 'key', 'value'))
    if self.rotary:
      q, k = apply_rotary(q), apply_rotary(k)
    y = nn.dot_product_attention(q, k, v, mask=mask)
    return proj('out', y, d, axis=(-2, -1))


def _head_dim(full: int, d: int, num_heads: int) -> int:
  """`Attention.head_dim` for input width `d` of a model `full` wide: the
  full model's head size when `d` is narrowed, else 0 (derived)."""
  return full // num_heads if full and d != full else 0


def _adapt(spec: PeftSpec, task: int, init: bool, site: str, y):
  """Task `task`'s adapter at `site` on `y`, if `spec` puts one there.

  Called inside a module's compact method: the adapter is that module's
  child `adapter_<site>_t<task>`.
  """
  if not spec.adapter_on(site):
    return y
  return _per_task(spec, task, init,
                   lambda t: Adapter(spec.adapter_dim,
                                     name=f'adapter_{site}_t{t}'), y)


def _dense(spec: PeftSpec, task: int, init: bool, name: str, y, out: int):
  """`Dense(out, name=name)(y)` plus task `task`'s LoRA update if `spec`
  targets `name` (children of the calling module, as `_adapt`)."""
  z = nn.Dense(out, name=name)(y)
  if spec.lora_on(name):
    z = z + _per_task(
        spec, task, init,
        lambda t: LoRA(spec.lora_rank, spec.lora_alpha or spec.lora_rank,
                       (out,), name=f'lora_{name}_t{t}'), y)
  return z


class Block(nn.Module):
  """Transformer block, pre-LN (default) or post-LN (BERT).

  pre:  `x + MHA(LN(x))`, then `x + MLP(LN(x))`;
  post: `LN(x + MHA(x))`, then `LN(x + MLP(x))` (`ln1`, `ln2` as BERT's
  attention-output and output LayerNorms).

  `mask` is a boolean attention mask broadcastable to `[B, heads, T, T]`
  (True = may attend), e.g. a padding and/or causal mask; None = full.
  Dropout (the 'dropout' rng) acts on the attention and MLP outputs and the
  MLP hidden layer, only when `train`. `peft` adds LoRA updates and
  bottleneck adapters (after the attention and/or MLP output, before the
  residual sum) per task; `task` picks the set. `rotary`: rotary position
  embeddings in the attention (`Attention`).
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  norm_position: str = 'pre'
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = True
  peft: PeftSpec = PeftSpec()
  rotary: bool = False
  widths: tuple[tuple[str, int], ...] = ()  # kept 'attn' heads, 'mlp' units
  # The full model width when `x` may be narrower (federated dropout of the
  # residual width); 0 = `x`'s width.
  model_dim: int = 0

  @nn.compact
  def __call__(self, x, mask=None, train: bool = False, task: int = 0):
    d = x.shape[-1]
    spec = self.peft
    widths = dict(self.widths)
    init = self.is_initializing()
    drop = lambda y: nn.Dropout(self.dropout, deterministic=not train)(y)
    norm = lambda name: lambda y: layer_norm(y, name, self.model_dim,
                                             self.layer_norm_eps)
    pre = self.norm_position == 'pre'

    y = norm('ln1')(x) if pre else x
    y = Attention(self.num_heads, spec, self.rotary, widths.get('attn', 0),
                  _head_dim(self.model_dim, d, self.num_heads),
                  name='attn')(y, mask, task)
    x = x + drop(_adapt(spec, task, init, 'attn', y))
    if not pre:
      x = norm('ln1')(x)
    y = norm('ln2')(x) if pre else x
    mlp = widths.get('mlp', self.mlp_dim)
    y = nn.gelu(_dense(spec, task, init, 'mlp_in', y, mlp),
                approximate=self.gelu_approximate)
    y = _dense(spec, task, init, 'mlp_out', drop(y), d)
    x = x + drop(_adapt(spec, task, init, 'mlp', y))
    return x if pre else norm('ln2')(x)


class DepthwiseConv1D(nn.Module):
  """Depthwise 1-D convolution over time, `[B, T, d] -> [B, T, d]`.

  `causal`: output t sees inputs t-k+1..t (left padding k-1); else 'SAME'
  padding. Computed as k shifted multiply-adds rather than a grouped
  `lax.conv`: XLA:CPU computes convolution gradients inside `scan` (the
  simulator's client loop) very slowly (see `layers.py`), and k elementwise
  ops on `[B, T, d]` are cheap anywhere. The kernel has the layout of
  `nn.Conv(d, (k,), feature_group_count=d)`, `(k, 1, d)`, and the same
  result.
  """
  kernel_size: int
  causal: bool = False

  @nn.compact
  def __call__(self, x):
    k, d, t = self.kernel_size, x.shape[-1], x.shape[1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (k, 1, d))
    bias = self.param('bias', nn.initializers.zeros, (d,))
    lo = k - 1 if self.causal else (k - 1) // 2
    xp = jnp.pad(x, ((0, 0), (lo, k - 1 - lo), (0, 0)))
    y = sum(xp[:, j:j + t] * kernel[j, 0] for j in range(k))
    return y + bias


class FeedForward(nn.Module):
  """The conformer's macaron feed-forward: `LN -> Dense(mlp_dim) -> swish ->
  dropout -> Dense(d) -> dropout` (the caller halves the residual). LoRA
  sites `mlp_in`/`mlp_out` and the 'mlp' adapter as in `Block`."""
  mlp_dim: int
  dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  peft: PeftSpec = PeftSpec()
  model_dim: int = 0  # full width when `x` is narrowed (0 = x's width)

  @nn.compact
  def __call__(self, x, train: bool = False, task: int = 0):
    spec, init = self.peft, self.is_initializing()
    drop = lambda y: nn.Dropout(self.dropout, deterministic=not train)(y)
    y = layer_norm(x, 'ln', self.model_dim, self.layer_norm_eps)
    y = nn.swish(_dense(spec, task, init, 'mlp_in', y, self.mlp_dim))
    y = _dense(spec, task, init, 'mlp_out', drop(y), x.shape[-1])
    return drop(_adapt(spec, task, init, 'mlp', y))


class ConvModule(nn.Module):
  """The conformer's convolution module: `LN -> Dense(2d) -> GLU ->
  depthwise conv -> LN -> swish -> Dense(d) -> dropout`.

  LayerNorm replaces the paper's BatchNorm: federated clients keep no batch
  statistics. Positions where `key_mask` is False (padding) are zeroed
  before the depthwise conv, so padding never leaks into real positions
  (with 'SAME' padding it would reach the last k//2 real tokens); a causal
  conv reads only the past.
  """
  kernel_size: int
  causal: bool = False
  dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  # Federated dropout: kept conv channels (0 = all) and the full model
  # width (0 = `x`'s), which is also the full number of conv channels.
  channels: int = 0
  model_dim: int = 0

  @nn.compact
  def __call__(self, x, train: bool = False, key_mask=None):
    d = x.shape[-1]
    full = self.model_dim or d
    eps = self.layer_norm_eps
    y = nn.Dense(2 * (self.channels or full),
                 name='pw_in')(layer_norm(x, 'ln', full, eps))
    y = nn.glu(y, axis=-1)
    if key_mask is not None:
      y = y * key_mask[..., None].astype(y.dtype)
    y = DepthwiseConv1D(self.kernel_size, self.causal, name='dw')(y)
    y = nn.swish(layer_norm(y, 'ln_dw', full, eps))
    y = nn.Dense(d, name='pw_out')(y)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


class ConformerBlock(nn.Module):
  """Conformer block (Gulati et al. 2020, arXiv 2005.08100):

    x + 1/2 FFN(x) ; x + MHSA(LN(x)) ; x + Conv(x) ; x + 1/2 FFN(x) ; LN

  (`ffn_in`, `ln_attn` + `attn`, `conv`, `ffn_out`, `ln_out`). `attn` is
  the Transformer's `Attention`, so LoRA on 'attn/...' sites works as in
  `Block`; LoRA on 'mlp_in'/'mlp_out' and 'mlp' adapters act in both
  feed-forwards; an 'attn' adapter follows the attention. `mask` as in
  `Block`; `key_mask` (`[B, T]`, True = real token) zeroes padding before
  the depthwise conv; `causal` makes that conv causal; `rotary` as in
  `Block`.
  """
  num_heads: int
  mlp_dim: int
  conv_kernel: int = 15
  causal: bool = False
  dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  peft: PeftSpec = PeftSpec()
  rotary: bool = False
  # Federated dropout: kept 'attn' heads, 'ffn_in' / 'ffn_out' units,
  # 'conv' channels; `model_dim` the full width when `x` is narrower.
  widths: tuple[tuple[str, int], ...] = ()
  model_dim: int = 0

  @nn.compact
  def __call__(self, x, mask=None, train: bool = False, task: int = 0,
               key_mask=None):
    spec, init = self.peft, self.is_initializing()
    widths = dict(self.widths)
    full, eps = self.model_dim or x.shape[-1], self.layer_norm_eps
    ffn = lambda name: FeedForward(widths.get(name, self.mlp_dim),
                                   self.dropout, eps, spec, full, name=name)
    x = x + 0.5 * ffn('ffn_in')(x, train, task)
    y = layer_norm(x, 'ln_attn', full, eps)
    y = Attention(self.num_heads, spec, self.rotary, widths.get('attn', 0),
                  _head_dim(full, x.shape[-1], self.num_heads),
                  name='attn')(y, mask, task)
    y = _adapt(spec, task, init, 'attn', y)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    x = x + ConvModule(self.conv_kernel, self.causal, self.dropout, eps,
                       widths.get('conv', 0), full,
                       name='conv')(x, train, key_mask)
    x = x + 0.5 * ffn('ffn_out')(x, train, task)
    return layer_norm(x, 'ln_out', full, eps)


class Head(nn.Module):
  """Final LayerNorm (`norm`), then a linear or an MLP head (`hidden` > 0).

  `out` = 0 stops after the LayerNorm (the tied LM head, whose projection is
  the token embedding). Returns (features after the LayerNorm, logits).
  Post-LN stacks (BERT) end normalised already: `norm=False`.
  """
  out: int
  hidden: int = 0
  norm: bool = True
  layer_norm_eps: float = 1e-6
  model_dim: int = 0  # full width when `x` is narrowed (0 = x's width)

  @nn.compact
  def __call__(self, x):
    feats = (layer_norm(x, 'ln', self.model_dim, self.layer_norm_eps)
             if self.norm else x)
    if not self.out:
      return feats, feats
    y = feats
    if self.hidden:
      y = nn.relu(nn.Dense(self.hidden, name='hidden')(y))
    return feats, nn.Dense(self.out, name='out')(y)


class TokenEmbed(nn.Module):
  """Token embedding plus learned position embedding (`max_len` positions).

  BERT adds a token-type embedding (`type_vocab_size` > 0; every token is
  type 0 here: single-segment inputs) and a LayerNorm (`norm`).
  """
  vocab_size: int
  d_model: int
  max_len: int
  type_vocab_size: int = 0
  norm: bool = False
  layer_norm_eps: float = 1e-6
  full_dim: int = 0  # federated dropout: the full width (0 = d_model)

  def setup(self):
    self.tok = nn.Embed(self.vocab_size, self.d_model,
                        embedding_init=nn.initializers.normal(0.02))
    self.pos = self.param('pos', nn.initializers.normal(0.02),
                          (self.max_len, self.d_model))
    if self.type_vocab_size:
      self.type = self.param('type', nn.initializers.normal(0.02),
                             (self.type_vocab_size, self.d_model))
    if self.norm:
      self.ln = (WidthLayerNorm(self.full_dim, self.layer_norm_eps)
                 if self.full_dim and self.full_dim != self.d_model else
                 nn.LayerNorm(epsilon=self.layer_norm_eps))

  def __call__(self, tokens):
    t = tokens.shape[1]
    if t > self.max_len:
      raise ValueError(f'sequence length {t} > max_len={self.max_len}.')
    h = self.tok(tokens) + self.pos[:t]
    if self.type_vocab_size:
      h = h + self.type[0]
    return self.ln(h) if self.norm else h

  def attend(self, h, frozen: bool = False):
    """Logits against the token embedding (tied output projection)."""
    emb = self.tok.embedding
    if frozen:
      emb = jax.lax.stop_gradient(emb)
    return h @ emb.T


class PatchEmbed(nn.Module):
  """Non-overlapping patches by reshape + Dense, learned positions.

  A reshape and a matmul rather than a strided `nn.Conv`: XLA:CPU runs conv
  gradients inside `scan` slowly (see `layers.py`). With `cls`, a learned
  token is prepended (position 0).
  """
  patch_size: int
  d_model: int
  cls: bool = False

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    if x.ndim == 3:
      x = x[..., None]
    b, hh, ww, c = x.shape
    p = self.patch_size
    if hh % p or ww % p:
      raise ValueError(f'image {hh}x{ww} is not divisible by patch_size={p}.')
    x = x.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = nn.Dense(self.d_model, name='patch')(x.reshape(b, -1, p * p * c))
    if self.cls:
      tok = self.param('cls', nn.initializers.zeros, (1, 1, self.d_model))
      x = jnp.concatenate([jnp.broadcast_to(tok, (b, 1, self.d_model)), x], 1)
    pos = self.param('pos', nn.initializers.normal(0.02),
                     (x.shape[1], self.d_model))
    return x + pos


def _is_static(v) -> bool:
  return isinstance(v, (bool, int, float, np.ndarray, np.generic))


class _LayerStack(nn.Module):
  """What `Transformer` and `ViT` share: fields, the block loop, the heads.

  Subclasses define `_embed(x, train, widths) -> (embed module,
  h [B, T, d], key_mask [B, T] or None)` (`d` = `widths['residual']` when
  federated dropout narrows the residual width), `_embed_residual` (its
  parameter axes on that width), `_out_dim`, `_pool(h, key_mask)` and
  optionally `_project` (logits from the head's output).

  PEFT modules (FedYolo; see `module_pattern` for their names), one set per
  task, all created at init:
  * `lora_rank` > 0: LoRA on the block kernels matching `lora_targets` (a
    regex over `LORA_SITES`), scaled by `lora_alpha / lora_rank` (alpha 0 =
    rank);
  * `adapter_dim` > 0: bottleneck adapters at `adapter_sites` ('attn',
    'mlp' or 'attn,mlp');
  * `prompt_len` > 0: learned prompt tokens prepended to the embedded
    sequence (VPT-shallow / prompt tuning; dropped again before pooling).
  With `num_tasks` > 1 each task also has its own head `head_t<task>`
  (`task_classes[task]` outputs, default `num_classes`), and `__call__`'s
  static `task` picks the module set and head.

  `block_type` 'conformer' builds `ConformerBlock`s (depthwise conv of
  `conv_kernel` taps, causal when the stack is) in place of the
  Transformer `Block`s; the stack around them (`block_i` names, `depth`,
  `layer_gates`, `stop_below`, heads) is the same. Conformer blocks are
  pre-LN only.

  `rotary` (a class attribute, like `causal`; a subclass may make it a
  field or a property) turns on rotary position embeddings in every
  block's attention.
  """
  num_classes: int = 0
  d_model: int = 32
  num_heads: int = 2
  mlp_dim: int = 64
  num_layers: int = 2
  dropout: float = 0.0
  pooling: str = 'mean'
  head_hidden: int = 0
  per_layer_heads: bool = False
  norm_position: str = 'pre'
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = True
  lora_rank: int = 0
  lora_alpha: float = 0.0
  lora_targets: str = 'attn/(query|value)'
  adapter_dim: int = 0
  adapter_sites: str = 'mlp'
  prompt_len: int = 0
  num_tasks: int = 1
  task_classes: tuple[int, ...] = ()
  block_type: str = 'transformer'
  conv_kernel: int = 15

  def __post_init__(self):
    if self.block_type not in BLOCK_TYPES:
      raise ValueError(f'block_type={self.block_type!r} is not one of '
                       f'{BLOCK_TYPES}.')
    if self.block_type == 'conformer':
      if self.norm_position != 'pre':
        raise ValueError("block_type='conformer' is pre-LN only "
                         f'(norm_position={self.norm_position!r}).')
      if self.conv_kernel < 1:
        raise ValueError(f'conv_kernel={self.conv_kernel} must be >= 1.')
    if self.pooling not in ('mean', 'cls'):
      raise ValueError(f"pooling={self.pooling!r} is not 'mean' or 'cls'.")
    if self.norm_position not in ('pre', 'post'):
      raise ValueError(f"norm_position={self.norm_position!r} is not 'pre' "
                       "or 'post'.")
    if self.lora_rank and not any(re.fullmatch(self.lora_targets, site)
                                  for site in LORA_SITES):
      raise ValueError(f'lora_targets={self.lora_targets!r} matches none of '
                       f'{LORA_SITES}.')
    bad = set(self.adapter_sites.split(',')) - set(ADAPTER_SITES)
    if self.adapter_dim and bad:
      raise ValueError(f'adapter_sites={self.adapter_sites!r}: {sorted(bad)} '
                       f'not in {ADAPTER_SITES}.')
    if self.num_tasks < 1:
      raise ValueError(f'num_tasks={self.num_tasks} must be >= 1.')
    if self.task_classes and len(self.task_classes) != self.num_tasks:
      raise ValueError(f'task_classes={self.task_classes} needs one entry '
                       f'per task (num_tasks={self.num_tasks}).')
    if self.num_tasks > 1 and self.per_layer_heads:
      raise ValueError('per_layer_heads and num_tasks > 1 do not combine.')
    super().__post_init__()

  @property
  def peft(self) -> PeftSpec:
    return PeftSpec(self.lora_rank, self.lora_alpha, self.lora_targets,
                    self.adapter_dim, self.adapter_sites, self.num_tasks)

  @property
  def layer_names(self) -> tuple[str, ...]:
    return tuple(f'block_{i}' for i in range(self.num_layers))

  @property
  def head_names(self) -> tuple[str, ...]:
    if self.per_layer_heads:
      return tuple(f'head_{i}' for i in range(self.num_layers))
    if self.num_tasks > 1:
      return tuple(f'head_t{t}' for t in range(self.num_tasks))
    return ('head',)

  @property
  def groups(self) -> dict[str, tuple[str, ...]]:
    return {'embed': ('embed',), 'layers': self.layer_names,
            'head': self.head_names}

  causal = False
  rotary = False
  # `structure.forward_keys`: the kwargs of `__call__` (every subclass's)
  # a technique may set.
  FORWARD_KEYS = STACK_FORWARD_KEYS

  def _attn_mask(self, key_mask, t):
    mask = None
    if key_mask is not None:
      mask = key_mask[:, None, None, :]
    if self.causal:
      c = jnp.tril(jnp.ones((t, t), bool))[None, None]
      mask = c if mask is None else mask & c
    return mask

  def _project(self, feats, logits, embed, stop_below):
    del feats, embed, stop_below
    return logits

  def _block(self, i: int, widths: dict[str, int]) -> nn.Module:
    prefix = f'block_{i}/'
    mine = tuple((k[len(prefix):], v) for k, v in sorted(widths.items())
                 if k.startswith(prefix))
    if self.block_type == 'conformer':
      return ConformerBlock(self.num_heads, self.mlp_dim, self.conv_kernel,
                            self.causal, self.dropout, self.layer_norm_eps,
                            self.peft, self.rotary, mine,
                            model_dim=self.d_model, name=f'block_{i}')
    return Block(self.num_heads, self.mlp_dim, self.dropout,
                 self.norm_position, self.layer_norm_eps,
                 self.gelu_approximate, self.peft, self.rotary, mine,
                 model_dim=self.d_model, name=f'block_{i}')

  def _embed_residual(self) -> tuple[tuple[str, int], ...]:
    """The embedding's parameter axes on the residual width."""
    raise NotImplementedError

  def _front_end_groups(self) -> tuple[WidthGroup, ...]:
    """Width groups inside the embedding (scope 'all'); none here."""
    return ()

  @property
  def width_groups(self):
    """Federated dropout's units.

    Scope 'units' (the default), per block: attention heads (query/key/
    value outputs, out inputs) and MLP hidden units (a conformer's two
    feed-forwards separately).

    Scope 'all' adds, per conformer block, the conv module's channels
    (`pw_in`'s two GLU halves, the depthwise conv, `ln_dw`, `pw_out`'s
    input), the front end's conv channels (`_front_end_groups`), and one
    `residual` group for the model width `d_model`: the residual stream
    ties every block to the embedding and the heads, so its units are
    dropped together everywhere (embedding outputs and positions, every
    LayerNorm, the inputs of query/key/value/`mlp_in`/`pw_in`, the outputs
    of `out`/`mlp_out`/`pw_out`, prompts, the heads' LayerNorm and input).
    Its `depth` is the middle of the stack.

    Never dropped: the input (token ids, image patches' pixels, mel bins)
    and the output (classes, vocabulary, CTC labels), whose sizes the data
    fixes; the head size inside attention (rotary pairs and the
    `1/sqrt(head_dim)` scale are per head: heads drop whole); the depthwise
    kernel's taps; and a LoRA or adapter (federated dropout refuses them).
    """
    groups = []
    conformer = self.block_type == 'conformer'
    residual = list(self._embed_residual())
    residual += [(f'prompt_t{t}', 1) for t in range(self.num_tasks)
                 if self.prompt_len]
    ln = lambda p: ((f'{p}/scale', 0), (f'{p}/bias', 0))
    for i in range(self.num_layers):
      b = f'block_{i}'
      attn = tuple((f'{b}/attn/{n}/{w}', a) for n in ('query', 'key', 'value')
                   for w, a in (('kernel', 1), ('bias', 0))) + (
                       (f'{b}/attn/out/kernel', 0),)
      groups.append(WidthGroup(f'{b}/attn', self.num_heads, attn, i))
      mlps = (('ffn_in', 'ffn_in/'), ('ffn_out', 'ffn_out/')) if (
          conformer) else (('mlp', ''),)
      for name, sub in mlps:
        groups.append(WidthGroup(f'{b}/{name}', self.mlp_dim, (
            (f'{b}/{sub}mlp_in/kernel', 1), (f'{b}/{sub}mlp_in/bias', 0),
            (f'{b}/{sub}mlp_out/kernel', 0)), i))
        residual += [*ln(f'{b}/{sub}ln')] if conformer else []
        residual += [(f'{b}/{sub}mlp_in/kernel', 0),
                     (f'{b}/{sub}mlp_out/kernel', 1),
                     (f'{b}/{sub}mlp_out/bias', 0)]
      residual += [(f'{b}/attn/{n}/kernel', 0)
                   for n in ('query', 'key', 'value')]
      residual += [(f'{b}/attn/out/kernel', 2), (f'{b}/attn/out/bias', 0)]
      if conformer:
        c = f'{b}/conv'
        groups.append(WidthGroup(c, self.d_model, (
            (f'{c}/pw_in/kernel', 1), (f'{c}/pw_in/bias', 0),
            (f'{c}/dw/kernel', 2), (f'{c}/dw/bias', 0), *ln(f'{c}/ln_dw'),
            (f'{c}/pw_out/kernel', 0)), i, 'all'))
        residual += [*ln(f'{b}/ln_attn'), *ln(f'{c}/ln'),
                     (f'{c}/pw_in/kernel', 0), (f'{c}/pw_out/kernel', 1),
                     (f'{c}/pw_out/bias', 0), *ln(f'{b}/ln_out')]
      else:
        residual += [*ln(f'{b}/ln1'), *ln(f'{b}/ln2')]
    for h in self.head_names:
      if self.norm_position == 'pre':
        residual += [*ln(f'{h}/ln')]
      if self.head_hidden:
        residual.append((f'{h}/hidden/kernel', 0))
      elif self._out_dim or self.num_tasks > 1:
        residual.append((f'{h}/out/kernel', 0))
    return (self._front_end_groups() + tuple(groups) + (WidthGroup(
        'residual', self.d_model, tuple(residual),
        (self.num_layers - 1) / 2, 'all'),))

  def _task_out_dim(self, task: int) -> int:
    if self.task_classes:
      return int(self.task_classes[task])
    return self._out_dim

  def _prompt(self, h, key_mask, task, init):
    """Prepends task `task`'s prompt tokens (no position embedding)."""
    p = self.prompt_len
    prompts = [self.param(f'prompt_t{t}', nn.initializers.normal(0.02),
                          (p, h.shape[-1]))
               for t in (range(self.num_tasks) if init else (task,))]
    prompt = prompts[task if init else 0].astype(h.dtype)
    h = jnp.concatenate([jnp.broadcast_to(prompt, (h.shape[0],) +
                                          prompt.shape), h], 1)
    if key_mask is not None:
      key_mask = jnp.concatenate(
          [jnp.ones((h.shape[0], p), bool), key_mask], 1)
    return h, key_mask

  def _run(self, x, train, depth, layer_gates, stop_below, features,
           layer_drop_rate=None, task=0, widths=None, train_output=False):
    n = self.num_layers
    widths = dict(widths or ())
    if widths and (self.lora_rank or self.adapter_dim):
      raise ValueError('federated dropout (widths) does not combine with '
                       'LoRA or adapter modules.')
    init = self.is_initializing()
    depth = n if depth is None else depth
    if not 1 <= depth <= n:
      raise ValueError(f'depth={depth} is not in [1, {n}].')
    if not 0 <= task < self.num_tasks:
      raise ValueError(f'task={task} is not in [0, {self.num_tasks}).')
    if layer_gates is not None and np.shape(layer_gates) != (n,):
      raise ValueError(f'layer_gates shape {np.shape(layer_gates)} != ({n},).')
    if init:  # One tree for every call: create all blocks and heads.
      depth, layer_gates, stop_below, layer_drop_rate = n, None, None, None
      widths = {}
    if layer_drop_rate is not None and train and np.any(
        np.asarray(layer_drop_rate) > 0):
      # Stochastic depth drawn per call (per local step) from the dropout rng.
      keep = jax.random.bernoulli(self.make_rng('dropout'),
                                  1.0 - jnp.asarray(layer_drop_rate), (n,))
      layer_gates = keep if layer_gates is None else keep & (
          jnp.asarray(layer_gates) > 0)
    embed, h, key_mask = self._embed(x, train, widths)
    seq_mask = key_mask
    if self.prompt_len:
      h, key_mask = self._prompt(h, key_mask, task, init)
    mask = self._attn_mask(key_mask, h.shape[1])
    conformer = self.block_type == 'conformer'

    def run(mdl, h, mask, key_mask):
      if conformer:
        return mdl(h, mask, train, task, key_mask)
      return mdl(h, mask, train, task)

    for i in range(depth):
      if i == stop_below:
        h = jax.lax.stop_gradient(h)
      block = self._block(i, widths)
      gate = None if layer_gates is None else layer_gates[i]
      if gate is None or (_is_static(gate) and gate):
        h = run(block, h, mask, key_mask)
      elif _is_static(gate):
        pass  # A static skip: the block does not run.
      else:
        # A real skip when the gate is unbatched; a select under vmap.
        h = nn.cond(gate > 0, run,
                    lambda mdl, h, mask, key_mask: h,
                    block, h, mask, key_mask)
    if stop_below is not None and stop_below >= depth:
      h = jax.lax.stop_gradient(h)
    if self.prompt_len:
      h = h[:, self.prompt_len:]
    key_mask = seq_mask
    pooled = self._pool(h, key_mask)
    make_head = lambda name, out: Head(out, self.head_hidden,
                                       self.norm_position == 'pre',
                                       self.layer_norm_eps, self.d_model,
                                       name=name)
    if self.per_layer_heads:
      heads = [make_head(f'head_{i}', self._out_dim) for i in range(n)]
      if init:
        for hd in heads:
          hd(pooled)
      head = heads[depth - 1]
    elif self.num_tasks > 1:
      heads = {t: make_head(f'head_t{t}', self._task_out_dim(t))
               for t in (range(self.num_tasks) if init else (task,))}
      if init:
        for hd in heads.values():
          hd(pooled)
      head = heads[task]
    else:
      head = make_head('head', self._out_dim)
    feats, logits = head(pooled)
    if features:
      return feats
    return self._project(feats, logits, embed,
                         None if train_output else stop_below)


class Transformer(_LayerStack):
  """Text Transformer: encoder classifier or causal LM (`causal=True`).

  Input int tokens `[B, T]` (T <= max_len). Encoder: attention and 'mean'
  pooling ignore `pad_id` tokens; 'cls' pooling reads the first token (the
  data's BOS/CLS token). Output `[B, num_classes]`. Causal LM: output
  `[B, T, vocab_size]` (`num_classes` is ignored); with `tied_embeddings`
  the logits are `LN(h) @ embedding.T` and the head holds only the
  LayerNorm.

  `__call__(tokens, train=False, *, depth=None, layer_gates=None,
  stop_below=None, features=False)`:

  * `depth` (static int): run blocks 0..depth-1 only; the head (with
    `per_layer_heads`, `head_{depth-1}`) reads block depth-1.
  * `layer_gates` (`[num_layers]`, bool or 0/1): block i runs iff gate i is
    true, else it is the identity. Traced gates go through `lax.cond`
    (skipped when unbatched, a select when batched under `vmap`); Python or
    NumPy gates are static.
  * `stop_below` (static int): stop gradients at the activations entering
    block `stop_below` (or the head, if that is >= depth), so the embedding
    and blocks below get zero gradient. The tied LM output projection then
    also uses a stop-gradient embedding: the embedding stays frozen.
  * `train_output` (static bool, tied LM only): with `stop_below`, the
    tied output projection still gets its gradient (the embedding trains
    as the output layer; its input side stays cut at `stop_below`):
    partial training with the head trainable (`partial_training`).
  * `features`: return the head's LayerNorm output (pooled `[B, d_model]`;
    per token `[B, T, d_model]` for the LM) instead of logits.
  * `layer_drop_rate` (`[num_layers]` probabilities, static): in training,
    block i is skipped with probability rate i, drawn afresh at every call
    from the 'dropout' rng (depth dropout per local step).
  * `task` (static int): the task whose PEFT modules and head run.

  BERT-style checkpoints (`models/hf.py`) set `norm_position='post'`,
  `layer_norm_eps=1e-12`, `gelu_approximate=False`, `type_vocab_size=2` and
  `embed_norm=True`.
  """
  vocab_size: int = 10_000
  max_len: int = 256
  causal: bool = False
  tied_embeddings: bool = False
  pad_id: int = 0
  type_vocab_size: int = 0
  embed_norm: bool = False

  def __post_init__(self):
    if self.causal and self.tied_embeddings and self.head_hidden:
      raise ValueError('a tied LM head has no hidden layer (head_hidden=0).')
    super().__post_init__()

  FORWARD_KEYS = STACK_FORWARD_KEYS + ('train_output',)

  @property
  def _tied(self) -> bool:
    return self.causal and self.tied_embeddings

  @property
  def tied_output(self) -> str | None:
    """The parameter path of the output projection when it is the token
    embedding (a tied causal LM), else None."""
    return 'embed/tok/embedding' if self._tied else None

  @property
  def _out_dim(self) -> int:
    if self.causal:
      return 0 if self._tied else self.vocab_size
    return self.num_classes

  def _embed(self, tokens, train, widths):
    embed = TokenEmbed(self.vocab_size, widths.get('residual', self.d_model),
                       self.max_len, self.type_vocab_size, self.embed_norm,
                       self.layer_norm_eps, self.d_model, name='embed')
    h = embed(tokens)
    if self.dropout:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return embed, h, tokens != self.pad_id

  def _embed_residual(self):
    out = [('embed/tok/embedding', 1), ('embed/pos', 1)]
    if self.type_vocab_size:
      out.append(('embed/type', 1))
    if self.embed_norm:
      out += [('embed/ln/scale', 0), ('embed/ln/bias', 0)]
    return tuple(out)

  def _pool(self, h, key_mask):
    if self.causal:
      return h
    if self.pooling == 'cls':
      return h[:, 0]
    w = key_mask.astype(h.dtype)[..., None]
    return (h * w).sum(1) / jnp.maximum(w.sum(1), 1.0)

  def _project(self, feats, logits, embed, stop_below):
    if not self._tied:
      return logits
    return embed.attend(feats, frozen=stop_below is not None)

  @nn.compact
  def __call__(self, tokens, train: bool = False, *, depth: int | None = None,
               layer_gates=None, stop_below: int | None = None,
               features: bool = False, layer_drop_rate=None, task: int = 0,
               widths=None, train_output: bool = False):
    return self._run(tokens, train, depth, layer_gates, stop_below, features,
                     layer_drop_rate, task, widths, train_output)


class ConformerLM(Transformer):
  """Causal Conformer language model: `Transformer` with conformer blocks.

  Tokens `[B, T]` -> logits `[B, T, vocab_size]`, tied embeddings, causal
  attention and causal depthwise convs (position t reads tokens <= t only).
  Everything else (`depth`, `layer_gates`, `stop_below`, PEFT, ...) as in
  `Transformer`.

  A ~20M configuration for Stack Overflow (vocab 10k + 4 special tokens):
  `ConformerLM(vocab_size=10004, d_model=256, num_heads=4, mlp_dim=1024,
  num_layers=12, max_len=256)` has 20,853,248 parameters (18.2M in the
  blocks, 1,518,848 each; 2.6M in the token embedding, also the output
  projection; 65,536 in the positions); `CONFORMER_20M` holds it.
  """
  block_type: str = 'conformer'
  causal: bool = True
  tied_embeddings: bool = True


# The ~20M Conformer LM configuration (see `ConformerLM`).
CONFORMER_20M = dict(vocab_size=10004, d_model=256, num_heads=4, mlp_dim=1024,
                     num_layers=12, max_len=256)


class ViT(_LayerStack):
  """Vision Transformer: patches -> pre-LN blocks -> pooled linear/MLP head.

  Input float images `[B, H, W]` or `[B, H, W, C]` (H, W divisible by
  `patch_size`); output `[B, num_classes]`. 'cls' pooling prepends a learned
  token and reads it; 'mean' averages the patch tokens. `depth`,
  `layer_gates`, `stop_below`, `features` and `task` as in `Transformer`.
  """
  patch_size: int = 4

  @property
  def _out_dim(self) -> int:
    return self.num_classes

  def _embed(self, x, train, widths):
    embed = PatchEmbed(self.patch_size, widths.get('residual', self.d_model),
                       self.pooling == 'cls', name='embed')
    h = embed(x)
    if self.dropout:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return embed, h, None

  def _embed_residual(self):
    cls = (('embed/cls', 2),) if self.pooling == 'cls' else ()
    return (('embed/patch/kernel', 1), ('embed/patch/bias', 0), *cls,
            ('embed/pos', 1))

  def _pool(self, h, key_mask):
    del key_mask
    return h[:, 0] if self.pooling == 'cls' else h.mean(1)

  @nn.compact
  def __call__(self, x, train: bool = False, *, depth: int | None = None,
               layer_gates=None, stop_below: int | None = None,
               features: bool = False, layer_drop_rate=None, task: int = 0,
               widths=None):
    return self._run(x, train, depth, layer_gates, stop_below, features,
                     layer_drop_rate, task, widths)
