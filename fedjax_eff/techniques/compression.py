"""Compressed uploads: chained codecs, with or without error feedback.

`compress(codecs)` sends the client's delta through a chain of codecs
(`core/codecs.py`: top-k, quantization, in any order); bits are counted on
the final message. With `error_feedback=True` each client keeps what its
messages failed to carry and adds it to its next update (Seide et al.
2014; Stich et al. 2018, "Sparsified SGD with memory"; Karimireddy et al.
2019, "Error feedback fixes SignSGD"):

  e_t     = Δ_t + r_t                 what the client means to send
  msg_t   = C(e_t)                    what it sends
  r_{t+1} = e_t - D(msg_t)            what the server did not receive

`r` is the client's persistent state (zeros at first), one tree shaped like
the model it trains, kept in the round's client-state store (population x
model size; see `core.round.build_round`'s `population`). A client that is
not sampled keeps its residual until it is. The residual covers every
entry the client trains; with a trainable mask that changes per round an
entry's residual is sent (and counted only if trained) when it is next
trained.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from fedjax_eff.core import codecs as codecs_lib
from fedjax_eff.core.technique import Technique, TechniqueState


def _add_residual(msg, residual):
  """Adds `residual` to the values of every sent `Wire` of a wire tree."""
  return jax.tree.map(
      lambda w, r: w.replace(values=w.values + r.astype(w.values.dtype))
      if w.sent else w, msg, residual,
      is_leaf=lambda x: isinstance(x, codecs_lib.Wire))


def compress(codecs: Sequence[codecs_lib.Codec],
             error_feedback: bool = False) -> Technique:
  """The upload through `codecs` in order (decoded in reverse)."""
  codec = codecs_lib.chain_codecs(*codecs)
  name = codec.name + ('+ef' if error_feedback else '')
  decode = lambda msg, plan: codec.decode(msg)
  if not error_feedback:
    return Technique(name=name, encode=lambda msg, plan, rng: codec.encode(
        msg, rng), decode=decode)

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return TechniqueState(server=(), client=zeros, feedback=())

  def plan(rng, round_num, ctx):
    del rng, round_num
    return ctx['client_state']  # r_t

  def encode(msg, residual, rng):
    return codec.encode(_add_residual(msg, residual), rng)

  def finish(delta, sent, residual, steps):
    del steps
    new = jax.tree.map(lambda d, r, s: (d + r.astype(d.dtype)) - s, delta,
                       residual, sent)
    return new, ()

  return Technique(name=name, plan=plan, encode=encode, decode=decode,
                   init=init, finish=finish)


def topk(fraction: float | None = None, k: int | None = None,
         error_feedback: bool = False) -> Technique:
  """Top-k sparsification of the upload (values and indices)."""
  return compress([codecs_lib.topk_codec(fraction, k)], error_feedback)


CODECS = {
    'topk': codecs_lib.topk_codec,
    'quantize': codecs_lib.quantize_codec,
}


def codec_from_config(entry) -> codecs_lib.Codec:
  """`{'name': 'topk', 'fraction': 0.01}` -> a codec."""
  entry = dict(entry)
  name = entry.pop('name', None)
  if name not in CODECS:
    raise ValueError(f'codec name={name!r} is not one of {sorted(CODECS)}.')
  return CODECS[name](**entry)


__all__ = ['CODECS', 'codec_from_config', 'compress', 'topk']
