"""Linear-probe evaluation of learned representations.

The standard yardstick for self-supervised learning (SimCLR, Chen et al.
2020, sec. 4): freeze the encoder, take its representation `h` (the pooled
features *before* the projection head, which the paper shows is the better
representation), and fit a multinomial logistic regression on labelled
training features; report its test accuracy. A linear classifier can only use
what is linearly decodable, so the figure measures the features, not the
probe.

The probe problem is small and convex, so it is solved full-batch:

  min_{W, b}  mean_i CE(softmax(W^T x_i + b), y_i) + (l2 / 2) ||W||^2

on features standardised with the *training* mean and std (keeps the problem
well conditioned whatever the encoder's scale, and the test set cannot leak
into it). The solver runs as one jitted `lax.scan`: L-BFGS (optax's, with
its zoom line search) by default, which reaches the optimum of this smooth
convex problem in a few hundred steps, or Adam.

`probe_evaluation` makes the probe a contrastive task's central evaluation
(`core.evaluation.TaskEvaluation`).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_eff.core import evaluation as evaluation_lib

PyTree = Any


@functools.partial(jax.jit, static_argnames=('model', 'kwargs'))
def _apply(model, params, x, kwargs):
  return model.apply({'params': params}, x, **dict(kwargs))


def extract_features(model, params: PyTree, x, batch_size: int = 256,
                     **apply_kwargs) -> np.ndarray:
  """Frozen-encoder features `[N, d]` of inputs `x` `[N, ...]`.

  Calls `model.apply({'params': params}, x_b, **apply_kwargs)` with
  `apply_kwargs` defaulting to `train=False, features=True` (the pooled
  representation before the projection head). Every batch is padded to
  `batch_size` rows, so the jitted apply compiles once per (model, input
  shape, kwargs) and is reused across calls; the padding rows are dropped.
  """
  kwargs = {'train': False, 'features': True, **apply_kwargs}
  kwargs = tuple(sorted(kwargs.items()))
  x = np.asarray(x)
  n = x.shape[0]
  batch_size = min(batch_size, max(n, 1))
  outs = []
  for start in range(0, n, batch_size):
    xb = x[start:start + batch_size]
    real = xb.shape[0]
    if real < batch_size:
      xb = np.concatenate(
          [xb, np.zeros((batch_size - real,) + xb.shape[1:], xb.dtype)], 0)
    out = _apply(model, params, jnp.asarray(xb), kwargs)
    outs.append(np.asarray(out)[:real])
  return np.concatenate(outs, 0).reshape(n, -1)


@functools.partial(jax.jit, static_argnames=('num_classes', 'steps',
                                              'optimizer'))
def _fit(x, y, num_classes, steps, learning_rate, l2, optimizer):
  """(W `[d, K]`, b `[K]`) minimising mean CE + l2/2 ||W||^2, from zero."""
  d = x.shape[1]
  params = (jnp.zeros((d, num_classes), jnp.float32),
            jnp.zeros((num_classes,), jnp.float32))

  def objective(p):
    w, b = p
    ce = optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y)
    return jnp.mean(ce) + 0.5 * l2 * jnp.sum(w * w)

  if optimizer == 'lbfgs':
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)
  elif optimizer == 'adam':
    opt = optax.adam(learning_rate)
    value_and_grad = lambda p, state: jax.value_and_grad(objective)(p)
  else:
    raise ValueError(f'optimizer must be lbfgs or adam, got {optimizer!r}')

  def step(carry, _):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, new_state = opt.update(grad, state, p, value=value, grad=grad,
                                    value_fn=objective)
    new_p = optax.apply_updates(p, updates)
    # Once converged, L-BFGS's curvature pairs can degenerate (s^T y ~ 0);
    # keep the last finite iterate rather than let a NaN through.
    ok = jnp.all(jnp.array([jnp.all(jnp.isfinite(t))
                            for t in jax.tree.leaves(new_p)]))
    p, state = jax.tree.map(lambda a, b: jnp.where(ok, a, b),
                            (new_p, new_state), (p, state))
    return (p, state), value

  (params, _), values = jax.lax.scan(step, (params, opt.init(params)), None,
                                     length=steps)
  return params, values


def linear_probe(train_feats, train_labels, test_feats, test_labels,
                 num_classes: int, *, steps: int = 500,
                 learning_rate: float = 0.01, l2: float = 1e-4,
                 optimizer: str = 'lbfgs') -> dict:
  """Fit a multinomial logistic regression on frozen features; accuracies.

  Args:
    train_feats, test_feats: `[N, ...]` features (flattened to `[N, d]`).
    train_labels, test_labels: `[N]` ints in `[0, num_classes)`.
    num_classes: K.
    steps: optimizer steps (full batch).
    learning_rate: Adam's step size; L-BFGS picks its own by line search.
    l2: weight decay on W (not b), in units of the mean CE.
    optimizer: 'lbfgs' (default) or 'adam'.

  Returns:
    dict(train_accuracy, test_accuracy, final_loss) as Python floats.
  """
  xtr = np.asarray(train_feats, np.float32).reshape(len(train_feats), -1)
  xte = np.asarray(test_feats, np.float32).reshape(len(test_feats), -1)
  mean = xtr.mean(0)
  std = xtr.std(0)
  std = np.where(std > 1e-6, std, 1.0)  # constant features stay 0, not inf
  xtr = (xtr - mean) / std
  xte = (xte - mean) / std
  ytr = np.asarray(train_labels, np.int32)
  yte = np.asarray(test_labels, np.int32)
  (w, b), values = _fit(jnp.asarray(xtr), jnp.asarray(ytr), num_classes,
                        steps, learning_rate, l2, optimizer)
  w, b = np.asarray(w), np.asarray(b)

  def accuracy(x, y):
    return float(np.mean(np.argmax(x @ w + b, -1) == y)) if len(y) else 0.0

  return dict(train_accuracy=accuracy(xtr, ytr),
              test_accuracy=accuracy(xte, yte),
              final_loss=float(values[-1]))


def _xy(data):
  if isinstance(data, Mapping):
    return data['x'], data['y']
  x, y = data
  return x, y


def probe_accuracy(model, params: PyTree, train_xy, test_xy,
                   num_classes: int, *, batch_size: int = 256,
                   steps: int = 500, learning_rate: float = 0.01,
                   l2: float = 1e-4, optimizer: str = 'lbfgs',
                   **apply_kwargs) -> dict:
  """`extract_features` on both splits, then `linear_probe`.

  `train_xy`, `test_xy`: `(x, y)` pairs or dicts with 'x' and 'y'.
  `apply_kwargs` go to `model.apply` (default `train=False, features=True`).
  """
  (xtr, ytr), (xte, yte) = _xy(train_xy), _xy(test_xy)
  ftr = extract_features(model, params, xtr, batch_size, **apply_kwargs)
  fte = extract_features(model, params, xte, batch_size, **apply_kwargs)
  return linear_probe(ftr, ytr, fte, yte, num_classes, steps=steps,
                      learning_rate=learning_rate, l2=l2, optimizer=optimizer)


def _take(arrays, n: int):
  return {k: v[:n] for k, v in arrays.items()}


def probe_evaluation(model, task, batch_size: int = 256, steps: int = 300,
                     max_examples: int = 5000
                     ) -> 'evaluation_lib.TaskEvaluation':
  """The evaluation of a self-supervised task: a linear probe.

  `central(params, data, **forward)`: `probe_accuracy` with the features of
  the program evaluated, fit on the first `max_examples` of the labelled
  training clients' examples (pooled) and scored on each evaluation split
  (`<split>_accuracy`, plus `probe_train_accuracy`). `stop_below` (where a
  stage stops gradients) is reset to None: it only matters in training.
  Data with several tasks is probed as a whole. `splits` stay the task's own loss and
  accuracy (e.g. NT-Xent and contrastive top-1) per split.
  """
  base = evaluation_lib.standard_evaluation(model, task, batch_size)

  def central(params, data, **forward):
    forward = dict(forward, stop_below=None)
    train = _take(data.train.concatenated(), max_examples)
    out = {}
    for split, arrays in evaluation_lib.eval_splits(data):
      m = probe_accuracy(model, params, train, _take(arrays, max_examples),
                         data.num_classes, steps=steps,
                         batch_size=batch_size, **forward)
      out[f'{split}_accuracy'] = m['test_accuracy']
      out['probe_train_accuracy'] = m['train_accuracy']
    return out

  return base._replace(central=central, per_task=False)
