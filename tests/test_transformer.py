"""Transformer and ViT: parameter tree, depth, gates, stop-gradient, masks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_eff.models import get_model
from fedjax_eff.models.transformer import (Block, Head, PatchEmbed, ViT,
                                           Transformer, transformer_preset,
                                           vit_preset)

L = 3
# Tiny programs: LLVM optimisation would cost more compile time than it saves.
_jit_fast = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})
TOK = jax.random.randint(jax.random.key(0), (4, 6), 1, 40).at[1, 4:].set(0)
IMG = jax.random.normal(jax.random.key(1), (4, 8, 8))


def _params(m, x, seed=0):
  """Random parameters in `m.init`'s tree, without compiling `m.init`.

  Compiling the initializers (truncated normals) of even a tiny Transformer
  takes seconds on XLA:CPU; `eval_shape` still traces all of `init`.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(m.init, jax.random.key(0), x)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype), shapes)


def _text(**kw):
  kw = dict(num_classes=5, vocab_size=40, max_len=8, num_layers=L, **kw)
  m = Transformer(**kw)
  return m, _params(m, TOK)


def _vit(**kw):
  m = ViT(**{'num_classes': 5, 'num_layers': L, **kw})
  return m, _params(m, IMG)


def _jit(m, **static):
  """`m.apply(params, x, layer_gates=gates, **static)`, jitted."""
  return _jit_fast(lambda p, x, gates=None: m.apply(
      p, x, **{'layer_gates': gates, **static}))


def _perturb(params, name):
  p = dict(params['params'])
  p[name] = jax.tree.map(lambda a: a + 1.0, p[name])
  return {'params': p}


def _close(a, b, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol)


def test_param_tree_names_and_groups():
  blocks = [f'block_{i}' for i in range(L)]
  m, p = _text()
  assert set(p['params']) == {'embed', *blocks, 'head'}
  assert m.layer_names == tuple(blocks) and m.head_names == ('head',)
  assert m.groups == {'embed': ('embed',), 'layers': tuple(blocks),
                      'head': ('head',)}
  m, p = _vit(pooling='cls', per_layer_heads=True)
  heads = [f'head_{i}' for i in range(L)]
  assert set(p['params']) == {'embed', *blocks, *heads}
  assert set(p['params']['embed']) == {'patch', 'pos', 'cls'}
  assert m.head_names == tuple(heads) and m.groups['head'] == tuple(heads)
  # Init creates every block and head whatever depth/gates/stop_below say.
  shapes = jax.eval_shape(lambda: m.init(
      jax.random.key(3), IMG, depth=1, layer_gates=jnp.zeros(L),
      stop_below=1))
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, p)
  assert jax.eval_shape(m.apply, p, IMG).shape == (4, 5)
  assert jax.eval_shape(lambda: m.apply(p, IMG, features=True)).shape == (
      4, 32)


@pytest.mark.parametrize('make', [_text, _vit])
def test_depth_ignores_blocks_above(make):
  m, p = make(per_layer_heads=make is _vit)
  x = TOK if make is _text else IMG
  gated = _jit(m)
  for k in (1, 2):
    f = _jit(m, depth=k)
    out = f(p, x)
    for j in range(k, L):
      _close(f(_perturb(p, f'block_{j}'), x), out)
    assert not np.allclose(f(_perturb(p, f'block_{k - 1}'), x), out)
    if make is _vit:  # depth=k reads head_{k-1} and no other head.
      for j in range(L):
        same = np.allclose(f(_perturb(p, f'head_{j}'), x), out)
        assert same == (j != k - 1)
    else:  # Same as gating off the blocks above.
      _close(gated(p, x, jnp.arange(L) < k), out)


def _manual_vit(m, p, x, gates):
  """Re-implementation from the parts: `where(gate, block(h), h)`."""
  p = p['params']
  h = PatchEmbed(m.patch_size, m.d_model).apply({'params': p['embed']}, x)
  for i in range(L):
    y = Block(m.num_heads, m.mlp_dim).apply({'params': p[f'block_{i}']}, h)
    h = jnp.where(gates[i], y, h)
  return Head(m.num_classes).apply({'params': p['head']}, h.mean(1))[1]


def test_gates():
  m, p = _vit()
  f = _jit(m)
  _close(f(p, IMG, jnp.ones(L)), f(p, IMG))  # float gates
  manual = _jit_fast(_manual_vit, static_argnums=0)
  for i in range(L):
    g = np.arange(L) != i
    want = manual(m, p, IMG, g)
    _close(f(p, IMG, jnp.asarray(g)), want)  # bool gates, traced: lax.cond
  _close(_jit(m, layer_gates=g)(p, IMG), want)  # NumPy (skip=L-1): static
  # Text: the traced and the static paths agree, padding mask included.
  mt, pt = _text()
  g = np.array([1, 0, 1])
  _close(_jit(mt)(pt, TOK, g), _jit(mt, layer_gates=g)(pt, TOK))


def test_gates_batched_and_unbatched_under_vmap_and_scan():
  m, p = _vit(num_layers=2)
  gates = jnp.array([[1, 1], [1, 0], [0, 1], [0, 0]])
  xs = jnp.stack([IMG, IMG * 2, -IMG, IMG + 1])
  fwd = lambda p, g, x: m.apply(p, x, layer_gates=g)
  grad = jax.value_and_grad(lambda p, g, x: jnp.mean(fwd(p, g, x) ** 2))

  def scan_clients(f, p):
    """Unbatched gates: one gate row per scan step, a vmap inside."""
    def body(c, gx):
      out = jax.vmap(f, in_axes=(None, None, 0))(p, gx[0], gx[1][None])
      return c, jax.tree.map(lambda a: a[0], out)
    return jax.lax.scan(body, 0, (gates, xs))[1]

  # Batched gates under vmap: the cond becomes a select; unbatched: a cond.
  jaxpr = str(jax.make_jaxpr(jax.vmap(fwd, (None, 0, 0)))(p, gates, xs))
  assert 'cond' not in jaxpr and 'select_n' in jaxpr
  assert 'cond' in str(jax.make_jaxpr(lambda p: scan_clients(fwd, p))(p))
  batched = _jit_fast(jax.vmap(grad, in_axes=(None, 0, 0)))(p, gates, xs)
  scanned = _jit_fast(lambda p: scan_clients(grad, p))(p)
  for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(scanned)):
    _close(a, b)
  # Skipped blocks get exactly zero gradient.
  (_, gr) = scanned
  assert float(jnp.abs(gr['params']['block_0']['mlp_in']['kernel'][2]).max()
               ) == 0.0
  assert float(jnp.abs(gr['params']['block_0']['mlp_in']['kernel'][1]).max()
               ) > 0.0


def test_gates_with_dropout_train():
  m, p = _vit(dropout=0.1)
  f = _jit_fast(lambda g, r: m.apply(p, IMG, True, layer_gates=g,
                                     rngs={'dropout': r}))
  out = f(jnp.array([1, 0, 1]), jax.random.key(9))
  assert out.shape == (4, 5) and bool(jnp.isfinite(out).all())


@pytest.mark.parametrize('kind,ks', [('vit', (1,)), ('text', (0,)),
                                     ('lm_tied', (L,))])
def test_stop_below(kind, ks):
  if kind == 'vit':
    m, p = _vit()
    x = IMG
  else:  # The tied LM's output projection must not train the embedding.
    m, p = _text(causal=kind == 'lm_tied', tied_embeddings=True)
    x = TOK
  for k in ks:
    g = _jit_fast(jax.grad(
        lambda p: jnp.sum(m.apply(p, x, stop_below=k) ** 2)))(p)['params']
    norm = lambda name: float(sum(jnp.abs(a).sum()
                                  for a in jax.tree.leaves(g[name])))
    assert norm('embed') == 0.0
    for i in range(L):
      assert (norm(f'block_{i}') > 0) == (i >= k), (k, i)
    assert norm('head') > 0


def test_causal_lm():
  m, p = _text(causal=True)
  f = _jit(m)
  out = f(p, TOK)
  assert out.shape == (4, 6, 40)
  assert _jit(m, features=True)(p, TOK).shape == (4, 6, 32)
  for t in range(5):
    changed = TOK.at[:, t + 1:].set((TOK[:, t + 1:] + 7) % 39 + 1)
    out2 = f(p, changed)
    _close(out2[:, :t + 1], out[:, :t + 1])
    assert not np.allclose(out2[:, t + 1:], out[:, t + 1:])


def test_tied_embeddings():
  m, p = _text(causal=True, tied_embeddings=True)
  assert set(p['params']['head']) == {'ln'}
  emb = p['params']['embed']['tok']['embedding']
  _close(_jit(m)(p, TOK), _jit(m, features=True)(p, TOK) @ emb.T)
  untied = jax.eval_shape(m.clone(tied_embeddings=False).init,
                          jax.random.key(0), TOK)
  assert 'out' in untied['params']['head']


def test_encoder_ignores_padding_and_mlp_head():
  m, p = _text(head_hidden=16)
  assert set(p['params']['head']) == {'ln', 'hidden', 'out'}
  longer = jnp.concatenate([TOK, jnp.zeros((4, 2), TOK.dtype)], 1)
  f = _jit(m)
  _close(f(p, longer), f(p, TOK))
  assert jax.eval_shape(lambda: m.apply(p, TOK, features=True)).shape == (
      4, 32)


def test_presets_and_registry():
  def count(m, x):
    s = jax.eval_shape(m.init, jax.random.key(0), x)
    return sum(a.size for a in jax.tree.leaves(s))
  base = Transformer(num_classes=10, vocab_size=10_000,
                     **transformer_preset('base'))
  assert count(base, jnp.ones((1, 16), jnp.int32)) >= 20_000_000
  assert count(ViT(num_classes=10, **vit_preset('base')),
               jnp.ones((1, 28, 28))) >= 20_000_000
  m = get_model('vit', 62)
  assert (m.num_layers, m.d_model) == (2, 32)
  m = get_model('transformer', 3, preset='small', num_layers=3)
  assert (m.num_layers, m.d_model, m.num_classes) == (3, 256, 3)
  with pytest.raises(ValueError):
    get_model('vit', 10, preset='huge')
