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
  during training.
  """
  inputs: Callable[[Batch], Any]
  loss: Callable[[jax.Array, Batch], jax.Array]
  correct: Callable[[jax.Array, Batch], jax.Array]
  augment: Optional[Callable[[Batch, jax.Array], Batch]] = None
  units: Optional[Callable[[Batch], tuple[jax.Array, jax.Array]]] = None


class Sums(NamedTuple):
  """Masked sums over a batch: numerators and their denominators."""
  loss: jax.Array
  correct: jax.Array
  loss_units: jax.Array    # what `loss` is averaged over
  scored_units: jax.Array  # what `correct` is averaged over


def batch_sums(task: Task, out: jax.Array, batch: Batch,
               mask: jax.Array) -> Sums:
  """The task's sums over the real examples (`mask` `[B]`) of a batch."""
  batch = dict(batch, _mask=mask)
  if task.units is None:
    loss_units = scored_units = mask
  else:
    loss_units, scored_units = (u * mask for u in task.units(batch))
  return Sums(jnp.sum(task.loss(out, batch) * mask),
              jnp.sum(task.correct(out, batch) * mask),
              jnp.sum(loss_units), jnp.sum(scored_units))


def classification() -> Task:
  """Softmax cross-entropy on integer labels `y`, accuracy as the metric."""
  def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['y'].astype(jnp.int32))

  def correct(logits, batch):
    return (jnp.argmax(logits, -1) == batch['y']).astype(jnp.float32)

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
    hit = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return jnp.sum(hit * scored_weight(y), -1)

  def units(batch):
    y = batch['y'].astype(jnp.int32)
    return jnp.sum(loss_weight(y), -1), jnp.sum(scored_weight(y), -1)

  return Task(inputs=lambda b: b['x'], loss=loss, correct=correct,
              units=units)
