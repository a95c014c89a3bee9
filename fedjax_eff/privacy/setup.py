"""A run's privacy from its config: the DP technique, the accountant, the
round budget.

`config.privacy` (defaults in `default_config`):

  mechanism          'none' | 'gaussian' (DP-FedAvg, amplified by
                     `config.sampling`: 'poisson' or 'fixed') | 'banded'
                     (DP-FTRL with a banded matrix factorisation; needs
                     config.sampling='cyclic', no amplification)
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

MECHANISMS = ('none',) + dp_lib.MECHANISMS
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
  if any(dict(t).get('name') == 'secure_aggregation'
         for t in config.techniques):
    raise ValueError(
        'config.privacy (central DP: the server clips each decoded update) '
        'cannot read updates under secure_aggregation; use its own '
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


class RunPrivacy(NamedTuple):
  """What a private run keeps beside its round."""
  schedule: accounting.PrivacySchedule
  accountant: accounting.Accountant
  rounds_allowed: int           # rounds within target_epsilon
  update_noise_multiplier: float

  def epsilon(self, rounds: int) -> float:
    return self.accountant.epsilon(rounds)

  def checkpoint(self, rounds: int) -> np.ndarray:
    """The accountant's state as the checkpoint holds it: the schedule's
    numbers and the rounds accounted."""
    s = self.schedule
    banded = s.mechanism == 'banded'  # (its noise depends on the plan)
    return np.asarray([s.noise_multiplier, s.sampling_probability,
                       s.delta, s.count_noise_multiplier,
                       MECHANISMS.index(s.mechanism), s.bands if banded else 0,
                       s.num_rounds if banded else 0, rounds], np.float64)

  def check_restored(self, saved: np.ndarray, rounds: int) -> None:
    now = self.checkpoint(rounds)
    saved = np.asarray(saved, np.float64)
    if saved.shape != now.shape or not np.allclose(saved, now, rtol=1e-12):
      raise ValueError(
          'The checkpoint was accounted with another privacy schedule '
          '(noise multiplier, q, delta, count noise, mechanism, bands, '
          f'planned rounds (banded), rounds = '
          f'{saved.tolist()}; this run: {now.tolist()}); use a fresh '
          '--workdir.')

  def summary(self, rounds: int, clip_norm: float | None) -> dict:
    out = self.accountant.summary(rounds)
    out['clip_norm'] = clip_norm
    return out


def build(config, num_clients: int, technique: Technique
          ) -> tuple[Technique, RunPrivacy | None]:
  """The run's technique with DP first in the chain (its clip reads the
  fully decoded upload; its noise is the last word on the sum), and the
  run's privacy; `(technique, None)` without privacy."""
  if not enabled(config):
    return technique, None
  p = config.privacy
  k = config.clients_per_round
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
  allowed = config.num_rounds
  if p.target_epsilon > 0:
    allowed = accounting.rounds_within(p.target_epsilon, schedule,
                                       config.num_rounds)
    if allowed < 1:
      raise ValueError(
          f'config.privacy.target_epsilon={p.target_epsilon:g} is exceeded '
          f'by one round (epsilon {acc.epsilon(1):.3g} at delta '
          f'{p.delta:g}): raise the noise multiplier (launch/'
          'noise_multiplier.py computes one) or the target.')
  dp = dp_lib.dp_fedavg(
      p.clip_norm, z_update, float(k), target_quantile=p.target_quantile,
      clip_learning_rate=p.clip_learning_rate, count_noise_multiplier=count_z,
      mechanism=p.mechanism, num_rounds=config.num_rounds, bands=bands,
      sensitivity=sensitivity, seed=config.seed)
  return chain(dp, technique), RunPrivacy(schedule, acc, allowed, z_update)


def clip_norm(technique_state: Any) -> float:
  """The DP clip of a run's technique state (DP is first in its chain)."""
  return float(dp_lib.clip_of(technique_state[0]))


def stop_line(privacy: RunPrivacy, num_rounds: int) -> str | None:
  """The line a run prints when target_epsilon ends it early."""
  if privacy.rounds_allowed >= num_rounds:
    return None
  r = privacy.rounds_allowed
  s = privacy.schedule
  return (f'privacy: training stops after round {r} of {num_rounds}: '
          f'round {r + 1} would exceed target_epsilon (epsilon '
          f'{privacy.epsilon(r):.4g} after {r}, {privacy.epsilon(r + 1):.4g} '
          f'after {r + 1}, at delta {s.delta:g}).')


__all__ = ['ACCOUNTANTS', 'MECHANISMS', 'RunPrivacy', 'SAMPLING', 'build',
           'clip_norm', 'default_config', 'enabled', 'stop_line', 'validate']
