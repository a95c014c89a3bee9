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

from fedjax_eff.core.task import Task, example_sums


def build_evaluator(model: nn.Module, task: Task, batch_size: int = 256,
                    max_batches_per_call: int = 16):
  """Returns `evaluate(params, arrays, segments=None, **forward)`.

  The result is `{'loss', 'accuracy', 'num_examples'}` (loss and accuracy
  averaged over the task's units: examples, or tokens for a language
  model); given `segments` (`[n]` ints in `[0, num_segments)`, e.g. each
  example's client), also `'segment_sums'`: `[num_segments, 4]` float64
  (loss, correct, loss units, scored units) per segment, from the same
  single pass. `forward` are static model kwargs (e.g. the `depth` of a
  layer-wise stage), one compile per distinct set.

  On the device: the examples go in groups of up to
  `max_batches_per_call` batches of `batch_size`, a `lax.scan` over the
  batches of a group in one call (a power of two of them, so a few
  compiles cover every dataset size), with one transfer back per group.
  Sums are float32 within a group, float64 across groups.
  """
  @functools.partial(jax.jit, static_argnames=('forward', 'num_segments'))
  def group_sums(params, batches, masks, segments, forward, num_segments):
    def body(acc, xs):
      batch, mask, seg = xs
      out = model.apply({'params': params}, task.inputs(batch), train=False,
                        **dict(forward))
      per = example_sums(task, out, batch, mask)
      return acc + jax.ops.segment_sum(per, seg, num_segments), None
    acc, _ = jax.lax.scan(body, jnp.zeros((num_segments, 4), jnp.float32),
                          (batches, masks, segments))
    return acc

  def evaluate(params, arrays: Mapping[str, np.ndarray], segments=None,
               **forward):
    forward = tuple(sorted((k, v) for k, v in forward.items()
                           if v is not None))
    n = len(next(iter(arrays.values())))
    b = batch_size
    num_batches = max(-(-n // b), 1)
    per_call = min(max_batches_per_call,
                   1 << (num_batches - 1).bit_length())
    group = per_call * b
    num_segments = 1 if segments is None else int(np.max(segments)) + 1
    seg = (np.zeros(n, np.int32) if segments is None
           else np.asarray(segments, np.int32))
    total = np.zeros((num_segments, 4))
    for start in range(0, n, group):
      stop = min(start + group, n)
      shape = (per_call, b)
      batches = {k: _pad_to(v[start:stop], group).reshape(shape + v.shape[1:])
                 for k, v in arrays.items()}
      mask = np.zeros((group,), np.float32)
      mask[:stop - start] = 1.0
      total += np.asarray(jax.device_get(group_sums(
          params, batches, mask.reshape(shape),
          _pad_to(seg[start:stop], group).reshape(shape), forward,
          num_segments)), np.float64)
    loss, correct, loss_units, scored_units = total.sum(0)
    out = {'loss': loss / max(loss_units, 1.0),
           'accuracy': correct / max(scored_units, 1.0),
           'num_examples': n}
    if segments is not None:
      out['segment_sums'] = total
    return out

  return evaluate


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
  if len(x) == size:
    return x
  return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:],
                                     x.dtype)])
