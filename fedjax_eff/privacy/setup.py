"""A run's privacy from its config: the DP technique, the accountant, the
round budget.

`config.privacy` (defaults in `default_config`):

  mechanism          'none' | 'gaussian' (DP-FedAvg, amplified by
                     `config.sampling`: 'poisson' or 'fixed') | 'banded'
                     (DP-FTRL with a banded matrix factorisation; needs
                     config.sampling='cyclic', no amplification) |
                     'distributed' (no central noise: the run's
                     secure_aggregation technique clips and its clients add
                     the distributed discrete Gaussian; accounted with
                     Kairouz et al. 2021's bound, every round composed,
                     fixed-size cohorts)
  noise_multiplier   z: the noise std on the clipped sum in units of the
                     clip. With adaptive clipping and mechanism 'gaussian'
                     the total: the update gets z_Δ with z = (z_Δ⁻² +
                     (2 σ_b)⁻²)^(-1/2) (`accounting.update_noise_multiplier`,
                     Andrew et al. 2021); with 'banded' the update's own
                     (each client's count is released in every round it
                     takes part in, so the accountant composes the two)
  clip_norm          C (the initial C with adaptive clipping)
  target_quantile    γ of adaptive clipping (Andrew et al. 2021); 0 = fixed C
  clip_learning_rate η of adaptive clipping
  count_noise_multiplier  σ_b, the std of the noise on the clipped count;
                     0 with adaptive clipping = K / 20 (Andrew et al.)
  bands              banded: the bands b (0 = the min-separation N // K)
  delta              δ of the reported (ε, δ)
  accountant         'rdp' | 'pld' (dp-accounting)
  target_epsilon     > 0: train only the rounds whose ε stays within it

Client-level DP bounds each client's contribution to the sum, so client
weights must be uniform (`config.client.weighting='uniform'`); the
server divides the noised sum by the expected cohort size K (a constant),
not by the number of clients that happened to take part.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections
import numpy as np

from fedjax_eff.core.technique import Technique, chain
from fedjax_eff.privacy import accounting
from fedjax_eff.privacy import dp_fedavg as dp_lib
from fedjax_eff.privacy import secagg

MECHANISMS = ('none',) + dp_lib.MECHANISMS + ('distributed',)
ACCOUNTANTS = ('rdp', 'pld')
SAMPLING = ('fixed', 'poisson', 'cyclic')


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      mechanism='none', noise_multiplier=1.0, clip_norm=1.0,
      target_quantile=0.0, clip_learning_rate=0.2,
      count_noise_multiplier=0.0, bands=0, delta=1e-5, accountant='rdp',
      target_epsilon=0.0))


def enabled(config) -> bool:
  return config.privacy.mechanism != 'none'


def validate(config) -> None:
  """One-line `ValueError`s naming the key."""
  p = config.privacy
  if config.sampling not in SAMPLING:
    raise ValueError(f'config.sampling must be one of {SAMPLING}, got '
                     f'{config.sampling!r}.')
  if p.mechanism not in MECHANISMS:
    raise ValueError(f'config.privacy.mechanism must be one of '
                     f'{MECHANISMS}, got {p.mechanism!r}.')
  if p.accountant not in ACCOUNTANTS:
    raise ValueError(f'config.privacy.accountant must be one of '
                     f'{ACCOUNTANTS}, got {p.accountant!r}.')
  if not enabled(config):
    return
  if config.mode != 'federated':
    raise ValueError("config.privacy needs config.mode='federated'.")
  if config.devices.get('profiles', 'none') != 'none':
    raise ValueError(
        'config.privacy accounts its sampling (config.sampling), but '
        'config.devices.profiles samples whoever is online and finishes: '
        'use one or the other.')
  secure = secagg_entry(config)
  if p.mechanism == 'distributed':
    if (secure is None or not secure.get('clip_norm', 0) > 0
        or not secure.get('noise_stddev', 0) > 0):
      raise ValueError(
          "config.privacy.mechanism='distributed' needs a "
          'secure_aggregation technique with clip_norm > 0 and '
          'noise_stddev > 0 (its clients add the noise).')
    if config.sampling != 'fixed':
      raise ValueError("config.privacy.mechanism='distributed' is accounted "
                       "for fixed-size cohorts: config.sampling='fixed'.")
  elif secure is not None:
    raise ValueError(
        f'config.privacy.mechanism={p.mechanism!r} (central DP: the server '
        'clips each decoded update) cannot read updates under '
        "secure_aggregation; use mechanism='distributed' with its own "
        'clip_norm and noise_stddev (the distributed discrete Gaussian).')
  if config.client.weighting != 'uniform':
    raise ValueError(
        'config.privacy bounds each client\'s share of the sum: set '
        "config.client.weighting='uniform' (got "
        f'{config.client.weighting!r}).')
  for key in ('noise_multiplier', 'count_noise_multiplier',
              'target_epsilon', 'target_quantile', 'clip_learning_rate'):
    if not p[key] >= 0:
      raise ValueError(f'config.privacy.{key} must be >= 0, got {p[key]!r}.')
  if not p.clip_norm > 0:
    raise ValueError(f'config.privacy.clip_norm must be > 0, got '
                     f'{p.clip_norm!r}.')
  if not 0 < p.delta < 1:
    raise ValueError(f'config.privacy.delta must be in (0, 1), got '
                     f'{p.delta!r}.')
  if not p.target_quantile < 1:
    raise ValueError('config.privacy.target_quantile must be in [0, 1) '
                     f'(0: a fixed clip), got {p.target_quantile!r}.')
  if p.mechanism == 'banded' and config.sampling != 'cyclic':
    raise ValueError("config.privacy.mechanism='banded' (DP-FTRL) bounds "
                     'how often a client takes part: it needs '
                     "config.sampling='cyclic'.")
  if p.mechanism == 'gaussian' and config.sampling == 'cyclic':
    raise ValueError("config.privacy.mechanism='gaussian' is accounted with "
                     "sampling amplification: config.sampling='poisson' or "
                     "'fixed' (or mechanism='banded' with 'cyclic').")
  if p.accountant == 'pld' and config.sampling == 'fixed':
    raise ValueError("config.privacy.accountant='pld' has no fixed-size "
                     "sampling: config.sampling='poisson' or accountant="
                     "'rdp'.")


def secagg_entry(config) -> dict | None:
  """The knobs of the run's secure_aggregation technique, if any."""
  for t in config.techniques:
    t = dict(t)
    if t.get('name') == 'secure_aggregation':
      return t
  return None


class DistributedAccountant:
  """ε of secure aggregation's distributed discrete Gaussian (Kairouz,
  Liu & Steinke 2021; `secagg.ddg_epsilon`): K clients each add N_Z(0,
  σ²) to their clipped, rotated, rounded update; no sampling
  amplification is claimed, every round composes. `dim`: the values a
  client sends (the model's size: an upper bound where leaves are
  frozen, and ε grows with d)."""

  def __init__(self, knobs: dict, clients: int, dim: int, delta: float,
               population: int):
    self.knobs = dict(clip_norm=float(knobs['clip_norm']),
                      scale=float(knobs.get('scale', 2.0 ** 10)),
                      noise_stddev=float(knobs['noise_stddev']),
                      beta=float(knobs.get('beta', 0.0)))
    self.clients, self.dim, self.delta = clients, dim, delta
    self.population = population
    self._cache: dict[int, float] = {}

  def epsilon(self, rounds: int) -> float:
    if rounds <= 0:
      return 0.0
    if rounds not in self._cache:
      self._cache[rounds] = secagg.ddg_epsilon(
          clients=self.clients, dim=self.dim, rounds=rounds,
          delta=self.delta, **self.knobs)
    return self._cache[rounds]

  def summary(self, rounds: int) -> dict:
    k = self.knobs
    return dict(
        epsilon=self.epsilon(rounds), delta=self.delta,
        # The sum's noise std over the clip: √K σ / c.
        noise_multiplier=float(np.sqrt(self.clients) * k['noise_stddev']
                               / k['clip_norm']),
        sampling_probability=self.clients / self.population,
        rounds=int(rounds), accountant='rdp',
        mechanism='distributed_discrete_gaussian', sampling='fixed',
        clients=self.clients, dim=self.dim, **k)


def rounds_within(epsilon, target: float, max_rounds: int) -> int:
  """The largest r <= max_rounds with epsilon(r) <= target (ε grows with
  r)."""
  lo, hi = 0, max_rounds
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if epsilon(mid) <= target:
      lo = mid
    else:
      hi = mid - 1
  return lo


class RunPrivacy(NamedTuple):
  """What a private run keeps beside its round: its accountant
  (`epsilon(rounds)`, `summary(rounds)`), the numbers a resumed run must
  match, and the rounds within target_epsilon."""
  accountant: Any
  numbers: tuple
  delta: float
  rounds_allowed: int

  def epsilon(self, rounds: int) -> float:
    return self.accountant.epsilon(rounds)

  def checkpoint(self, rounds: int) -> np.ndarray:
    """The accountant's state as the checkpoint holds it: what it was
    computed from and the rounds accounted."""
    return np.asarray(self.numbers + (rounds,), np.float64)

  def check_restored(self, saved: np.ndarray, rounds: int) -> None:
    now = self.checkpoint(rounds)
    saved = np.asarray(saved, np.float64)
    if saved.shape != now.shape or not np.allclose(saved, now, rtol=1e-12):
      raise ValueError(
          'The checkpoint was accounted with another privacy schedule '
          f'({saved.tolist()}; this run: {now.tolist()}: the mechanism\'s '
          'numbers, then the rounds); use a fresh --workdir.')

  def summary(self, rounds: int, clip_norm: float | None) -> dict:
    out = self.accountant.summary(rounds)
    if clip_norm is not None:
      out['clip_norm'] = clip_norm
    return out


def _allowed(config, epsilon) -> int:
  """Rounds within config.privacy.target_epsilon (all without one)."""
  p = config.privacy
  if not p.target_epsilon > 0:
    return config.num_rounds
  allowed = rounds_within(epsilon, p.target_epsilon, config.num_rounds)
  if allowed < 1:
    raise ValueError(
        f'config.privacy.target_epsilon={p.target_epsilon:g} is exceeded '
        f'by one round (epsilon {epsilon(1):.3g} at delta {p.delta:g}): '
        'raise the noise multiplier (launch/noise_multiplier.py computes '
        'one) or the target.')
  return allowed


def build(config, num_clients: int, technique: Technique,
          num_params: int = 0) -> tuple[Technique, RunPrivacy | None]:
  """The run's technique with DP first in the chain (its clip reads the
  fully decoded upload; its noise is the last word on the sum), and the
  run's privacy; `(technique, None)` without privacy. `num_params`: the
  model's size (the distributed mechanism's d)."""
  if not enabled(config):
    return technique, None
  p = config.privacy
  k = config.clients_per_round
  if p.mechanism == 'distributed':  # the noise is secure_aggregation's
    knobs = secagg_entry(config)
    acc = DistributedAccountant(knobs, k, num_params, p.delta, num_clients)
    a = acc.knobs
    numbers = (MECHANISMS.index('distributed'), a['clip_norm'], a['scale'],
               a['noise_stddev'], a['beta'], k, num_params, p.delta)
    return technique, RunPrivacy(acc, numbers, p.delta,
                                 _allowed(config, acc.epsilon))
  adaptive = p.target_quantile > 0
  count_z = (p.count_noise_multiplier or k / 20.0) if adaptive else 0.0
  z_update = p.noise_multiplier
  if adaptive and p.mechanism == 'gaussian':
    z_update = accounting.update_noise_multiplier(p.noise_multiplier,
                                                  count_z)
  bands, sensitivity = 1, 1.0
  if p.mechanism == 'banded':
    min_sep, max_part = accounting.cyclic_participation(
        num_clients, k, config.num_rounds)
    bands = p.bands or min(min_sep, config.num_rounds)
    sensitivity = accounting.banded_sensitivity(config.num_rounds, bands,
                                                min_sep, max_part)
  schedule = accounting.PrivacySchedule(
      noise_multiplier=z_update, sampling=config.sampling,
      population=num_clients, clients_per_round=k, delta=p.delta,
      accountant=p.accountant, mechanism=p.mechanism, bands=bands,
      num_rounds=config.num_rounds, count_noise_multiplier=count_z)
  acc = accounting.Accountant(schedule)
  banded = p.mechanism == 'banded'  # (its noise depends on the plan)
  numbers = (z_update, schedule.sampling_probability, p.delta, count_z,
             MECHANISMS.index(p.mechanism), bands if banded else 0,
             config.num_rounds if banded else 0)
  allowed = _allowed(config, acc.epsilon_at)
  dp = dp_lib.dp_fedavg(
      p.clip_norm, z_update, float(k), target_quantile=p.target_quantile,
      clip_learning_rate=p.clip_learning_rate, count_noise_multiplier=count_z,
      mechanism=p.mechanism, num_rounds=config.num_rounds, bands=bands,
      sensitivity=sensitivity, seed=config.seed)
  return chain(dp, technique), RunPrivacy(acc, numbers, p.delta, allowed)


def clip_norm(config, technique_state: Any) -> float | None:
  """The DP clip of a run's technique state (DP is first in its chain);
  None for the distributed mechanism (its clip is a constant)."""
  if config.privacy.mechanism == 'distributed':
    return None
  return float(dp_lib.clip_of(technique_state[0]))


def stop_line(privacy: RunPrivacy, num_rounds: int) -> str | None:
  """The line a run prints when target_epsilon ends it early."""
  if privacy.rounds_allowed >= num_rounds:
    return None
  r = privacy.rounds_allowed
  return (f'privacy: training stops after round {r} of {num_rounds}: '
          f'round {r + 1} would exceed target_epsilon (epsilon '
          f'{privacy.epsilon(r):.4g} after {r}, {privacy.epsilon(r + 1):.4g} '
          f'after {r + 1}, at delta {privacy.delta:g}).')


__all__ = ['ACCOUNTANTS', 'MECHANISMS', 'RunPrivacy', 'SAMPLING', 'build',
           'clip_norm', 'default_config', 'enabled', 'stop_line', 'validate']
