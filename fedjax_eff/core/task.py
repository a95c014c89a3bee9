"""What the model is trained to do: per-example loss and metrics.

A task reads a batch dict (`x`, `y`, ...) and the model's output; it knows
nothing about federation or about which model produced the output.

Losses and metrics are reported as sums with their own denominators
(`units`), because the two differ for language models: the loss averages
over every real target token (pad excluded) while accuracy, as in Stack
Overflow next-word prediction (Reddi et al. 2021), also excludes eos and
out-of-vocabulary targets. Summing numerators and denominators separately
makes every mean (local step, cohort, evaluation) exact, whatever the
batching.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

Batch = Mapping[str, jax.Array]


class Task(NamedTuple):
  """inputs(batch) -> model input; loss/correct(out, batch) -> `[B]`.

  `loss` and `correct` are per-example sums over the example's units (one
  unit per example unless `units` is set). `units(batch) -> (loss_units,
  scored_units)`, each `[B]`, gives how many units each example's loss and
  correct count cover (tokens for a language model). `augment(batch, rng)
  -> batch`, if set, runs first in local training (not in evaluation).
  `loss` and `correct` find the real-example mask `[B]` in `batch['_mask']`
  during training. `init_inputs(x) -> model input` builds what the model is
  initialised on from zero inputs `x` `[1, ...]` (None: `x` itself).
  """
  inputs: Callable[[Batch], Any]
  loss: Callable[[jax.Array, Batch], jax.Array]
  correct: Callable[[jax.Array, Batch], jax.Array]
  augment: Optional[Callable[[Batch, jax.Array], Batch]] = None
  units: Optional[Callable[[Batch], tuple[jax.Array, jax.Array]]] = None
  init_inputs: Optional[Callable[[Any], Any]] = None


class Sums(NamedTuple):
  """Masked sums over a batch: numerators and their denominators."""
  loss: jax.Array
  correct: jax.Array
  loss_units: jax.Array    # what `loss` is averaged over
  scored_units: jax.Array  # what `correct` is averaged over


def batch_sums(task: Task, out: jax.Array, batch: Batch,
               mask: jax.Array) -> Sums:
  """The task's sums over the real examples (`mask` `[B]`) of a batch."""
  per = example_sums(task, out, batch, mask)
  return Sums(*(jnp.sum(per[:, i]) for i in range(4)))


def example_sums(task: Task, out: jax.Array, batch: Batch,
                 mask: jax.Array) -> jax.Array:
  """`batch_sums` before the sum over the batch: `[B, 4]` (loss, correct,
  loss units, scored units) per example, zero for padding (`mask` 0).

  Selected, not multiplied: NaN x 0 is NaN, so a padded example's values
  never reach a sum (padded inputs are zeros as well, see
  `data.ResidentData`, so their gradients are finite zeros).
  """
  batch = dict(batch, _mask=mask)
  real = mask > 0
  pick = lambda v: jnp.where(real, v, 0.0)
  if task.units is None:
    loss_units = scored_units = mask
  else:
    loss_units, scored_units = (pick(u) for u in task.units(batch))
  return jnp.stack([pick(task.loss(out, batch)),
                    pick(task.correct(out, batch)),
                    loss_units.astype(jnp.float32),
                    scored_units.astype(jnp.float32)], -1)


def argmax_hits(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """`argmax(logits, -1) == labels`, ties included: the first index that
  attains the maximum, as a max and an integer min reduction.

  XLA:CPU runs `argmax` as a variadic (value, index) reduction that it does
  not vectorize: over a [16, 20, 1,000] LM batch it took 1.07 ms, half of
  the whole local step of ragged.py's tiny Transformer, and the round's
  training accuracy made it 1.5x the centralized floor, which computes no
  metrics (benchmarks/RESULTS.md, "Lanes, built"). The max is the one the
  cross-entropy's log-sum-exp takes as well. A row with a NaN logit hits
  nothing (argmax would pick the NaN).
  """
  v = logits.shape[-1]
  top = jnp.max(logits, -1, keepdims=True)
  first = jnp.min(jnp.where(logits == top, jnp.arange(v, dtype=jnp.int32),
                            v), -1)
  return (first == labels.astype(jnp.int32)) & (first < v)


def classification() -> Task:
  """Softmax cross-entropy on integer labels `y`, accuracy as the metric."""
  def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['y'].astype(jnp.int32))

  def correct(logits, batch):
    return argmax_hits(logits, batch['y']).astype(jnp.float32)

  return Task(inputs=lambda b: b['x'], loss=loss, correct=correct)


def next_token(pad_id: int = 0, eos_id: int = 2, oov_id: int = 3) -> Task:
  """Next-token prediction: `x [B, T]` tokens, `y [B, T]` next tokens.

  The loss is cross-entropy summed over the non-pad targets (its unit is a
  real target token, so perplexity is `exp(mean loss)`); accuracy counts
  argmax hits over targets that are not pad, eos or oov (Stack Overflow's
  `accuracy_no_oov_or_eos`), so predicting the end of a sentence or the
  unknown word earns nothing.
  """
  def loss_weight(y):
    return (y != pad_id).astype(jnp.float32)

  def scored_weight(y):
    return ((y != pad_id) & (y != eos_id) & (y != oov_id)).astype(jnp.float32)

  def loss(logits, batch):
    y = batch['y'].astype(jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), y)
    return jnp.sum(ce * loss_weight(y), -1)

  def correct(logits, batch):
    y = batch['y'].astype(jnp.int32)
    hit = argmax_hits(logits, y).astype(jnp.float32)
    return jnp.sum(hit * scored_weight(y), -1)

  def units(batch):
    y = batch['y'].astype(jnp.int32)
    return jnp.sum(loss_weight(y), -1), jnp.sum(scored_weight(y), -1)

  return Task(inputs=lambda b: b['x'], loss=loss, correct=correct,
              units=units)


def ctc_greedy(logits: jax.Array, logit_paddings: jax.Array,
               blank_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """Best-path CTC decoding in fixed shapes, for use under jit.

  Per frame the argmax symbol is kept iff the frame is real, the symbol is
  not blank, and it differs from the previous frame's argmax (repeats
  collapse unless a blank separates them). Kept symbols are compacted to
  the front by a cumulative-sum scatter. Returns `(ids [B, T'], lengths
  [B])`, ids zero-filled past each length.
  """
  best = jnp.argmax(logits, -1).astype(jnp.int32)
  prev = jnp.pad(best[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  keep = (logit_paddings < 0.5) & (best != blank_id) & (best != prev)
  pos = jnp.where(keep, jnp.cumsum(keep, -1) - 1, best.shape[1])
  rows = jnp.arange(best.shape[0])[:, None]
  ids = jnp.zeros_like(best).at[rows, pos].set(best, mode='drop')
  return ids, jnp.sum(keep, -1).astype(jnp.int32)


def ctc(blank_id: int = 0) -> Task:
  """Connectionist temporal classification over character labels.

  The model reads `(x, x_len)` (log-mel frames and their real count) and
  returns `(logits [B, T', V], logit_paddings [B, T'])`, 1.0 marking padded
  frames: the encoder subsamples time, so only it knows which of its output
  frames are real. Labels are `y [B, L]` with real length `y_len`.

  The loss is `optax.ctc_loss` (the negative log-likelihood of the label
  summed over all alignments); its unit is a label character, so the mean
  loss is per character as usually reported. `correct` is exact-match
  sequence accuracy of the greedy decode (one unit per example): edit-
  distance rates (CER/WER) need a dynamic program on variable-length
  sequences and are computed on the host (`core.speech_metrics`).
  Examples with no real frame (batch padding) get loss 0. The model is
  initialised on `(x, ones [B])`.
  """
  def label_paddings(batch):
    y = batch['y']
    return (jnp.arange(y.shape[1])[None, :]
            >= batch['y_len'][:, None]).astype(jnp.float32)

  def loss(out, batch):
    logits, logit_paddings = out
    per = optax.ctc_loss(logits.astype(jnp.float32),
                         logit_paddings.astype(jnp.float32),
                         batch['y'].astype(jnp.int32), label_paddings(batch),
                         blank_id=blank_id)
    has_frames = jnp.any(logit_paddings < 0.5, -1)
    return jnp.where(has_frames, per, 0.0)

  def correct(out, batch):
    logits, logit_paddings = out
    ids, n = ctc_greedy(logits, logit_paddings, blank_id)
    y = batch['y'].astype(jnp.int32)
    width = max(ids.shape[1], y.shape[1])
    ids = jnp.pad(ids, ((0, 0), (0, width - ids.shape[1])))
    y = jnp.pad(y, ((0, 0), (0, width - y.shape[1])))
    real = jnp.arange(width)[None, :] < batch['y_len'][:, None]
    same = jnp.all(jnp.where(real, ids == y, True), -1)
    return (same & (n == batch['y_len'])).astype(jnp.float32)

  def units(batch):
    y_len = batch['y_len'].astype(jnp.float32)
    return y_len, jnp.ones_like(y_len)

  def init_inputs(x):  # every example one frame long
    return x, np.ones((x.shape[0],), np.int32)

  return Task(inputs=lambda b: (b['x'], b['x_len']), loss=loss,
              correct=correct, units=units, init_inputs=init_inputs)
