"""Secure aggregation with the distributed discrete Gaussian, simulated.

SecAgg (Bonawitz et al. 2017, "Practical secure aggregation for
privacy-preserving machine learning") lets the server learn only the sum
of the clients' vectors over the ring Z_m, m = 2^bits; the distributed
discrete Gaussian (Kairouz, Liu & Steinke 2021, "The distributed discrete
Gaussian mechanism for federated learning with secure aggregation", DDG)
makes that sum differentially private with noise the clients add. This
module simulates what the protocol delivers (not its cryptography: the
masks cancel in the sum, so the server's view is the modular sum itself).

On the device, client i (`encode`; x: the dense values of its sent `Wire`
leaves, d of them in all; γ = `scale`, c = `clip_norm`):

  x   <- x · min(1, c / ‖x‖₂)            L2 clip of the whole upload (c > 0)
  x   <- H D x                           randomized Hadamard rotation
  z   <- ⌊γ x + u⌋, u ~ U[0, 1)^d        unbiased stochastic rounding
         (beta > 0: redrawn until ‖z‖₂² <= B², Kairouz et al.'s
         conditional rounding; B below)
  z   <- z + ξ_i, ξ_i ~ N_Z(0, σ²)^d     discrete Gaussian, σ = γ · noise_stddev
  msg =  z mod m  in [0, m)              `bits` bits per value

The rotation works per leaf: a leaf's flat vector of n values is cut into
blocks along the binary decomposition of n (n = 2^a + 2^b + ..., largest
first) and each block is rotated by its own H D, H the normalized
Walsh-Hadamard matrix (H = H^T = H^-1) and D random signs: orthogonal and
size-keeping (no padding: every value sent is a value of the model). The
signs are public randomness shared by the round's clients, derived from
(seed, round, leaf index), so the server inverts the rotation.

On the server, per client, `decode` returns the centered ring elements
(values in [-m/2, m/2), float32, leaf-shaped); the round sums them with the
client weights, which must be 1 per present client (the experiment
enforces `client.weighting='uniform'`): the float sum of integers is then
the integer sum. `aggregate` reads the round's sum:

  S   = (Σ_i z_i) mod m, centered in [-m/2, m/2)      the ring sum
  Δ   = D H S / γ                                     inverse rotation

and returns (Δ, coverage); the server optimizer divides by the coverage
(the number of clients) as for FedAvg. The noise stays (it is the DP).
A client that is dropped (non-finite update, weight 0, padding) is not in
the sum; the modular sum of the others decodes as their sum, as SecAgg's
dropout recovery gives. A device whose update is not finite drops out: its
message decodes to NaN, which the round leaves out.

Exactness. Float32 represents integers exactly to 2^24, so the round's sum
of K ring elements is the integer sum while K · 2^(bits-1) <= 2^24
(`check_exact`). `aggregate` cannot check this at trace time (the count of
clients is traced); a round with more clients returns a NaN sum, and the
round skips its server step (`RoundMetrics.server_step_skipped`).

Wrap-around. The decoded sum is right only while each coordinate of the
true sum Σ_i z_i lies in [-m/2, m/2); past it the coordinate is off by a
multiple of m / γ (choose γ for the K, c and σ of the run: Kairouz et al.
Sec. 4; the rotation flattens the vector so that ‖x‖/√d, not its largest
entry, sets the range).

Errors. Rounding moves each rotated coordinate by less than one grid step,
so the decoded sum of K clients is within √d · K / γ (L2) of the sum of
their clipped updates (plus the noise, of variance K σ² / γ² per
coordinate); the mean error is 0.

Privacy (`ddg_rdp`, `ddg_epsilon`): Kairouz et al. 2021, Prop. 14 (RDP of
the sum) and Thm. 1 (the norm after rounding), for the sum over n clients
each adding N_Z(0, σ²) (grid units), with
τ = 10 Σ_{k=1}^{n-1} exp(-2π²σ² k/(k+1)) and Δ₂, Δ₁ the L2 and L1 norm
bounds of one client's rounded vector:

  RDP(α) <= min( α Δ₂²/(2nσ²) + τ d,
                 α/2 (Δ₂²/(nσ²) + 2 Δ₁ τ/(√n σ) + τ² d),
                 α/2 (Δ₂/(√n σ) + τ √d)² )

  Δ₂² <= (c γ + √d)²                                   (beta = 0)
  Δ₂² <= min(c²γ² + d/4 + √(2 log(1/β)) (c γ + √d/2), (c γ + √d)²)
  Δ₁  <= min(√d Δ₂, Δ₂²)                               (integer entries)

(the three bounds as the authors' code computes them,
google-research/federated distributed_dp/accounting_utils.py), composed
over rounds and converted to (ε, δ) by dp-accounting's RDP conversion
(Canonne, Kamath & Steinke 2020, Prop. 12). Neighbouring: one client's
vector added or removed (its noise share still counted, as the paper's
n); Δ₂ is one client's rounded norm. No amplification by sampling.

The discrete Gaussian is sampled exactly (Canonne, Kamath & Steinke 2020,
"The discrete Gaussian for differential privacy", Alg. 3: rejection from
the discrete Laplace), vectorized: rejected entries are redrawn in a
`lax.while_loop`.

Place `secure_aggregation` last in a chain (its aggregate then reads the
sum first); it takes dense float Wires (no quantizer or top-k before it:
its grid is the quantization), and the clients' views must have the
server model's shapes (the rotation is inverted on the server's leaves).
Each sent leaf travels whole (a fixed-length SecAgg vector), also under a
dynamic trainable mask.

Cost (CPU, 200k values per client): rotation and rounding 4 ms, the
discrete Gaussian 60-100 ms (9 to 17 passes of rejection over the whole
vector, 3 random draws per entry each; redrawing only the rejected entries
measured no faster under vmap), `aggregate` 3 ms.

Example (16 clients of a model of d parameters; total noise std
√16 x 0.25 = 1 = clip_norm on the sum):

  tech = chain(secure_aggregation(bits=20, scale=2**10, clip_norm=1.0,
                                  noise_stddev=0.25))
  check_exact(20, clients=16)
  eps = ddg_epsilon(clip_norm=1.0, scale=2**10, noise_stddev=0.25,
                    clients=16, dim=d, rounds=100, delta=1e-5)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_eff.core import codecs
from fedjax_eff.core.codecs import Quantized, Sparse, Wire
from fedjax_eff.core.technique import Technique, TechniqueState

PyTree = Any

# Float32 integers are exact up to 2^24: the largest sum the round adds.
EXACT_LIMIT = 2 ** 24
# Conditional rounding gives up after this many draws (each fails with
# probability <= beta) and keeps the last one.
MAX_ROUNDING_DRAWS = 100
RDP_ORDERS = tuple(range(2, 129)) + (256,)


@struct.dataclass
class Ring:
  """One leaf as elements of Z_m, m = 2^bits: `codes` in [0, m).

  `finite` says the device's update was finite; it is not on the wire (a
  device that fails drops out of the protocol), the decoder reads NaN.
  `count` and `source_bits` are the leaf's own, for the decoder.
  """
  codes: Wire
  finite: Any
  count: Any = None
  source_bits: int = struct.field(pytree_node=False, default=32)


# Randomized Hadamard rotation.

def blocks(n: int) -> list[int]:
  """Block sizes of a vector of n values: the powers of two of n's binary
  decomposition, largest first (sum n)."""
  return [1 << b for b in reversed(range(n.bit_length())) if n >> b & 1]


def _wht(x: jax.Array) -> jax.Array:
  """Normalized Walsh-Hadamard transform of `[2^a]` values: a butterflies.

  (As fast as matmuls with Kronecker factors of H on CPU: 1.7 ms for
  200k values; exact ±1 arithmetic.)"""
  n = x.shape[0]
  for i in range(n.bit_length() - 1):
    x = x.reshape(1 << i, 2, n >> (i + 1))
    x = jnp.stack([x[:, 0] + x[:, 1], x[:, 0] - x[:, 1]], axis=1)
  return x.reshape(n) / math.sqrt(n)


def _by_blocks(f, x):
  out, start = [], 0
  for b in blocks(x.shape[0]):
    out.append(f(x[start:start + b]))
    start += b
  if len(out) == 1:
    return out[0]
  return jnp.concatenate(out) if out else x


def rotation_signs(seed: int, round_num, leaf: int, n: int) -> jax.Array:
  """The ±1 diagonal D of leaf `leaf` in round `round_num` (public)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed),
                                              round_num), leaf)
  return jax.random.rademacher(key, (n,), jnp.float32)


def hadamard_rotate(x: jax.Array, signs: jax.Array) -> jax.Array:
  """H D x per block of a flat `[n]` vector (orthogonal, size-keeping)."""
  return _by_blocks(_wht, x * signs)


def hadamard_unrotate(y: jax.Array, signs: jax.Array) -> jax.Array:
  """The inverse of `hadamard_rotate`: D H y per block."""
  return _by_blocks(_wht, y) * signs


# Rounding and noise.

def stochastic_round(x: jax.Array, key: jax.Array) -> jax.Array:
  """⌊x + u⌋, u ~ U[0, 1): integer-valued (float), unbiased, |error| < 1."""
  return jnp.floor(x + jax.random.uniform(key, x.shape, x.dtype))


def discrete_gaussian(key: jax.Array, shape: Sequence[int],
                      sigma: float) -> jax.Array:
  """i.i.d. N_Z(0, σ²): P(y) ∝ exp(-y²/(2σ²)) on the integers, int32.

  Canonne, Kamath & Steinke 2020, Alg. 3: with t = ⌊σ⌋ + 1, draw Y from
  the discrete Laplace P(y) ∝ exp(-|y|/t) (the difference of two geometric
  variables ⌊t E⌋, E ~ Exp(1)) and accept it with probability
  exp(-(|Y| - σ²/t)² / (2σ²)); rejected entries are redrawn together
  until none is left.
  """
  if sigma <= 0:
    raise ValueError(f'discrete_gaussian sigma={sigma} must be > 0.')
  t = math.floor(sigma) + 1
  shape = tuple(shape)

  def propose(k):
    k1, k2, k3 = jax.random.split(k, 3)
    y = (jnp.floor(t * jax.random.exponential(k1, shape)) -
         jnp.floor(t * jax.random.exponential(k2, shape)))
    accept = jax.random.uniform(k3, shape) < jnp.exp(
        -jnp.square(jnp.abs(y) - sigma ** 2 / t) / (2 * sigma ** 2))
    return y, accept

  def body(state):
    k, y, done = state
    k, sub = jax.random.split(k)
    new, accept = propose(sub)
    return k, jnp.where(done, y, new), done | accept

  k, sub = jax.random.split(key)
  y, done = propose(sub)
  _, y, _ = jax.lax.while_loop(lambda s: ~jnp.all(s[2]), body, (k, y, done))
  return y.astype(jnp.int32)


# Privacy and exactness.

def rounded_norm_bound(clip_norm: float, scale: float, dim: int,
                       beta: float = 0.0) -> float:
  """Δ₂: the L2 norm bound, in grid units, of one client's vector after
  stochastic rounding (Kairouz et al. 2021, Thm. 1 / Prop. 22): c γ + √d,
  or with conditional rounding (beta > 0) the smaller
  √(c²γ² + d/4 + √(2 log(1/β)) (c γ + √d/2))."""
  cg = clip_norm * scale
  bound = cg + math.sqrt(dim)
  if beta > 0:
    bound = min(bound, math.sqrt(cg ** 2 + dim / 4 + math.sqrt(
        2 * math.log(1 / beta)) * (cg + math.sqrt(dim) / 2)))
  return bound


def ddg_tau(sigma: float, clients: int) -> float:
  """τ = 10 Σ_{k=1}^{n-1} exp(-2π²σ² k/(k+1)) (σ in grid units): how far
  the sum of n discrete Gaussians is from one of variance nσ²."""
  return 10 * sum(math.exp(-2 * math.pi ** 2 * sigma ** 2 * k / (k + 1))
                  for k in range(1, clients))


def ddg_rdp(orders: Sequence[float], *, clip_norm: float, scale: float,
            noise_stddev: float, clients: int, dim: int,
            beta: float = 0.0) -> np.ndarray:
  """One round's RDP at `orders` (Kairouz et al. 2021, Prop. 14; see the
  module docstring): the sum of `clients` vectors of `dim` values, each
  clipped to `clip_norm`, on the grid 1/`scale`, each client adding
  discrete Gaussian noise of std `noise_stddev` (update units)."""
  _check_privacy(clip_norm, scale, noise_stddev, clients, dim, beta)
  sigma = noise_stddev * scale
  l2 = rounded_norm_bound(clip_norm, scale, dim, beta)
  l1 = l2 * min(math.sqrt(dim), l2)
  tau = ddg_tau(sigma, clients)
  s = math.sqrt(clients) * sigma
  a = np.asarray(orders, np.float64)
  return np.minimum.reduce([
      a * l2 ** 2 / (2 * s ** 2) + tau * dim,
      a / 2 * (l2 ** 2 / s ** 2 + 2 * l1 * tau / s + tau ** 2 * dim),
      a / 2 * (l2 / s + tau * math.sqrt(dim)) ** 2])


def ddg_event(*, clip_norm: float, scale: float, noise_stddev: float,
              clients: int, dim: int, beta: float = 0.0):
  """One round as a `dp_accounting.ZCDpEvent` (ξ, ρ)-zCDP, RDP(α) = ξ + ρα
  with ρ = Δ₂²/(2nσ²), ξ = τ d: the first of `ddg_rdp`'s bounds, to
  compose with other events in a dp-accounting accountant."""
  import dp_accounting  # pylint: disable=g-import-not-at-top
  _check_privacy(clip_norm, scale, noise_stddev, clients, dim, beta)
  sigma = noise_stddev * scale
  l2 = rounded_norm_bound(clip_norm, scale, dim, beta)
  return dp_accounting.ZCDpEvent(
      rho=l2 ** 2 / (2 * clients * sigma ** 2),
      xi=ddg_tau(sigma, clients) * dim)


def ddg_epsilon(*, clip_norm: float, scale: float, noise_stddev: float,
                clients: int, dim: int, rounds: int, delta: float,
                beta: float = 0.0,
                orders: Sequence[float] = RDP_ORDERS) -> float:
  """ε at `delta` after `rounds` rounds of `ddg_rdp` (composed by adding
  RDP, converted by dp-accounting's `compute_epsilon`)."""
  # pylint: disable-next=g-import-not-at-top
  from dp_accounting.rdp import rdp_privacy_accountant
  rdp = rounds * ddg_rdp(orders, clip_norm=clip_norm, scale=scale,
                         noise_stddev=noise_stddev, clients=clients, dim=dim,
                         beta=beta)
  return float(rdp_privacy_accountant.compute_epsilon(orders, rdp, delta)[0])


def _check_privacy(clip_norm, scale, noise_stddev, clients, dim, beta):
  if clip_norm <= 0:
    raise ValueError(f'DDG accounting needs clip_norm={clip_norm} > 0.')
  if noise_stddev * scale < 0.5:
    raise ValueError(f'DDG accounting needs noise_stddev x scale = '
                     f'{noise_stddev * scale:g} >= 0.5 grid steps.')
  if clients < 1 or dim < 1:
    raise ValueError(f'clients={clients} and dim={dim} must be >= 1.')
  if not 0 <= beta < 1:
    raise ValueError(f'beta={beta} must be in [0, 1).')


def check_exact(bits: int, clients: int) -> None:
  """Raises unless the float32 sum of `clients` ring elements of `bits`
  bits is exact: clients x 2^(bits-1) <= 2^24."""
  if clients * 2 ** (bits - 1) > EXACT_LIMIT:
    raise ValueError(
        f'secure aggregation: {clients} clients x 2^{bits - 1} exceeds '
        f'2^24, where float32 sums of integers stop being exact: use at '
        f'most {EXACT_LIMIT // 2 ** (bits - 1)} clients or fewer bits.')


# The technique.

def secure_aggregation(bits: int = 16, scale: float = 2.0 ** 10,
                       clip_norm: float = 0.0, rotate: bool = True,
                       noise_stddev: float = 0.0, seed: int = 0,
                       beta: float = 0.0) -> Technique:
  """SecAgg's modular sum, with the distributed discrete Gaussian.

  Args:
    bits: bits per value; the ring is Z_m, m = 2^bits (1..24).
    scale: γ; the grid step is 1/γ (update units).
    clip_norm: c, the L2 clip of a client's whole upload (0: none).
    rotate: the randomized Hadamard rotation before rounding.
    noise_stddev: each client's discrete Gaussian std in update units
      (σ = γ · noise_stddev grid steps; 0: no noise).
    seed: the public seed of the rotation signs.
    beta: conditional rounding (Kairouz et al. 2021): redraw the rounding
      until ‖z‖² <= Δ₂² of `rounded_norm_bound` (needs clip_norm > 0; 0:
      plain stochastic rounding).

  Returns:
    A `Technique` with `plan` (the round, for the signs), `encode`,
    `decode`, `init` (no state) and `aggregate` (ring sum, 1/γ, inverse
    rotation).
  """
  if not (isinstance(bits, int) and 1 <= bits <= 24):
    raise ValueError(f'secagg bits={bits} must be an int in 1..24.')
  if not scale > 0:
    raise ValueError(f'secagg scale={scale} must be > 0.')
  if clip_norm < 0:
    raise ValueError(f'secagg clip_norm={clip_norm} must be >= 0.')
  if noise_stddev < 0:
    raise ValueError(f'secagg noise_stddev={noise_stddev} must be >= 0.')
  if not 0 <= beta < 1:
    raise ValueError(f'secagg beta={beta} must be in [0, 1).')
  if beta > 0 and clip_norm <= 0:
    raise ValueError('secagg beta > 0 (conditional rounding) needs '
                     'clip_norm > 0.')
  m = 2 ** bits
  sigma = noise_stddev * scale
  code_dtype = jnp.uint8 if bits <= 8 else (jnp.uint16 if bits <= 16 else
                                            jnp.uint32)

  def plan(rng, round_num, ctx):
    del rng, ctx
    return jnp.asarray(round_num, jnp.int32)

  def round_all(xs, key, dim):
    """Stochastic rounding of the leaves, conditional when beta > 0."""
    def draw(k):
      return [stochastic_round(x, kk)
              for x, kk in zip(xs, jax.random.split(k, len(xs)))]
    if beta == 0:
      return draw(key)
    bound2 = rounded_norm_bound(clip_norm, scale, dim, beta) ** 2
    sq = lambda zs: sum(jnp.sum(jnp.square(z)) for z in zs)

    def body(state):
      i, k, _, _ = state
      k, sub = jax.random.split(k)
      zs = draw(sub)
      return i + 1, k, zs, sq(zs)
    _, _, zs, _ = jax.lax.while_loop(
        lambda s: (s[3] > bound2) & (s[0] < MAX_ROUNDING_DRAWS), body,
        body((0, key, xs, 0.0)))
    return zs

  def encode(tree, round_num, rng):
    nodes, treedef = jax.tree.flatten(tree, is_leaf=codecs.is_node)
    if any(isinstance(n, (Quantized, Sparse)) for n in nodes):
      raise ValueError('secure_aggregation takes dense values: put no '
                       'quantizer or top-k before it (its integer grid is '
                       'the quantization).')
    sent = [i for i, n in enumerate(nodes) if isinstance(n, Wire) and n.sent
            and jnp.issubdtype(n.values.dtype, jnp.floating)]
    if not sent:
      return tree
    xs = [nodes[i].values.astype(jnp.float32).reshape(-1) for i in sent]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))
    xs = [jnp.where(finite, x, 0.0) for x in xs]
    if clip_norm > 0:
      norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in xs))
      factor = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))
      xs = [x * factor for x in xs]
    if rotate:
      xs = [hadamard_rotate(x, rotation_signs(seed, round_num, i, x.size))
            for i, x in zip(sent, xs)]
    round_key, noise_key = jax.random.split(rng)
    zs = round_all([x * scale for x in xs], round_key,
                   sum(x.size for x in xs))
    if sigma > 0:
      zs = [z + discrete_gaussian(k, z.shape, sigma).astype(jnp.float32)
            for z, k in zip(zs, jax.random.split(noise_key, len(zs)))]
    out = list(nodes)
    for i, z in zip(sent, zs):
      w = nodes[i]
      codes = (z - m * jnp.floor(z / m)).astype(code_dtype)  # [0, m)
      out[i] = Ring(Wire(codes.reshape(w.values.shape), None, bits), finite,
                    w.count, w.bits)
    return treedef.unflatten(out)

  def decode(msg, round_num):
    del round_num

    def leaf(n):
      if not isinstance(n, Ring):
        return n
      v = n.codes.values.astype(jnp.int32)
      v = jnp.where(v >= m // 2, v - m, v).astype(jnp.float32)
      return Wire(jnp.where(n.finite, v, jnp.nan), n.count, n.source_bits)
    return jax.tree.map(leaf, msg, is_leaf=lambda x: isinstance(
        x, (Ring, Wire)))

  def init(params):
    del params
    return TechniqueState(server=(), client=(), feedback=())

  def aggregate(server_state, delta_sum, coverage, info):
    exact = info['clients'] * 2 ** (bits - 1) <= EXACT_LIMIT
    leaves, treedef = jax.tree.flatten(delta_sum)
    out = []
    for i, s in enumerate(leaves):
      z = jnp.round(s.astype(jnp.float32)).astype(jnp.int32)
      z = ((z + m // 2) & (m - 1)) - m // 2  # the ring sum, centered
      x = z.astype(jnp.float32).reshape(-1) / scale
      if rotate:
        x = hadamard_unrotate(x, rotation_signs(seed, info['round'], i,
                                                  x.size))
      out.append(jnp.where(exact, x.reshape(s.shape), jnp.nan).astype(
          s.dtype))
    return treedef.unflatten(out), coverage, server_state

  return Technique(name=f'secagg{bits}', plan=plan, encode=encode,
                   decode=decode, init=init, aggregate=aggregate)


__all__ = ['Ring', 'blocks', 'check_exact', 'ddg_epsilon', 'ddg_event',
           'ddg_rdp', 'ddg_tau', 'discrete_gaussian', 'hadamard_rotate',
           'hadamard_unrotate', 'rotation_signs', 'rounded_norm_bound',
           'secure_aggregation', 'stochastic_round']
