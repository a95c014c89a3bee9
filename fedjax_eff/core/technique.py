"""Techniques as values: the hooks a round calls, and their composition.

A technique is an immutable bundle of pure functions, in the spirit of
`optax.GradientTransformation`. The round builder (`core/round.py`) calls the
hooks of one composed technique and never asks which techniques are on, so
adding a technique never touches the round builder.

Per client, inside the vmapped program, a round calls:

  plan      = plan(rng, round, ctx)              per-client choices (arrays)
  view      = view(server_params, plan)          the model the device trains
  mask      = trainable(view, plan)              1 = trained and uploaded
  kwargs    = forward(plan)                      extra model-apply kwargs
  ... local training on `view`, gradients and updates times `mask` ...
  msg, bits = encode(delta, mask, plan, rng)     what travels up, exact bits
  delta     = decode(msg, plan)                  the server's reading of it
  full, cov = merge(server_params, delta, mask, plan)
                                                 scatter back to server shape;
                                                 cov = per-parameter coverage
  down_bits = download(view, plan)               what travels down

`full` and `cov` are weighted and summed over clients; the server divides
each parameter by the weight of the clients that trained it (`cov`), and a
parameter nobody trained keeps its value.

Hooks with no opinion are left as `None`; `chain` composes techniques in
order (view/encode in order, decode/merge in reverse).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

PyTree = Any


class Technique(NamedTuple):
  """Hooks of one technique; `None` means "identity" for that hook."""
  name: str = 'identity'
  plan: Optional[Callable[..., PyTree]] = None
  view: Optional[Callable[[PyTree, PyTree], PyTree]] = None
  trainable: Optional[Callable[[PyTree, PyTree], PyTree]] = None
  forward: Optional[Callable[[PyTree], dict]] = None
  encode: Optional[Callable[..., tuple[PyTree, jax.Array]]] = None
  decode: Optional[Callable[[PyTree, PyTree], PyTree]] = None
  merge: Optional[Callable[..., tuple[PyTree, PyTree]]] = None
  download: Optional[Callable[[PyTree, PyTree], jax.Array]] = None


def tree_bits(tree: PyTree, mask: PyTree | None = None,
              bits_per_value: int = 32) -> jax.Array:
  """Bits to send the (masked) entries of `tree` at `bits_per_value` each."""
  leaves = jax.tree.leaves(tree)
  if mask is None:
    return jnp.asarray(sum(x.size for x in leaves) * bits_per_value,
                       jnp.float32)
  masks = jax.tree.leaves(mask)
  return sum(jnp.sum(jnp.broadcast_to(m, x.shape).astype(jnp.float32))
             for x, m in zip(leaves, masks)) * bits_per_value


def identity() -> Technique:
  """Full model, everything trains, fp32 up and down: plain FedAvg."""
  return Technique()


# Resolved hooks: what a `Technique` means when a hook is None.

def _plan(t, rng, round_num, ctx):
  return t.plan(rng, round_num, ctx) if t.plan else ()


def _view(t, params, plan):
  return t.view(params, plan) if t.view else params


def _trainable(t, params, plan):
  if t.trainable:
    return t.trainable(params, plan)
  return jax.tree.map(lambda _: jnp.ones((), jnp.float32), params)


def _forward(t, plan):
  return dict(t.forward(plan)) if t.forward else {}


def _encode(t, delta, mask, plan, rng):
  if t.encode:
    return t.encode(delta, mask, plan, rng)
  return delta, tree_bits(delta, mask)


def _decode(t, msg, plan):
  return t.decode(msg, plan) if t.decode else msg


def _merge(t, server_params, delta, mask, plan):
  if t.merge:
    return t.merge(server_params, delta, mask, plan)
  cov = jax.tree.map(lambda d, m: jnp.broadcast_to(m, d.shape).astype(
      d.dtype), delta, mask)
  return delta, cov


def _download(t, params, plan):
  return t.download(params, plan) if t.download else tree_bits(params)


def resolve(t: Technique) -> Technique:
  """Returns `t` with every hook filled in (identity where it was None)."""
  return Technique(
      name=t.name,
      plan=lambda rng, r, ctx: _plan(t, rng, r, ctx),
      view=lambda p, plan: _view(t, p, plan),
      trainable=lambda p, plan: _trainable(t, p, plan),
      forward=lambda plan: _forward(t, plan),
      encode=lambda d, m, plan, rng: _encode(t, d, m, plan, rng),
      decode=lambda msg, plan: _decode(t, msg, plan),
      merge=lambda sp, d, m, plan: _merge(t, sp, d, m, plan),
      download=lambda p, plan: _download(t, p, plan))


def chain(*techniques: Technique) -> Technique:
  """Composes techniques like `optax.chain`; the result is resolved.

  Plans are a tuple (one entry per technique, each drawn with its own key).
  Views apply in order; trainable masks multiply; forward kwargs merge;
  encoders apply in order (the last one's bit count is what travels) and
  decoders in reverse; merges apply in reverse, each scattering into the
  shape the previous view started from, the inner coverage serving as the
  outer merge's mask.
  """
  ts = [resolve(t) for t in techniques] or [resolve(identity())]
  if len(ts) == 1:
    return ts[0]

  def plan(rng, round_num, ctx):
    keys = jax.random.split(rng, len(ts))
    return tuple(t.plan(k, round_num, ctx) for t, k in zip(ts, keys))

  def views(params, plans):
    out = [params]
    for t, p in zip(ts, plans):
      out.append(t.view(out[-1], p))
    return out

  def view(params, plans):
    return views(params, plans)[-1]

  def trainable(params, plans):
    mask = None
    for t, p in zip(ts, plans):
      m = t.trainable(params, p)
      mask = m if mask is None else jax.tree.map(jnp.multiply, mask, m)
    return mask

  def forward(plans):
    kwargs = {}
    for t, p in zip(ts, plans):
      kwargs.update(t.forward(p))
    return kwargs

  def encode(delta, mask, plans, rng):
    keys = jax.random.split(rng, len(ts))
    bits = None
    for t, p, k in zip(ts, plans, keys):
      delta, bits = t.encode(delta, mask, p, k)
    return delta, bits

  def decode(msg, plans):
    for t, p in zip(reversed(ts), reversed(plans)):
      msg = t.decode(msg, p)
    return msg

  def merge(server_params, delta, mask, plans):
    # Each level's coverage is the next (outer) level's mask.
    vs = views(server_params, plans)
    cov = mask
    for i in reversed(range(len(ts))):
      delta, cov = ts[i].merge(vs[i], delta, cov, plans[i])
    return delta, cov

  def download(params, plans):
    return ts[-1].download(params, plans[-1])

  return Technique('+'.join(t.name for t in ts), plan, view, trainable,
                   forward, encode, decode, merge, download)
