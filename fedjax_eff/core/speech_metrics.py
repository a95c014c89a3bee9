"""Host-side CTC decoding and the error rates speech recognition reports.

Character and word error rates (CER, WER) are edit distances summed over a
set and divided by the reference length, which needs variable-length
sequences and a dynamic program: work for the host after evaluation, not
for the jitted round (where `task.ctc` reports exact-match sequence
accuracy instead).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def greedy_decode(logits, paddings, blank_id: int = 0) -> list[list[int]]:
  """Best-path CTC decoding: argmax per frame over the real frames
  (`paddings` 1.0 = padded), repeats collapsed, blanks dropped."""
  best = np.argmax(np.asarray(logits), -1)
  real = np.asarray(paddings) < 0.5
  out = []
  for b in range(best.shape[0]):
    path = best[b][real[b]]
    keep = np.ones(len(path), bool)
    keep[1:] = path[1:] != path[:-1]
    out.append([int(t) for t in path[keep] if t != blank_id])
  return out


def edit_distance(a: Sequence, b: Sequence) -> int:
  """Levenshtein distance (unit insert, delete, substitute) between two
  sequences of comparable items; one DP row at a time."""
  a, b = list(a), list(b)
  prev = np.arange(len(b) + 1)
  for i, x in enumerate(a, 1):
    cur = np.empty_like(prev)
    cur[0] = i
    sub = prev[:-1] + np.array([x != y for y in b], np.int64)
    cur[1:] = np.minimum(sub, prev[1:] + 1)
    # Insertions chain left to right within the row.
    for j in range(1, len(b) + 1):
      cur[j] = min(cur[j], cur[j - 1] + 1)
    prev = cur
  return int(prev[-1])


def error_rates(hyps: Sequence[str], refs: Sequence[str]) -> dict:
  """Corpus CER and WER: total edits over total reference characters
  (words split on spaces). Empty references count nothing but their
  hypothesis' insertions still count; a set with no reference characters
  (words) has rate nan."""
  if len(hyps) != len(refs):
    raise ValueError(f'{len(hyps)} hypotheses for {len(refs)} references.')
  ce = sum(edit_distance(h, r) for h, r in zip(hyps, refs))
  cn = sum(len(r) for r in refs)
  we = sum(edit_distance(h.split(), r.split()) for h, r in zip(hyps, refs))
  wn = sum(len(r.split()) for r in refs)
  return dict(cer=ce / cn if cn else float('nan'),
              wer=we / wn if wn else float('nan'),
              char_edits=ce, chars=cn, word_edits=we, words=wn)


def build_error_rate_evaluator(model, to_text, batch_size: int = 64,
                               blank_id: int = 0):
  """`evaluate(params, arrays, **forward) -> {'cer', 'wer'}` over a dict of
  speech arrays (`x`, `x_len`, `y`, `y_len`): the model's greedy decodes
  against the labels, both turned into text by `to_text(ids)`.

  Batches have one fixed shape (the last padded and cut), so the jitted
  forward compiles once per `forward`.
  """
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  @functools.partial(jax.jit, static_argnames=('forward',))
  def outputs(params, x, x_len, forward):
    return model.apply({'params': params}, (x, x_len), train=False,
                       **dict(forward))

  def evaluate(params, arrays, **forward):
    forward = tuple(sorted((k, v) for k, v in forward.items()
                           if v is not None))
    n = len(arrays['y'])
    hyps, refs = [], []
    for start in range(0, n, batch_size):
      stop = min(start + batch_size, n)
      pad = batch_size - (stop - start)
      x, x_len = (np.concatenate([arrays[k][start:stop], np.zeros(
          (pad,) + arrays[k].shape[1:], arrays[k].dtype)])
                  for k in ('x', 'x_len'))
      logits, paddings = outputs(params, x, x_len, forward)
      decoded = greedy_decode(logits, paddings, blank_id)[:stop - start]
      hyps += [to_text(ids) for ids in decoded]
      refs += [to_text(y[:int(m)]) for y, m in zip(arrays['y'][start:stop],
                                                   arrays['y_len'][start:stop])]
    rates = error_rates(hyps, refs)
    return {'cer': rates['cer'], 'wer': rates['wer']}

  return evaluate
