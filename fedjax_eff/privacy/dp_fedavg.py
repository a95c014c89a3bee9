"""Client-level differential privacy: DP-FedAvg and DP-FTRL as a technique.

McMahan et al. 2018, "Learning differentially private recurrent language
models" (DP-FedAvg); Andrew et al. 2021, "Differentially private learning
with adaptive clipping"; Kairouz et al. 2021, "Practical and private (deep)
learning without sampling or shuffling" (DP-FTRL); Choquette-Choo et al.
2023, "(Amplified) banded matrix factorization" (banded DP-FTRL).

One round, for the K clients aggregated (client weights must be uniform,
`client.weighting='uniform'`: each client adds at most C to the sum):

  Δ̃_i  = Δ_i · min(1, C / ‖Δ_i‖₂)        clip the whole uploaded tree
  S    = Σ_i Δ̃_i + C · z · ξ_t            ξ_t ~ N(0, I)            (gaussian)
                 + C · z · s_T · (B ζ)_t   ζ ~ N(0, I), banded B     (banded)
  Δ̄   = S / K̂                            K̂: the *expected* cohort size,
                                          a constant (K for fixed-size,
                                          q N for Poisson sampling)

then the server optimizer takes Δ̄ as its pseudo-gradient. ‖Δ_i‖ is the L2
norm over every value the client uploads, read after every codec's decode
(the server's reading of the message: clipping sits at the end of the
decode chain, so the bound holds on exactly what is summed, whatever the
codecs before it did). This is central DP: the server is trusted to clip
and noise (with secure aggregation, clipping and noise move to the device:
`privacy/secagg.py`).

Noise comes from jax-privacy's privatizers (`noise_addition`), optax
transformations whose state (the key and, for banded DP-FTRL, the buffer of
past noise) is this technique's server state, so it is checkpointed and a
resumed run draws the same noise. With `mechanism='banded'` the noise is
correlated across rounds by the inverse of jax-privacy's
`ColumnNormalizedBanded.default(num_rounds, bands)` strategy; `s_T`, its
sensitivity under the run's participation pattern
(`privacy.accounting.banded_sensitivity`), is passed in as `sensitivity`.

Adaptive clipping (Andrew et al. 2021, Alg. 1): each client also reports
b_i = 1[‖Δ_i‖ ≤ C] - 1/2 (as feedback, the norm of its update before
codecs; centred, so one client moves the count by at most 1/2), the server
noises the count, b̄ = (Σ b_i + N(0, σ_b²)) / K̂ + 1/2, and moves the clip
geometrically towards the target quantile γ:

  C ← C · exp(-η (b̄ - γ))

The count is a second Gaussian release, of sensitivity 1/2;
`privacy.accounting` composes the two (Andrew et al., Thm. 1:
z = (z_Δ⁻² + (2 σ_b)⁻²)^(-1/2)).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax_privacy import noise_addition
from jax_privacy.matrix_factorization import banded

from fedjax_eff.core import codecs
from fedjax_eff.core.technique import Technique, TechniqueState

PyTree = Any

MECHANISMS = ('gaussian', 'banded')


class DPState(NamedTuple):
  """The server state of DP-FedAvg / DP-FTRL."""
  clip: jax.Array         # float32 scalar: C this round
  noise: PyTree           # the update privatizer's state (jax-privacy)
  count_noise: PyTree     # the clipped-count privatizer's state ( () fixed C)


def _sent_wires(msg):
  return [w for w in jax.tree.leaves(
      msg, is_leaf=lambda x: isinstance(x, codecs.Wire))
          if isinstance(w, codecs.Wire) and w.sent]


def global_norm(msg) -> jax.Array:
  """‖x‖₂ over every sent value of a dense wire tree."""
  wires = _sent_wires(msg)
  if not wires:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(w.values.astype(jnp.float32)))
                      for w in wires))


def clip_wires(msg, clip: jax.Array):
  """Scales every sent value of `msg` by min(1, C / ‖msg‖₂)."""
  for node in jax.tree.leaves(msg, is_leaf=codecs.is_node):
    if isinstance(node, codecs.Wire) or not codecs.is_node(node):
      continue
    raise ValueError(
        'DP clipping reads the decoded upload; it must come first in the '
        f'technique chain (got a {type(node).__name__} node).')
  norm = global_norm(msg)
  factor = jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-30))
  return jax.tree.map(
      lambda w: w.replace(values=(w.values * factor).astype(w.values.dtype))
      if w.sent else w, msg, is_leaf=lambda x: isinstance(x, codecs.Wire))


def dp_fedavg(clip_norm: float, noise_multiplier: float,
              expected_clients: float, *, target_quantile: float = 0.0,
              clip_learning_rate: float = 0.2,
              count_noise_multiplier: float = 0.0,
              mechanism: str = 'gaussian', num_rounds: int = 0,
              bands: int = 1, sensitivity: float = 1.0,
              seed: int = 0) -> Technique:
  """Client-level DP on the round's sum.

  Args:
    clip_norm: C (the initial C with adaptive clipping), > 0.
    noise_multiplier: z, the noise std on the sum in units of C (the
      update's own z with adaptive clipping: `accounting
      .update_noise_multiplier` splits a total), >= 0.
    expected_clients: K̂, the fixed denominator.
    target_quantile: γ in (0, 1) for adaptive clipping; 0 = a fixed C.
    clip_learning_rate: η (Andrew et al. use 0.2).
    count_noise_multiplier: σ_b, the std of the noise on the clipped
      count (Andrew et al. suggest K̂ / 20).
    mechanism: 'gaussian' (independent noise per round: DP-FedAvg) or
      'banded' (DP-FTRL: noise correlated by a `bands`-banded matrix
      factorisation over `num_rounds` rounds, std z · C · sensitivity).
    seed: the noise's seed (the run's).
  """
  if mechanism not in MECHANISMS:
    raise ValueError(f'mechanism={mechanism!r} is not one of {MECHANISMS}.')
  if not clip_norm > 0:
    raise ValueError(f'clip_norm must be > 0, got {clip_norm!r}.')
  if not noise_multiplier >= 0:
    raise ValueError(f'noise_multiplier must be >= 0, got '
                     f'{noise_multiplier!r}.')
  if not expected_clients > 0:
    raise ValueError(f'expected_clients must be > 0, got '
                     f'{expected_clients!r}.')
  adaptive = target_quantile > 0
  if adaptive and not target_quantile < 1:
    raise ValueError(f'target_quantile must be in (0, 1) (0: a fixed clip), '
                     f'got {target_quantile!r}.')
  key = jax.random.PRNGKey(seed)  # raw uint32: checkpointed as it is
  update_key, count_key = jax.random.split(jax.random.fold_in(key, 0xD9))
  if mechanism == 'banded':
    if num_rounds < 1 or not 1 <= bands <= num_rounds:
      raise ValueError(f'banded DP-FTRL needs num_rounds >= 1 and 1 <= '
                       f'bands <= num_rounds, got {num_rounds}, {bands}.')
    matrix = banded.ColumnNormalizedBanded.default(num_rounds, bands)
    privatizer = noise_addition.matrix_factorization_privatizer(
        matrix.inverse_as_streaming_matrix(),
        stddev=noise_multiplier * sensitivity, prng_key=update_key)
  else:
    privatizer = noise_addition.gaussian_privatizer(
        stddev=noise_multiplier, prng_key=update_key)
  count_privatizer = noise_addition.gaussian_privatizer(
      stddev=count_noise_multiplier, prng_key=count_key)
  name = f"dp_{'ftrl' if mechanism == 'banded' else 'fedavg'}"

  def init(params):
    server = DPState(
        jnp.asarray(clip_norm, jnp.float32),
        privatizer.init(jax.tree.map(lambda p: jnp.zeros_like(p), params)),
        count_privatizer.init(jnp.zeros((), jnp.float32)) if adaptive
        else ())
    return TechniqueState(server=server, client=(),
                          feedback=jnp.zeros((), jnp.float32) if adaptive
                          else ())

  def plan(rng, round_num, ctx):
    del rng, round_num
    return ctx['server_state'].clip

  def decode(msg, clip):
    return clip_wires(msg, clip)

  def finish(delta, sent, clip, steps):
    del sent, steps
    if not adaptive:
      return (), ()
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(d.astype(jnp.float32)))
                        for d in jax.tree.leaves(delta)))
    return (), (norm <= clip).astype(jnp.float32) - 0.5

  def aggregate(state: DPState, delta_sum, coverage, info):
    del info
    covered = jax.tree.map(lambda c: c > 0, coverage)
    # The privatizer's noise has std z (· sensitivity) per unit of input:
    # noise the sum in units of C, then scale back.
    noisy, noise_state = privatizer.update(
        jax.tree.map(lambda d: d / state.clip, delta_sum), state.noise)
    delta_sum = jax.tree.map(
        lambda n, d, k: jnp.where(k, (n * state.clip).astype(d.dtype), 0.0),
        noisy, delta_sum, covered)
    coverage = jax.tree.map(
        lambda c, k: jnp.where(k, jnp.asarray(expected_clients, c.dtype),
                               0.0), coverage, covered)
    return delta_sum, coverage, state._replace(noise=noise_state)

  def server_update(state: DPState, feedback_sum, info):
    del info
    if not adaptive:
      return state
    noisy, count_state = count_privatizer.update(feedback_sum,
                                                 state.count_noise)
    fraction = noisy / expected_clients + 0.5
    clip = state.clip * jnp.exp(-clip_learning_rate *
                                (fraction - target_quantile))
    return state._replace(clip=clip.astype(jnp.float32),
                          count_noise=count_state)

  return Technique(name=name, plan=plan, decode=decode, init=init,
                   finish=finish if adaptive else None,
                   aggregate=aggregate,
                   server_update=server_update if adaptive else None)


def clip_of(technique_state: DPState) -> jax.Array:
  """The clip norm C the next round uses."""
  return technique_state.clip


__all__ = ['DPState', 'MECHANISMS', 'clip_of', 'clip_wires', 'dp_fedavg',
           'global_norm']
