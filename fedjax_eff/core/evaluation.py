"""Central evaluation: a model on a dict of arrays, and a task's metrics.

`build_evaluator`: loss and accuracy in fixed-size batches. Every batch has
the same shape `[batch_size, ...]` (the last one padded and masked), so the
jitted batch function compiles once, whatever the dataset.

`TaskEvaluation`: what a task reports on a `DataBundle` (test set,
held-out clients, several tasks); `data/task_registry.py` builds one per
`config.task.name`, and the experiment only calls `metrics`.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, NamedTuple

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


# ------------------------------------------------- a task's central metrics --

Metrics = dict[str, float]


def eval_splits(data):
  """The evaluation sets of a `DataBundle`: `('test', arrays)` for the
  central test set and `('heldout', arrays)` for the held-out clients'
  examples pooled, each only if present."""
  if data.test is not None:
    yield 'test', data.test
  if data.heldout is not None and data.heldout.num_clients:
    yield 'heldout', data.heldout.concatenated()


def central_metrics(evaluate, test, heldout) -> Metrics:
  """`test_*` on the central test set, `heldout_*` on the held-out clients
  (pooled, and `heldout_client_accuracy_mean`, the mean over clients of
  each one's accuracy), each set evaluated once: one pass over the pooled
  held-out examples gives both held-out figures (per-client sums by
  segment), and a test set that *is* the held-out clients' examples (the
  stdlib corpus) is not evaluated again.

  `evaluate(arrays, segments=None)`: a `build_evaluator` function with the
  params (and forward kwargs) bound.
  """
  out: Metrics = {}
  pooled = None
  if heldout is not None and heldout.num_clients:
    pooled = heldout.concatenated()
    n = heldout.num_clients
    m = evaluate(pooled, segments=np.repeat(np.arange(n),
                                            heldout.client_sizes))
    sums = np.zeros((n, 4))
    sums[:len(m['segment_sums'])] = m['segment_sums']
    out.update(heldout_loss=m['loss'], heldout_accuracy=m['accuracy'],
               heldout_client_accuracy_mean=float(np.mean(
                   sums[:, 1] / np.maximum(sums[:, 3], 1.0))))
  if test is not None:
    if pooled is not None and _same_arrays(test, pooled):
      out.update(test_loss=out['heldout_loss'],
                 test_accuracy=out['heldout_accuracy'])
    else:
      m = evaluate(test)
      out.update(test_loss=m['loss'], test_accuracy=m['accuracy'])
  return out


def _same_arrays(a, b) -> bool:
  return a.keys() == b.keys() and all(
      np.shape(a[k]) == np.shape(b[k]) and np.array_equal(a[k], b[k])
      for k in a)


def with_perplexity(metrics: Metrics) -> Metrics:
  """`<split>_perplexity = exp(<split>_loss)` for each per-token loss."""
  return {k[:-len('loss')] + 'perplexity': float(np.exp(v))
          for k, v in metrics.items() if k.endswith('_loss')}


class TaskEvaluation(NamedTuple):
  """How a task scores a model centrally (built for one model).

  evaluate(params, arrays, segments=None, **forward): `build_evaluator`'s
    loss/accuracy over a dict of arrays.
  central(params, data, **forward) -> metrics: what the run records at
    each evaluation, on one (single-task) `DataBundle`: `test_*`,
    `heldout_*` and whatever else the task reports (perplexity, CER/WER,
    or a linear probe's accuracy).
  splits(params, data, **forward) -> metrics: `<split>_loss`,
    `<split>_accuracy` (and the task's per-split extras, e.g. `_cer`) on
    each of `eval_splits(data)`: what per-task evaluation and techniques'
    reports (`Technique.report`) read.
  per_task: data with several tasks is evaluated task by task, each with
    its task's program (`metrics`); False: `central` on all of it.
  `forward` are the static model kwargs of the program evaluated.
  """
  evaluate: Callable[..., Metrics]
  central: Callable[..., Metrics]
  splits: Callable[..., Metrics]
  per_task: bool = True


def standard_evaluation(model: nn.Module, task: Task, batch_size: int,
                        derived: Callable[[Metrics], Metrics] | None = None,
                        per_split: Callable[..., Metrics] | None = None
                        ) -> TaskEvaluation:
  """The evaluation of a supervised task: `central_metrics` of the task's
  loss and accuracy, then `derived(metrics)` (metrics computed from those,
  e.g. perplexity), then `per_split(params, arrays, **forward)` on each
  evaluation split as `<split>_<name>` (host-side metrics, e.g. CER)."""
  evaluate = build_evaluator(model, task, batch_size)

  def extras(params, data, forward):
    out = {}
    if per_split is not None:
      for split, arrays in eval_splits(data):
        for k, v in per_split(params, arrays, **forward).items():
          out[f'{split}_{k}'] = v
    return out

  def central(params, data, **forward):
    out = central_metrics(functools.partial(evaluate, params, **forward),
                          data.test, data.heldout)
    if derived is not None:
      out.update(derived(out))
    out.update(extras(params, data, forward))
    return out

  def splits(params, data, **forward):
    out = {}
    for split, arrays in eval_splits(data):
      m = evaluate(params, arrays, **forward)
      out[f'{split}_loss'] = m['loss']
      out[f'{split}_accuracy'] = m['accuracy']
    out.update(extras(params, data, forward))
    return out

  return TaskEvaluation(evaluate, central, splits)


def metrics(evaluation: TaskEvaluation, params, data,
            forward_of: Callable[[int], dict]) -> Metrics:
  """The evaluation metrics of `params` on `data`.

  `forward_of(tier) -> forward kwargs` of the program a client of that
  tier runs. One task: `evaluation.central` with tier 0's program. Several
  (`data.tasks`, where a client's tier is its task): each task's
  `evaluation.splits` with its own program and `task=t`, as
  `task<t>/<metric>`, and `<split>_accuracy`, the mean over tasks.
  """
  if not (data.tasks and evaluation.per_task):
    return evaluation.central(params, data, **forward_of(0))
  out = {}
  for t, bundle in enumerate(data.tasks):
    forward = dict(forward_of(t))
    forward.setdefault('task', t)
    for k, v in evaluation.splits(params, bundle, **forward).items():
      out[f'task{t}/{k}'] = v
  for split in ('test', 'heldout'):
    accs = [v for k, v in out.items() if k.endswith(f'/{split}_accuracy')]
    if accs:
      out[f'{split}_accuracy'] = float(np.mean(accs))
  return out
