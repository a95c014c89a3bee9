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
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


class Block(nn.Module):
  """Pre-LN block: `x + MHA(LN(x))`, then `x + MLP(LN(x))` (GELU).

  `mask` is a boolean attention mask broadcastable to `[B, heads, T, T]`
  (True = may attend), e.g. a padding and/or causal mask; None = full.
  Dropout (the 'dropout' rng) acts on the attention and MLP outputs and the
  MLP hidden layer, only when `train`.
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, mask=None, train: bool = False):
    d = x.shape[-1]
    drop = lambda y: nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(name='ln1')(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, name='attn')(y, y, mask=mask)
    x = x + drop(y)
    y = nn.LayerNorm(name='ln2')(x)
    y = nn.gelu(nn.Dense(self.mlp_dim, name='mlp_in')(y))
    y = nn.Dense(d, name='mlp_out')(drop(y))
    return x + drop(y)


class Head(nn.Module):
  """Final LayerNorm, then a linear or an MLP head (`hidden` > 0).

  `out` = 0 stops after the LayerNorm (the tied LM head, whose projection is
  the token embedding). Returns (features after the LayerNorm, logits).
  """
  out: int
  hidden: int = 0

  @nn.compact
  def __call__(self, x):
    feats = nn.LayerNorm(name='ln')(x)
    if not self.out:
      return feats, feats
    y = feats
    if self.hidden:
      y = nn.relu(nn.Dense(self.hidden, name='hidden')(y))
    return feats, nn.Dense(self.out, name='out')(y)


class TokenEmbed(nn.Module):
  """Token embedding plus learned position embedding (`max_len` positions)."""
  vocab_size: int
  d_model: int
  max_len: int

  def setup(self):
    self.tok = nn.Embed(self.vocab_size, self.d_model,
                        embedding_init=nn.initializers.normal(0.02))
    self.pos = self.param('pos', nn.initializers.normal(0.02),
                          (self.max_len, self.d_model))

  def __call__(self, tokens):
    t = tokens.shape[1]
    if t > self.max_len:
      raise ValueError(f'sequence length {t} > max_len={self.max_len}.')
    return self.tok(tokens) + self.pos[:t]

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
  """What `Transformer` and `ViT` share: the block loop and the heads.

  Subclasses define `_embed(x, train) -> (embed module, h [B, T, d],
  key_mask [B, T] or None)`, `_out_dim`, `_pool(h, key_mask)` and
  optionally `_project` (logits from the head's output).
  """

  @property
  def layer_names(self) -> tuple[str, ...]:
    return tuple(f'block_{i}' for i in range(self.num_layers))

  @property
  def head_names(self) -> tuple[str, ...]:
    if self.per_layer_heads:
      return tuple(f'head_{i}' for i in range(self.num_layers))
    return ('head',)

  @property
  def groups(self) -> dict[str, tuple[str, ...]]:
    return {'embed': ('embed',), 'layers': self.layer_names,
            'head': self.head_names}

  causal = False

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

  def _run(self, x, train, depth, layer_gates, stop_below, features,
           layer_drop_rate=None):
    n = self.num_layers
    init = self.is_initializing()
    depth = n if depth is None else depth
    if not 1 <= depth <= n:
      raise ValueError(f'depth={depth} is not in [1, {n}].')
    if layer_gates is not None and np.shape(layer_gates) != (n,):
      raise ValueError(f'layer_gates shape {np.shape(layer_gates)} != ({n},).')
    if init:  # One tree for every call: create all blocks and heads.
      depth, layer_gates, stop_below, layer_drop_rate = n, None, None, None
    if layer_drop_rate is not None and train and np.any(
        np.asarray(layer_drop_rate) > 0):
      # Stochastic depth drawn per call (per local step) from the dropout rng.
      keep = jax.random.bernoulli(self.make_rng('dropout'),
                                  1.0 - jnp.asarray(layer_drop_rate), (n,))
      layer_gates = keep if layer_gates is None else keep & (
          jnp.asarray(layer_gates) > 0)
    embed, h, key_mask = self._embed(x, train)
    mask = self._attn_mask(key_mask, h.shape[1])
    for i in range(depth):
      if i == stop_below:
        h = jax.lax.stop_gradient(h)
      block = Block(self.num_heads, self.mlp_dim, self.dropout,
                    name=f'block_{i}')
      gate = None if layer_gates is None else layer_gates[i]
      if gate is None:
        h = block(h, mask, train)
      elif _is_static(gate):
        h = block(h, mask, train) if gate else h
      else:
        # A real skip when the gate is unbatched; a select under vmap.
        h = nn.cond(gate > 0,
                    lambda mdl, h, mask: mdl(h, mask, train),
                    lambda mdl, h, mask: h,
                    block, h, mask)
    if stop_below is not None and stop_below >= depth:
      h = jax.lax.stop_gradient(h)
    pooled = self._pool(h, key_mask)
    out_dim = self._out_dim
    if self.per_layer_heads:
      heads = [Head(out_dim, self.head_hidden, name=f'head_{i}')
               for i in range(n)]
      if init:
        for hd in heads:
          hd(pooled)
      head = heads[depth - 1]
    else:
      head = Head(out_dim, self.head_hidden, name='head')
    feats, logits = head(pooled)
    if features:
      return feats
    return self._project(feats, logits, embed, stop_below)


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
  * `features`: return the head's LayerNorm output (pooled `[B, d_model]`;
    per token `[B, T, d_model]` for the LM) instead of logits.
  * `layer_drop_rate` (`[num_layers]` probabilities, static): in training,
    block i is skipped with probability rate i, drawn afresh at every call
    from the 'dropout' rng (depth dropout per local step).
  """
  num_classes: int
  vocab_size: int = 10_000
  d_model: int = 32
  num_heads: int = 2
  mlp_dim: int = 64
  num_layers: int = 2
  max_len: int = 256
  causal: bool = False
  tied_embeddings: bool = False
  pooling: str = 'mean'
  pad_id: int = 0
  dropout: float = 0.0
  head_hidden: int = 0
  per_layer_heads: bool = False

  def __post_init__(self):
    if self.pooling not in ('mean', 'cls'):
      raise ValueError(f"pooling={self.pooling!r} is not 'mean' or 'cls'.")
    if self.causal and self.tied_embeddings and self.head_hidden:
      raise ValueError('a tied LM head has no hidden layer (head_hidden=0).')
    super().__post_init__()

  @property
  def _tied(self) -> bool:
    return self.causal and self.tied_embeddings

  @property
  def _out_dim(self) -> int:
    if self.causal:
      return 0 if self._tied else self.vocab_size
    return self.num_classes

  def _embed(self, tokens, train):
    embed = TokenEmbed(self.vocab_size, self.d_model, self.max_len,
                       name='embed')
    h = embed(tokens)
    if self.dropout:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return embed, h, tokens != self.pad_id

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
               features: bool = False, layer_drop_rate=None):
    return self._run(tokens, train, depth, layer_gates, stop_below, features,
                     layer_drop_rate)


class ViT(_LayerStack):
  """Vision Transformer: patches -> pre-LN blocks -> pooled linear/MLP head.

  Input float images `[B, H, W]` or `[B, H, W, C]` (H, W divisible by
  `patch_size`); output `[B, num_classes]`. 'cls' pooling prepends a learned
  token and reads it; 'mean' averages the patch tokens. `depth`,
  `layer_gates`, `stop_below` and `features` as in `Transformer`.
  """
  num_classes: int
  patch_size: int = 4
  d_model: int = 32
  num_heads: int = 2
  mlp_dim: int = 64
  num_layers: int = 2
  dropout: float = 0.0
  pooling: str = 'mean'
  head_hidden: int = 0
  per_layer_heads: bool = False

  def __post_init__(self):
    if self.pooling not in ('mean', 'cls'):
      raise ValueError(f"pooling={self.pooling!r} is not 'mean' or 'cls'.")
    super().__post_init__()

  @property
  def _out_dim(self) -> int:
    return self.num_classes

  def _embed(self, x, train):
    embed = PatchEmbed(self.patch_size, self.d_model, self.pooling == 'cls',
                       name='embed')
    h = embed(x)
    if self.dropout:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return embed, h, None

  def _pool(self, h, key_mask):
    del key_mask
    return h[:, 0] if self.pooling == 'cls' else h.mean(1)

  @nn.compact
  def __call__(self, x, train: bool = False, *, depth: int | None = None,
               layer_gates=None, stop_below: int | None = None,
               features: bool = False, layer_drop_rate=None):
    return self._run(x, train, depth, layer_gates, stop_below, features,
                     layer_drop_rate)
