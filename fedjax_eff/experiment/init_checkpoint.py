"""Initial parameters from a checkpoint: `config.init_checkpoint`.

Reads what `experiment/pretrain.py` exports (`<workdir>/params`, orbax) or
a Hugging Face model directory (config.json + *.safetensors; see
`models/hf.py`) into a model's freshly initialised parameters.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from fedjax_eff.models import hf


def params_dir(workdir: str) -> str:
  """Where `pretrain` exports the final parameters of `workdir`."""
  return os.path.join(os.path.abspath(workdir), 'params')


def load_params(path: str, like: Any, skip: str = '') -> Any:
  """Parameters exported by `pretrain` (a workdir or its `params` dir),
  placed into `like` (the model's freshly initialised params): every saved
  leaf must exist in the model with the same shape (else a ValueError
  naming it), and leaves the checkpoint lacks (PEFT modules, per-task heads)
  keep their initial values. Saved leaves whose path matches the regex
  `skip` are not loaded (`config.init_checkpoint_skip`, e.g. '^head').

  `path` may also be a Hugging Face model directory (config.json +
  *.safetensors, BERT or ViT; see `models/hf.py`): its weights replace
  `like`'s leaves of the same name, and leaves it lacks (e.g. a fresh
  classification head) keep their initial values. The model config must
  match the checkpoint (`hf.bert_model_kwargs` / `hf.vit_model_kwargs`);
  a leaf of another shape, or one the model lacks, is a ValueError naming
  it.
  """
  path = os.path.abspath(path)
  if hf.is_hf_dir(path):
    where = f'config.init_checkpoint={path!r}'
    try:
      loaded = hf.load_hf(path)
    except (OSError, ValueError) as e:
      raise ValueError(f'{where}: {e}') from None
    return jax.tree.map(jnp.asarray, hf.fill_params(_drop(loaded, skip),
                                                    like, where))
  if (os.path.isfile(os.path.join(path, 'config.json'))
      and not os.path.isdir(params_dir(path))):  # a pretrain workdir has both
    raise ValueError(f'config.init_checkpoint={path!r} has a config.json but '
                     'no *.safetensors weights (only safetensors is read; '
                     'convert pytorch_model.bin first).')
  if os.path.isdir(params_dir(path)):
    path = params_dir(path)
  if not os.path.isdir(path):
    raise ValueError(f'config.init_checkpoint={path!r} does not exist; '
                     'write it with launch/pretrain.py, or give a Hugging '
                     'Face directory (config.json + *.safetensors).')
  ckpt = ocp.StandardCheckpointer()
  # Restore the tree as it was saved (its own metadata is the target, so
  # orbax never half-reads a mismatched tree), then place it into `like`.
  meta = ckpt.metadata(path).item_metadata
  meta = getattr(meta, 'tree', meta)
  saved = ckpt.restore(path, jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta))
  where = f'config.init_checkpoint={path!r}'
  return jax.tree.map(jnp.asarray, hf.fill_params(
      _drop(saved, skip), like, where))


def _drop(tree: Any, skip: str) -> Any:
  """`tree` without the leaves whose path ('block_0/attn/...') matches the
  regex `skip` (e.g. '^head' to fine-tune with a fresh head)."""
  if not skip:
    return tree
  rx = re.compile(skip)

  def walk(node, prefix):
    out = {}
    for k, v in node.items():
      path = f'{prefix}{k}'
      if isinstance(v, Mapping):
        sub = walk(v, path + '/')
        if sub:
          out[k] = sub
      elif not rx.search(path):
        out[k] = v
    return out
  return walk(tree, '')
