"""SimCLR's NT-Xent loss and a contrastive `Task` for the federated round.

NT-Xent (normalised temperature-scaled cross-entropy; Chen et al. 2020, eq. 1).
For a batch of B examples with two views, stack the L2-normalised projections
`z = [z1; z2]` (`[2B, D]`) and take cosine similarities `s = z z^T / tau`
(`[2B, 2B]`). Anchor `a` has one positive, `p(a) = a ± B` (the other view of
the same example), and the loss

  l(a) = -s[a, p(a)] + log sum_{k != a, k real} exp(s[a, k])

a softmax cross-entropy whose candidates are all *other* samples of both
views, the positive included. Example i's loss is the mean of its two anchors,
`(l(i) + l(i + B)) / 2`; the batch mean of that is the paper's
`1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]`.

Padding: the federated round pads every client's batch to a fixed B and marks
real rows with `mask` (`[B]`, 1 real / 0 pad). A padded row is removed from
every denominator (its column gets logit -1e9, so `exp` underflows to exactly
0) and its own loss is 0, so real examples' losses -- and gradients -- are
exactly those of the unpadded batch. (-1e9, not -inf: a padded anchor's row
may have no real candidate at all, and -inf would turn its masked-out loss
into NaN gradients through `where`.)

Note the loss of example i depends on the other examples in its batch (its
negatives); per-example losses are still `[B]` so the round can weight them
with its mask like any other task.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_eff.ssl.augment import check_knobs, simclr_augment

Batch = Mapping[str, jax.Array]
_NEG = -1e9


class ContrastiveTask(NamedTuple):
  """`core.task.Task` plus `augment(batch, rng) -> batch`, run before inputs.

  The first three fields match `Task`, so code that only knows `Task` can
  read them positionally.
  """
  inputs: Callable[[Batch], Any]
  loss: Callable[[jax.Array, Batch], jax.Array]
  correct: Callable[[jax.Array, Batch], jax.Array]
  augment: Callable[[Batch, jax.Array], Batch]


def _normalize(z: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Rows to unit L2 norm; an all-zero row (padding) stays 0, grads finite."""
  z = z.astype(jnp.float32)
  sq = jnp.sum(z * z, -1, keepdims=True)
  return z * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def pair_logits(z1: jax.Array, z2: jax.Array, mask: jax.Array | None,
                temperature: float):
  """Candidate logits of all 2B anchors.

  Args:
    z1, z2: `[B, D]` projections of the two views (row i of each = example i).
    mask: `[B]` real-example mask, or None for all real.
    temperature: tau.

  Returns:
    logits `[2B, 2B]`: `cos(z_a, z_k) / tau` where k is a candidate of a (k
      != a and k real), -1e9 elsewhere;
    positive `[2B]` int: the column of each anchor's positive, `(a + B) % 2B`;
    valid `[2B]` float: 1 for anchors of real examples.
  """
  b = z1.shape[0]
  if z2.shape != z1.shape:
    raise ValueError(f'views differ in shape: {z1.shape} vs {z2.shape}')
  if mask is None:
    mask = jnp.ones((b,), jnp.float32)
  valid = jnp.concatenate([mask, mask]).astype(jnp.float32)
  z = _normalize(jnp.concatenate([z1, z2], 0))
  sim = (z @ z.T) / temperature
  candidate = (valid[None, :] > 0) & ~jnp.eye(2 * b, dtype=bool)
  logits = jnp.where(candidate, sim, _NEG)
  positive = (jnp.arange(2 * b) + b) % (2 * b)
  return logits, positive, valid


def nt_xent(z1: jax.Array, z2: jax.Array, mask: jax.Array | None = None,
            temperature: float = 0.1) -> jax.Array:
  """Per-example NT-Xent loss `[B]`: mean of the example's two anchor losses.

  `z1`, `z2`: `[B, D]` (unnormalised; normalised here). Padded examples
  (mask 0) get loss 0 and are no one's negative. See the module docstring.
  """
  logits, positive, valid = pair_logits(z1, z2, mask, temperature)
  lse = jax.nn.logsumexp(logits, axis=-1)
  pos = jnp.take_along_axis(logits, positive[:, None], -1)[:, 0]
  per_anchor = jnp.where(valid > 0, lse - pos, 0.0)
  b = z1.shape[0]
  return 0.5 * (per_anchor[:b] + per_anchor[b:])


def contrastive_top1(z1: jax.Array, z2: jax.Array,
                     mask: jax.Array | None = None) -> jax.Array:
  """Per-example contrastive accuracy `[B]` in {0, 1/2, 1}.

  For each anchor: 1 if its positive is the most similar candidate (the
  argmax of its NT-Xent logits, i.e. the positive would be retrieved first
  among the 2B - 1 other samples); the example's value is the mean over its
  two anchors, 0 for padding. Temperature-free (argmax is scale-invariant).
  """
  logits, positive, valid = pair_logits(z1, z2, mask, 1.0)
  hit = (jnp.argmax(logits, -1) == positive).astype(jnp.float32) * valid
  b = z1.shape[0]
  return 0.5 * (hit[:b] + hit[b:])


def two_views(batch: Batch, rng: jax.Array, **augment_knobs) -> dict:
  """`batch` with `'x'` replaced by `[view1; view2]` (`[2B, ...]`).

  The views come from independent keys `split(rng)`; other keys (`'y'`,
  `'_mask'`, ...) are kept as they are, still `[B]`. The two views are one
  vmapped pipeline over the two keys (one trace, one compiled PRNG), then
  `[2, B, ...]` is flattened to `[2B, ...]`: rows `i` and `i + B` are the two
  views of example i.
  """
  x = batch['x']
  views = jax.vmap(lambda k: simclr_augment(x, k, **augment_knobs))(
      jax.random.split(rng))
  return {**batch, 'x': views.reshape((2 * x.shape[0],) + x.shape[1:])}


def _split_views(out: jax.Array, batch: Batch):
  """`[2B, D]` model output -> (z1, z2, mask) with B from the batch's mask."""
  if '_mask' in batch:
    mask = batch['_mask']
    b = mask.shape[0]
  else:
    others = [v for k, v in batch.items()
              if k != 'x' and hasattr(v, 'shape') and v.ndim >= 1]
    b = others[0].shape[0] if others else out.shape[0] // 2
    mask = None
  if out.shape[0] != 2 * b:
    raise ValueError(
        f'contrastive task: model output has {out.shape[0]} rows for a batch '
        f'of {b} examples; expected 2 x {b} (both views). Was the batch '
        'passed through task.augment before task.inputs?')
  return out[:b], out[b:], mask


def contrastive_task(temperature: float = 0.1,
                     **augment_knobs) -> ContrastiveTask:
  """SimCLR as a task: two augmented views, NT-Xent on the model's projections.

  augment(batch, rng): `two_views` with `augment_knobs` (see
    `augment.simclr_augment`); `'x'` becomes `[2B, ...]`.
  inputs(batch): `batch['x']`, so the model sees `[2B, ...]` and returns
    `[2B, D]` (its projection head output).
  loss(out, batch): `nt_xent(out[:B], out[B:], batch['_mask'], temperature)`,
    `[B]`; without `'_mask'` every row is real.
  correct(out, batch): `contrastive_top1`, `[B]`.
  Labels are never read: the task is self-supervised.
  """
  check_knobs(**augment_knobs)  # fail now, not at first trace in the round

  def augment(batch, rng):
    return two_views(batch, rng, **augment_knobs)

  def loss(out, batch):
    z1, z2, mask = _split_views(out, batch)
    return nt_xent(z1, z2, mask, temperature)

  def correct(out, batch):
    z1, z2, mask = _split_views(out, batch)
    return contrastive_top1(z1, z2, mask)

  return ContrastiveTask(inputs=lambda b: b['x'], loss=loss, correct=correct,
                         augment=augment)


def nt_xent_reference(z1, z2, mask=None, temperature: float = 0.1
                      ) -> np.ndarray:
  """Slow float64 NumPy NT-Xent, written straight from the definition.

  For the tests: explicit loops over anchors and candidates, real rows only.
  """
  z1 = np.asarray(z1, np.float64)
  z2 = np.asarray(z2, np.float64)
  b = z1.shape[0]
  mask = np.ones(b) if mask is None else np.asarray(mask, np.float64)
  z = np.concatenate([z1, z2], 0)
  z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-8)
  real = np.concatenate([mask, mask]) > 0
  per_anchor = np.zeros(2 * b)
  for a in range(2 * b):
    if not real[a]:
      continue
    p = (a + b) % (2 * b)
    denom = 0.0
    for k in range(2 * b):
      if k != a and real[k]:
        denom += np.exp(z[a] @ z[k] / temperature)
    per_anchor[a] = -np.log(np.exp(z[a] @ z[p] / temperature) / denom)
  return 0.5 * (per_anchor[:b] + per_anchor[b:])
