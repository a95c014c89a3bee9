"""What the model is trained to do: per-example loss and metrics.

A task reads a batch dict (`x`, `y`, ...) and the model's output; it knows
nothing about federation or about which model produced the output.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


class Task(NamedTuple):
  """inputs(batch) -> model input; loss/correct(out, batch) -> `[B]`.

  `augment(batch, rng) -> batch`, if set, runs first in local training (not
  in evaluation). `loss` and `correct` find the real-example mask `[B]` in
  `batch['_mask']` during training.
  """
  inputs: Callable[[Mapping[str, jax.Array]], Any]
  loss: Callable[[jax.Array, Mapping[str, jax.Array]], jax.Array]
  correct: Callable[[jax.Array, Mapping[str, jax.Array]], jax.Array]
  augment: Optional[Callable[[Mapping[str, jax.Array], jax.Array],
                             Mapping[str, jax.Array]]] = None


def classification() -> Task:
  """Softmax cross-entropy on integer labels `y`, accuracy as the metric."""
  def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['y'].astype(jnp.int32))

  def correct(logits, batch):
    return (jnp.argmax(logits, -1) == batch['y']).astype(jnp.float32)

  return Task(inputs=lambda b: b['x'], loss=loss, correct=correct)
