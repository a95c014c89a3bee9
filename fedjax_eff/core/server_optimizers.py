"""Server optimizers for FedOpt (Reddi et al. 2020, arXiv 2003.00295).

The server treats the weighted mean client delta `Δ = x_server - x_client`
(fedjax's sign convention: a pseudo-gradient, pointing uphill) as a gradient
and applies an optax transformation to it. With `g = Δ`:

  FedAvg      x <- x - η g                              (η = 1: plain FedAvg)
  FedAvgM     v <- β v + g;  x <- x - η v
  FedAdagrad  m <- β1 m + (1-β1) g;  v <- v + g²;
              x <- x - η m / (√v + τ)      (β1 = 0 by default: no momentum)
  FedAdam     m <- β1 m + (1-β1) g;  v <- β2 v + (1-β2) g²;
              x <- x - η m / (√v + τ)
  FedYogi     m as FedAdam;  v <- v - (1-β2) g² sign(v - g²);
              x <- x - η m / (√v + τ)

exactly as Algorithm 2 of Reddi et al.: no bias correction, `τ` (eps)
configurable, `v` starts at `initial_accumulator` (the paper asks v₋₁ ≥ τ²;
default τ²). Any other optax optimizer is available by name.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class ReddiState(NamedTuple):
  m: optax.Updates
  v: optax.Updates


def scale_by_reddi(kind: str, b1: float = 0.9, b2: float = 0.99,
                   eps: float = 1e-3,
                   initial_accumulator: float | None = None
                   ) -> optax.GradientTransformation:
  """FedAdam/FedYogi/FedAdagrad preconditioning, no bias correction.

  Returns the step direction `m / (√v + τ)`; chain it with `optax.scale(-η)`.
  """
  if kind not in ('adam', 'yogi', 'adagrad'):
    raise ValueError(f'kind must be adam, yogi or adagrad, got {kind!r}.')
  v0 = eps ** 2 if initial_accumulator is None else initial_accumulator

  def init_fn(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return ReddiState(m=zeros, v=jax.tree.map(
        lambda p: jnp.full_like(p, v0), params))

  def update_fn(g, state, params=None):
    del params
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.m, g)
    if kind == 'adagrad':
      v = jax.tree.map(lambda v, g: v + g * g, state.v, g)
    elif kind == 'adam':
      v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.v, g)
    else:
      v = jax.tree.map(
          lambda v, g: v - (1 - b2) * g * g * jnp.sign(v - g * g), state.v, g)
    direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), m, v)
    return direction, ReddiState(m=m, v=v)

  return optax.GradientTransformation(init_fn, update_fn)


def fedavg(learning_rate: float = 1.0, momentum: float = 0.0
           ) -> optax.GradientTransformation:
  """FedAvg (momentum 0) or FedAvgM: server SGD on the mean delta."""
  return optax.sgd(learning_rate, momentum=momentum or None)


def fedadam(learning_rate: float, b1: float = 0.9, b2: float = 0.99,
            eps: float = 1e-3, initial_accumulator: float | None = None):
  return optax.chain(scale_by_reddi('adam', b1, b2, eps, initial_accumulator),
                     optax.scale(-learning_rate))


def fedyogi(learning_rate: float, b1: float = 0.9, b2: float = 0.99,
            eps: float = 1e-3, initial_accumulator: float | None = None):
  return optax.chain(scale_by_reddi('yogi', b1, b2, eps, initial_accumulator),
                     optax.scale(-learning_rate))


def fedadagrad(learning_rate: float, b1: float = 0.0, eps: float = 1e-3,
               initial_accumulator: float | None = None):
  return optax.chain(
      scale_by_reddi('adagrad', b1=b1, eps=eps,
                     initial_accumulator=initial_accumulator),
      optax.scale(-learning_rate))


SERVER_OPTIMIZERS = {'fedavg': fedavg, 'fedavgm': fedavg, 'fedadam': fedadam,
                     'fedyogi': fedyogi, 'fedadagrad': fedadagrad}


def make_optimizer(name: str, learning_rate: float, **kwargs: Any
                   ) -> optax.GradientTransformation:
  """A server or client optimizer by name.

  `fedavg`, `fedavgm`, `fedadam`, `fedyogi`, `fedadagrad` are the FedOpt
  family above; any other name is looked up in optax (`sgd`, `adam`,
  `adafactor`, `lamb`, ...) and called with `learning_rate` and `kwargs`.
  """
  if name in SERVER_OPTIMIZERS:
    return SERVER_OPTIMIZERS[name](learning_rate, **kwargs)
  fn = getattr(optax, name, None)
  if fn is None or not callable(fn):
    raise ValueError(f'Unknown optimizer {name!r}: not one of '
                     f'{sorted(SERVER_OPTIMIZERS)} nor an optax alias.')
  try:
    return fn(learning_rate, **kwargs)
  except TypeError as e:
    raise ValueError(f'optax.{name} rejected arguments {kwargs}: {e}') from e
