"""Language models: the Stack Overflow LSTM and the Conformer LM.

Sizes (exact parameter counts, by `eval_shape`: nothing is allocated),
causality, the conformer's depthwise conv, the layer structure the
layer-structured techniques read, and one training step each.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_eff.models import LSTMLM, ConformerLM, get_model, lstm_lm_preset
from fedjax_eff.models.transformer import (CONFORMER_20M, DepthwiseConv1D,
                                           Transformer)
from fedjax_eff.techniques import partial, structure
from tests.helpers import adam_losses, jit_fast

pytestmark = pytest.mark.usefixtures('fast_compiles')

V, T = 37, 7
TOK = jax.random.randint(jax.random.key(0), (3, T), 1, V).at[1, 5:].set(0)


def _count(m, x=TOK) -> int:
  shapes = jax.eval_shape(m.init, jax.random.key(0), x)
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def _params(m, x=TOK, seed=0):
  """Random parameters in `m.init`'s tree without compiling `m.init`."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(m.init, jax.random.key(0), x)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype), shapes)


def _lstm(**kw):
  return LSTMLM(**{**lstm_lm_preset('tiny'), 'vocab_size': V,
                   'num_lstm_layers': 2, **kw})


def _conformer(**kw):
  return ConformerLM(**{'vocab_size': V, 'max_len': 8, 'd_model': 16,
                        'num_heads': 2, 'mlp_dim': 32, 'num_layers': 2,
                        'conv_kernel': 3, **kw})


MAKERS = {'lstm': _lstm, 'conformer': _conformer}


def test_parameter_counts():
  m = get_model('lstm_lm', 0, preset='stackoverflow')
  assert _count(m) == 4_050_748 == _count(LSTMLM())
  shapes = jax.eval_shape(m.init, jax.random.key(0), TOK)['params']
  sizes = {k: sum(int(np.prod(s.shape)) for s in jax.tree.leaves(v))
           for k, v in shapes.items()}
  assert sizes == {'embed': 960_384, 'lstm_0': 2_055_560, 'proj': 64_416,
                   'head': 970_388}
  large = _count(get_model('lstm_lm', 0, preset='large'))
  assert 19e6 <= large <= 21e6 and large == 20_051_732
  conformer = _count(ConformerLM(**CONFORMER_20M))
  assert 19e6 <= conformer <= 21e6 and conformer == 20_853_248


@pytest.mark.parametrize('kind', sorted(MAKERS))
def test_shapes_and_layer_structure(kind):
  m = MAKERS[kind]()
  p = _params(m)
  layers = (('lstm_0', 'lstm_1', 'proj') if kind == 'lstm'
            else ('block_0', 'block_1'))
  s = structure.structure_of(m)
  assert s == structure.LayerStructure(('embed',), layers, ('head',))
  assert set(p['params']) == {'embed', *layers, 'head'}
  assert jax.eval_shape(m.apply, p, TOK).shape == (3, T, V)
  if kind == 'conformer':
    assert set(p['params']['block_0']) == {'ffn_in', 'ln_attn', 'attn', 'conv',
                                           'ffn_out', 'ln_out'}
    # Without a projection the LSTM's last layer is its last LSTM.
  else:
    assert structure.structure_of(_lstm(proj_dim=0)).layers == (
        'lstm_0', 'lstm_1')


@pytest.mark.parametrize('kind', sorted(MAKERS))
def test_causal(kind):
  m = MAKERS[kind]()
  p = _params(m)
  f = jit_fast(m.apply)
  out = f(p, TOK)
  for t in (0, 3, T - 2):
    changed = TOK.at[:, t + 1:].set((TOK[:, t + 1:] + 5) % (V - 1) + 1)
    np.testing.assert_allclose(f(p, changed)[:, :t + 1], out[:, :t + 1],
                               atol=1e-5)
    assert not np.allclose(f(p, changed)[:, t + 1:], out[:, t + 1:])


def test_depthwise_conv_is_causal_and_matches_nn_conv():
  d, k = 5, 4
  x = jax.random.normal(jax.random.key(1), (2, 9, d))
  for causal, padding in ((True, ((k - 1, 0),)), (False, 'SAME')):
    conv = DepthwiseConv1D(k, causal)
    p = conv.init(jax.random.key(2), x)
    p = jax.tree.map(lambda a: a + 0.1, p)  # a nonzero bias too
    ref = nn.Conv(d, (k,), padding=padding, feature_group_count=d)
    np.testing.assert_allclose(conv.apply(p, x), ref.apply(p, x), atol=1e-5)
    if causal:
      y = conv.apply(p, x)
      y2 = conv.apply(p, x.at[:, 4:].add(1.0))
      np.testing.assert_allclose(y2[:, :4], y[:, :4], atol=1e-6)
      assert not np.allclose(y2[:, 4], y[:, 4])


def test_noncausal_conformer_ignores_padding():
  """Encoder conformer: padded positions change neither the real tokens'
  features nor the mean-pooled output (attention masks them, the conv
  sees zeros there)."""
  m = Transformer(num_classes=4, vocab_size=V, max_len=12, d_model=16,
                  num_heads=2, mlp_dim=32, num_layers=2, conv_kernel=5,
                  block_type='conformer')
  short = TOK[:, :5].at[1, 3:].set(0)
  long = jnp.pad(short, ((0, 0), (0, 4)))
  p = _params(m, long)
  np.testing.assert_allclose(m.apply(p, long), m.apply(p, short), atol=1e-5)


def _loss(m, p, x, **kw):
  logits = m.apply(p, x[:, :-1], **kw)
  y = x[:, 1:]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  w = (y != 0).astype(ce.dtype)
  return (ce * w).sum() / w.sum()


@pytest.mark.parametrize('kind', sorted(MAKERS))
def test_stop_below_and_fixed_partial_training(kind):
  """Training a fixed top half freezes the embedding and the lower layers:
  `partial_training` sets `stop_below` and masks them out."""
  m = MAKERS[kind]()
  p = _params(m)
  s = structure.structure_of(m)
  top = list(range(s.num_layers // 2, s.num_layers))
  tech = partial.partial_training(m, layers=top)
  kw = tech.forward(None)
  # A tied LM's output layer (its token embedding) trains with the head.
  tied = getattr(m, 'tied_output', None)
  assert kw == dict({'stop_below': top[0]},
                    **({'train_output': True} if tied else {}))
  mask = tech.trainable(p['params'], None)
  trained = {n for n, v in mask.items() if all(jax.tree.leaves(v))}
  assert trained == {*(s.layers[i] for i in top), 'head'}
  g = jax.grad(lambda p: _loss(m, p, TOK, **kw))(p)['params']
  norm = lambda t: sum(float(jnp.abs(a).sum()) for a in jax.tree.leaves(t))
  for name, leaves in g.items():
    if tied and name == 'embed':  # the output role only: not positions
      assert mask['embed']['tok']['embedding'] is True
      assert norm(leaves['tok']) > 0 and norm(leaves['pos']) == 0
      continue
    assert (norm(leaves) > 0) == (name in trained), name


def test_conformer_gates_and_depth():
  m = _conformer(num_layers=3)
  p = _params(m)
  g = np.array([1, 0, 1])
  traced = jit_fast(lambda p, g: m.apply(p, TOK, layer_gates=g))
  static = m.apply(p, TOK, layer_gates=g)
  np.testing.assert_allclose(traced(p, jnp.asarray(g)), static, atol=1e-5)
  assert not np.allclose(static, m.apply(p, TOK))
  shallow = m.apply(p, TOK, depth=1)
  np.testing.assert_allclose(
      shallow, m.apply(p, TOK, layer_gates=np.array([1, 0, 0])), atol=1e-5)


def test_conformer_peft_modules():
  """LoRA on attention and feed-forward kernels and adapters after the
  attention and both feed-forwards; fresh modules (zero `b`, zero `up`)
  leave the function unchanged."""
  m = _conformer(lora_rank=2, lora_targets='attn/(query|value)|mlp_in',
                 adapter_dim=4, adapter_sites='attn,mlp')
  p = _params(m)
  b0 = p['params']['block_0']
  assert {'lora_query_t0', 'lora_value_t0'} <= set(b0['attn'])
  assert 'adapter_attn_t0' in b0
  for ffn in ('ffn_in', 'ffn_out'):
    assert {'lora_mlp_in_t0', 'adapter_mlp_t0'} <= set(b0[ffn])
  zero = lambda path, a: (jnp.zeros_like(a) if structure.path_name(path)
                          .split('/')[-2:] in (['up', 'kernel'], ['up', 'bias'])
                          or structure.path_name(path).endswith('/b') else a)
  p = jax.tree_util.tree_map_with_path(zero, p)
  peft_free = lambda tree: {k: peft_free(v) for k, v in tree.items()
                            if not k.startswith(('lora_', 'adapter_'))} \
      if isinstance(tree, dict) else tree
  base = _conformer()
  np.testing.assert_allclose(m.apply(p, TOK), base.apply(peft_free(p), TOK),
                             atol=1e-5)


def test_validation():
  with pytest.raises(ValueError, match='block_type'):
    _conformer(block_type='lstm')
  with pytest.raises(ValueError, match='pre-LN'):
    _conformer(norm_position='post')
  with pytest.raises(ValueError, match='preset'):
    lstm_lm_preset('huge')


@pytest.mark.parametrize('kind', sorted(MAKERS))
def test_training_step_lowers_loss(kind):
  m = MAKERS[kind](dropout=0.1)
  p = _params(m, seed=1)
  x = jnp.tile(jnp.arange(1, 9, dtype=jnp.int32), (4, 1))
  losses = adam_losses(
      lambda p, rng: _loss(m, p, x, train=True, rngs={'dropout': rng}), p,
      0.03, 10)
  assert losses[-1] < 0.7 * losses[0], losses
