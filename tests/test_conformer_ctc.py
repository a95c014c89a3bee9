"""Conformer CTC speech encoder: sizes, paddings, padding invariance, rotary
positions, layer structure, and CTC training steps."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_eff.models import ConformerCTC, ConformerLM, get_model
from fedjax_eff.models import speech, transformer
from fedjax_eff.models.speech import SubsampleConv, subsampled_length
from fedjax_eff.models.transformer import Attention, Transformer, apply_rotary
from fedjax_eff.techniques import structure
from tests.helpers import adam_losses, jit_fast

pytestmark = pytest.mark.usefixtures('fast_compiles')

B, T, F, V = 3, 37, 40, 29
X = jax.random.normal(jax.random.key(0), (B, T, F))
X_LEN = jnp.array([37, 20, 7], jnp.int32)


def _model(**kw):
  return get_model('conformer_ctc', V, **{'preset': 'tiny', **kw})


def _params(m, inputs=(X, X_LEN), seed=0):
  """Random parameters in `m.init`'s tree without compiling `m.init`."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(m.init, jax.random.key(0), inputs)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype), shapes)


def _count(m) -> int:
  shapes = jax.eval_shape(m.init, jax.random.key(0), (X, X_LEN))
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def test_parameter_counts():
  counts = {name: _count(_model(preset=name))
            for name in ('tiny', 'cpu', 'small', '10m', '30m')}
  assert counts == {'tiny': 36_725, 'cpu': 1_035_197, 'small': 8_153_165,
                    '10m': 10_096_589, '30m': 30_131_485}
  assert _count(_model(preset='medium')) == 25_561_885


@pytest.mark.parametrize('subsample', [1, 2, 4])
def test_shapes_and_paddings(subsample):
  m = _model(subsample=subsample)
  p = _params(m)
  t_out = subsampled_length(T, subsample)
  assert t_out == {1: 37, 2: 18, 4: 8}[subsample]
  logits, pad = jax.eval_shape(m.apply, p, (X, X_LEN))
  assert logits.shape == (B, t_out, V) and pad.shape == (B, t_out)
  assert pad.dtype == jnp.float32
  feats, _ = jax.eval_shape(lambda p: m.apply(p, (X, X_LEN), features=True),
                            p)
  assert feats.shape == (B, t_out, 32)
  if subsample == 4:
    _, pad = m.apply(p, (X, X_LEN))
    lengths = [8, 4, 1]  # ((n - 1) // 2 - 1) // 2
    np.testing.assert_array_equal(subsampled_length(X_LEN, 4), lengths)
    want = (np.arange(t_out)[None] >= np.array(lengths)[:, None])
    np.testing.assert_array_equal(pad, want.astype(np.float32))


def test_subsample_conv_matches_nn_conv():
  x = jax.random.normal(jax.random.key(1), (2, 11, 9, 3))
  conv = SubsampleConv(4)
  p = conv.init(jax.random.key(2), x)
  p = jax.tree.map(lambda a: a + 0.1, p)
  ref = nn.Conv(4, (3, 3), strides=(2, 2), padding='VALID')
  y = conv.apply(p, x)
  assert y.shape == (2, 5, 4, 4)
  np.testing.assert_allclose(y, ref.apply(p, x), atol=1e-5)


@pytest.mark.parametrize('position', ['rotary', 'learned'])
def test_real_frames_ignore_padding(position):
  """Garbage in the padded frames, or more padding, leaves the logits at
  real frames unchanged: the front end zeroes padding and its 'VALID'
  convs of real frames read real frames only, attention masks padded keys,
  the depthwise conv sees zeros there (kernel 5 reaches 2 frames out)."""
  m = _model(position=position, num_layers=2)
  p = _params(m, seed=1)
  f = jit_fast(lambda p, x, n: m.apply(p, (x, n)))
  logits, pad = f(p, X, X_LEN)
  real = np.asarray(pad) == 0
  frame = np.arange(T)[None, :, None] >= np.asarray(X_LEN)[:, None, None]
  noisy = jnp.where(frame, 100.0 * jax.random.normal(jax.random.key(5),
                                                     X.shape), X)
  logits2, pad2 = f(p, noisy, X_LEN)
  np.testing.assert_array_equal(pad2, pad)
  np.testing.assert_allclose(np.asarray(logits2)[real],
                             np.asarray(logits)[real], atol=1e-4)
  # ... while a real frame does matter.
  logits4, _ = f(p, X.at[:, 2].add(1.0), X_LEN)
  assert not np.allclose(np.asarray(logits4)[real], np.asarray(logits)[real],
                         atol=1e-3)
  longer = jnp.pad(X, ((0, 0), (0, 12), (0, 0)), constant_values=7.0)
  logits3, pad3 = f(p, longer, X_LEN)
  assert logits3.shape[1] == subsampled_length(T + 12)
  np.testing.assert_array_equal(pad3[:, :pad.shape[1]], pad)
  np.testing.assert_allclose(np.asarray(logits3)[:, :pad.shape[1]][real],
                             np.asarray(logits)[real], atol=1e-4)


def test_rotary_scores_depend_on_relative_position_only():
  q, k = jax.random.normal(jax.random.key(3), (2, 10, 2, 8))
  scores = lambda shift: jnp.einsum(
      'qhd,khd->hqk', apply_rotary(q, jnp.arange(10) + shift),
      apply_rotary(k, jnp.arange(10) + shift))
  base = scores(0)
  for shift in (1, 7, 1000):
    np.testing.assert_allclose(scores(shift), base, atol=1e-3, rtol=1e-4)
  assert not np.allclose(base, jnp.einsum('qhd,khd->hqk', q, k), atol=1e-2)
  # A rotation: norms are kept.
  np.testing.assert_allclose(jnp.linalg.norm(apply_rotary(q), axis=-1),
                             jnp.linalg.norm(q, axis=-1), rtol=1e-5)
  with pytest.raises(ValueError, match='even head_dim'):
    apply_rotary(jnp.zeros((1, 4, 1, 5)))


def test_rotary_off_leaves_existing_models_unchanged(monkeypatch):
  """`rotary=False` (the default) never enters the rotary code, keeps the
  parameter tree, and matches `nn.MultiHeadDotProductAttention`."""
  x = jax.random.normal(jax.random.key(4), (2, 6, 16))
  p = Attention(4).init(jax.random.key(5), x)
  ref = nn.MultiHeadDotProductAttention(4).apply(p, x, x)
  np.testing.assert_allclose(Attention(4).apply(p, x), ref, atol=1e-5)
  on = Attention(4, rotary=True)
  assert (jax.tree.map(jnp.shape, jax.eval_shape(on.init, jax.random.key(5),
                                                 x))
          == jax.tree.map(jnp.shape, p))
  assert not np.allclose(on.apply(p, x), ref, atol=1e-3)

  def boom(*a, **k):
    raise AssertionError('rotary applied with rotary=False')
  monkeypatch.setattr(transformer, 'apply_rotary', boom)
  tok = jnp.array([[1, 2, 3, 0]])
  for m in (Transformer(num_classes=3, vocab_size=5, max_len=4),
            ConformerLM(vocab_size=5, max_len=4, conv_kernel=3),
            _model(position='none')):
    inputs = (X, X_LEN) if isinstance(m, ConformerCTC) else tok
    jax.eval_shape(m.init, jax.random.key(0), inputs)
  with pytest.raises(AssertionError, match='rotary applied'):
    jax.eval_shape(_model().init, jax.random.key(0), (X, X_LEN))


def test_layer_structure():
  m = _model(num_layers=3)
  p = _params(m)['params']
  s = structure.structure_of(m)
  blocks = ('block_0', 'block_1', 'block_2')
  assert s == structure.LayerStructure(('embed',), blocks, ('head',))
  assert set(p) == {'embed', *blocks, 'head'}
  assert set(p['embed']) == {'conv_0', 'conv_1', 'out'}
  learned = _params(_model(position='learned'))['params']['embed']
  assert learned['pos'].shape == (512, 32)
  assert set(_params(_model(subsample=1))['params']['embed']) == {'out'}
  assert p['head']['out']['kernel'].shape == (32, V)
  heads = _params(_model(per_layer_heads=True))['params']
  assert {'head_0', 'head_1'} <= set(heads)


def test_validation():
  with pytest.raises(ValueError, match='subsample'):
    _model(subsample=3)
  with pytest.raises(ValueError, match='position'):
    _model(position='sinusoid')
  with pytest.raises(ValueError, match='preset'):
    speech.conformer_ctc_preset('huge')
  with pytest.raises(ValueError, match='none after'):
    jax.eval_shape(_model().init, jax.random.key(0),
                   (jnp.zeros((1, 2, F)), jnp.array([2])))


def test_depth_gates_and_stop_below():
  m = _model(num_layers=3)
  p = _params(m)
  inputs = (X, X_LEN)
  shallow, pad = m.apply(p, inputs, depth=1)
  gated, pad2 = m.apply(p, inputs, layer_gates=np.array([1, 0, 0]))
  np.testing.assert_allclose(shallow, gated, atol=1e-5)
  np.testing.assert_array_equal(pad, pad2)
  assert not np.allclose(shallow, m.apply(p, inputs)[0])

  def loss(p):
    logits, _ = m.apply(p, inputs, stop_below=2)
    return (logits ** 2).mean()
  g = jax.grad(loss)(p)['params']
  for name, leaves in g.items():
    norm = sum(float(jnp.abs(a).sum()) for a in jax.tree.leaves(leaves))
    assert (norm > 0) == (name in ('block_2', 'head')), name


def test_ctc_training_lowers_loss():
  m = _model(dropout=0.1)
  b, t = 4, 40
  x = jax.random.normal(jax.random.key(6), (b, t, F))
  x_len = jnp.array([40, 36, 30, 40], jnp.int32)
  labels = jnp.array([[3, 5, 0], [7, 0, 0], [2, 2, 9], [4, 1, 0]], jnp.int32)
  label_pad = (labels == 0).astype(jnp.float32)
  p = _params(m, (x, x_len), seed=2)
  p = jax.tree.map(lambda a: a * 0.5, p)

  def ctc(p, rng):
    logits, pad = m.apply(p, (x, x_len), train=True, rngs={'dropout': rng})
    return optax.ctc_loss(logits, pad, labels, label_pad).mean()

  losses = adam_losses(ctc, p, 1e-2, 12)
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.7 * losses[0], losses
