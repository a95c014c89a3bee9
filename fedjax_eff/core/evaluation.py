"""Central evaluation of a model on a dict of arrays, in fixed-size batches.

Every batch has the same shape `[batch_size, ...]` (the last one padded and
masked), so the jitted batch function compiles once, whatever the dataset.
"""

from __future__ import annotations

import functools
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_eff.core.task import Task, batch_sums


def build_evaluator(model: nn.Module, task: Task, batch_size: int = 256):
  """Returns `evaluate(params, arrays, **forward) -> {'loss', 'accuracy',
  'num_examples'}` (loss and accuracy averaged over the task's units:
  examples, or tokens for a language model); `forward` are static model
  kwargs (e.g. the `depth` of a layer-wise stage), one compile per distinct
  set."""

  @functools.partial(jax.jit, static_argnames=('forward',))
  def batch_sums_fn(params, batch, mask, forward):
    out = model.apply({'params': params}, task.inputs(batch), train=False,
                      **dict(forward))
    return batch_sums(task, out, batch, mask)

  def evaluate(params, arrays: Mapping[str, np.ndarray], **forward):
    forward = tuple(sorted((k, v) for k, v in forward.items()
                           if v is not None))
    n = len(next(iter(arrays.values())))
    b = batch_size
    total = np.zeros(4)
    for start in range(0, n, b):
      stop = min(start + b, n)
      batch = {k: _pad_to(v[start:stop], b) for k, v in arrays.items()}
      mask = np.zeros((b,), np.float32)
      mask[:stop - start] = 1.0
      total += np.asarray(jax.device_get(batch_sums_fn(params, batch, mask,
                                                       forward)), np.float64)
    loss, correct, loss_units, scored_units = total
    return {'loss': loss / max(loss_units, 1.0),
            'accuracy': correct / max(scored_units, 1.0),
            'num_examples': n}

  return evaluate


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
  if len(x) == size:
    return x
  return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:],
                                     x.dtype)])
