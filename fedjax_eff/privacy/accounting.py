r"""Privacy accounting for client-level DP-FedAvg and banded DP-FTRL.

(ε, δ) of a training run, the noise multiplier for a target ε and the
rounds a target allows, on Google's dp-accounting (RDP and PLD accountants,
`calibrate_dp_mechanism`) and jax-privacy (the banded strategy's
sensitivity). Nothing here re-derives what those libraries compute: this
module only says which `DpEvent` a run is.

The unit of privacy is a client (client-level DP, McMahan et al. 2018,
"Learning differentially private recurrent language models"): each client
adds at most C (the clip norm) in L2 to a round's sum, and the server adds
Gaussian noise of std z·C to the sum (`noise_multiplier` z). A round is then
a Gaussian mechanism of noise multiplier z on a sample of the population,
and a run is the composition of its rounds.

Sampling (`PrivacySchedule.sampling`; N clients, K per round):

  poisson   every client takes part independently with q = K/N (K is the
            expected cohort size; the server divides by the constant K).
            One round = PoissonSampled(q, Gaussian(z)) under add/remove-one,
            the subsampled Gaussian of McMahan et al. 2018 / Mironov et al.
            2019. RDP or PLD.
  fixed     K distinct clients drawn uniformly without replacement. The
            amplification theorem for this (Wang, Balle & Kasiviswanathan
            2019, Thm. 27; dp-accounting's SampledWithoutReplacementDpEvent)
            holds under the *replace-one* relation, where the clipped sum's
            sensitivity is 2C (one client's C-bounded update replaced by
            another's): the event is SampledWithoutReplacement(N, K,
            Gaussian(z / 2)) (jax-privacy's FIXED_BATCH_SIZE analysis doubles
            the sensitivity in the same way). dp-accounting has this event
            for RDP only: with accountant='pld' the schedule is refused.
  cyclic    the population is split once into B = N // K blocks of K and
            round r trains block r mod B (the order is public: no
            amplification). A client takes part at most p_t = ceil(t / B)
            times in t rounds, with min separation B (`cyclic_participation`).
            With mechanism='gaussian' the run is SelfComposed(Gaussian(z),
            p_t) (independent noise each round).

Mechanisms (`PrivacySchedule.mechanism`):

  gaussian  DP-FedAvg: independent noise N(0, z² C² I) on each round's sum.
  banded    DP-FTRL with a banded matrix factorisation (Kairouz et al. 2021,
            "Practical and private (deep) learning without sampling or
            shuffling"; Choquette-Choo et al. 2023, "(Amplified) banded
            matrix factorization: a unified approach to private training").
            With the column-normalised b-banded strategy C_T of
            jax-privacy (`ColumnNormalizedBanded.default(T, b)`, T =
            `num_rounds`) the run releases C_T X + σ Z (the model is a
            post-processing), σ = z · C · s_T, where s_T is C_T's L2
            sensitivity under the participation pattern (min separation
            B >= b, at most p_T participations). Columns of one client are
            b apart or more, so they have disjoint supports and unit norm:
            s_T² = p_T (jax-privacy's `minsep_sensitivity_squared`; it
            refuses b > min_sep). The whole run is one Gaussian mechanism
            with multiplier z. After t <= T rounds only the first t rows
            are released; their sensitivity s_t is (at most) the square
            root of the number of participations in the first t rounds,
            min(p_T, ceil(t / B)) — `minsep_sensitivity_squared(C_T,
            min_sep, p_T, n=t)`, whose `n` is the number of leading rounds
            counted. (A column near row t is truncated by the prefix and
            has norm < 1, so s_t is an upper bound: exact for b = 1 and at
            t = T, conservative in between.) The noise was sized for the
            whole run, so after t rounds the event is
            Gaussian(z · s_T / s_t), whose multiplier is >= z. Only cyclic
            sampling is accounted for 'banded' (no amplification); the
            amplified b-min-sep Poisson variant of Choquette-Choo et al. is
            not.

Adaptive clipping (Andrew et al. 2021, "Differentially private learning
with adaptive clipping", Thm. 1; TensorFlow Federated's
`DifferentiallyPrivateFactory.gaussian_adaptive` implements the same
split): each round also releases the number of clients whose update was
within the clip, with Gaussian noise of std σ_b (`count_noise_multiplier`,
in units of one client; Andrew et al. suggest K/20). The theorem takes each
client's bit centred, b_i − ½ ∈ {−½, ½} (the server adds ½ back after
dividing by the constant K, as TF Privacy's quantile estimator does), so the
count's add/remove sensitivity is ½ and its own noise multiplier is 2σ_b.
Stacking the update sum (noise multiplier z_Δ) and the count (2σ_b) as one
vector and rescaling the count so both noises have the same std gives one
Gaussian mechanism of sensitivity sqrt(1 + (z_Δ / 2σ_b)²) per unit of noise
std z_Δ, i.e. of noise multiplier

    z = (z_Δ⁻² + (2 σ_b)⁻²)^(-1/2)        (`effective_noise_multiplier`)
    z_Δ = (z⁻² − (2 σ_b)⁻²)^(-1/2)        (`update_noise_multiplier`; needs
                                           2 σ_b > z)

`PrivacySchedule.noise_multiplier` is z_Δ, the noise on the update sum; the
accountant composes the count in. For 'gaussian' every round's event uses
the effective z (under the replace-one relation of 'fixed' both
sensitivities double, so z / 2 there as well). For 'banded' the count's
noise is independent per round (not factorised), so the count part is
composed separately: Composed(Gaussian(z_Δ s_T / s_t), SelfComposed(
Gaussian(2σ_b), p_t)). If the bit is *not* centred (b_i ∈ {0, 1}, add/
remove sensitivity 1), the count's multiplier is σ_b, not 2σ_b, and these
formulas overstate the noise: centre the bit.

Accountants (`PrivacySchedule.accountant`):

  rdp  Rényi DP (Mironov 2017, "Rényi differential privacy"), dp-accounting's
       `RdpAccountant` with its default orders (1.1 … 10.9 by 0.1, 11 … 63,
       128, 256, 512, 1024) and its conversion to (ε, δ) (Canonne et al.
       2020 / Asoodeh et al. 2020). Composition is a sum of RDP curves, so
       `Accountant` computes one round's curve once and scales it by the
       rounds.
  pld  Privacy loss distributions (Doroshenko et al. 2022, "Connect the
       dots: tighter discrete approximations of privacy loss
       distributions"), dp-accounting's `PLDAccountant` with a value
       discretisation of 1e-3 (`PLD_VALUE_DISCRETIZATION`; pessimistic, so
       ε stays an upper bound: 1.8289 against 1.8282 at 1e-4 for q = 0.01,
       z = 1, 1000 rounds, δ = 1e-5, at 1/8 of the time). Tighter than RDP
       (1.83 against 2.10 there).

All ε here are at the schedule's δ, for the add/remove-one-client relation
(replace-one for 'fixed').
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
from typing import Any

import dp_accounting
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

SAMPLING = ('poisson', 'fixed', 'cyclic')
ACCOUNTANTS = ('rdp', 'pld')
MECHANISMS = ('gaussian', 'banded')

# PLD's value discretisation interval: 1e-3 is ~8x faster than
# dp-accounting's 1e-4 default and loosens ε by ~0.04% (see above).
PLD_VALUE_DISCRETIZATION = 1e-3
# RDP orders: dp-accounting's defaults.
RDP_ORDERS = tuple(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)


class _QuietExcludedOrders(logging.Filter):
  """dp-accounting's RDP accountant logs a warning for every order whose
  series does not converge (small orders at small noise) and leaves that
  order out: ε stays a valid bound from the other orders. Printed once
  per order and per call, it buries a run's log and the CLI's answer."""

  def filter(self, record):
    return 'failed to converge' not in record.getMessage()


logging.getLogger('absl').addFilter(_QuietExcludedOrders())

_REL = dp_accounting.NeighboringRelation


@dataclasses.dataclass(frozen=True)
class PrivacySchedule:
  """What the accountant needs to know about one training run.

  Attributes:
    noise_multiplier: z (z_Δ with adaptive clipping): the std of the noise on
      the clipped sum in units of the clip norm; for 'banded' in units of
      the clip norm x the strategy's sensitivity s_T (`banded_sensitivity`).
    sampling: 'poisson' | 'fixed' | 'cyclic'.
    population: N, the training clients.
    clients_per_round: K: the cohort size ('fixed'), the expected cohort
      size q N ('poisson'; need not be an integer), the block size
      ('cyclic').
    delta: δ of the reported (ε, δ), in (0, 1).
    accountant: 'rdp' | 'pld'.
    mechanism: 'gaussian' (DP-FedAvg) | 'banded' (DP-FTRL, cyclic only).
    bands: b, banded only (1 <= b <= min(N // K, num_rounds)).
    num_rounds: banded only: T, the size of the strategy matrix (the
      rounds planned); the noise is sized for all of them.
    count_noise_multiplier: σ_b, the std of the noise on the (centred)
      clipped count of adaptive clipping; 0 = a fixed clip.
  """
  noise_multiplier: float
  sampling: str
  population: int
  clients_per_round: float
  delta: float
  accountant: str = 'rdp'
  mechanism: str = 'gaussian'
  bands: int = 1
  num_rounds: int = 0
  count_noise_multiplier: float = 0.0

  def __post_init__(self):
    if self.sampling not in SAMPLING:
      raise ValueError(f'sampling={self.sampling!r} is not one of '
                       f'{SAMPLING}.')
    if self.accountant not in ACCOUNTANTS:
      raise ValueError(f'accountant={self.accountant!r} is not one of '
                       f'{ACCOUNTANTS}.')
    if self.mechanism not in MECHANISMS:
      raise ValueError(f'mechanism={self.mechanism!r} is not one of '
                       f'{MECHANISMS}.')
    for name in ('noise_multiplier', 'delta', 'count_noise_multiplier',
                 'clients_per_round'):
      if not _is_real(getattr(self, name)):
        raise ValueError(f'{name} must be a number, got '
                         f'{getattr(self, name)!r}.')
    for name in ('population', 'bands', 'num_rounds'):
      if not _is_int(getattr(self, name)):
        raise ValueError(f'{name} must be an integer, got '
                         f'{getattr(self, name)!r}.')
    # Plain Python numbers (numpy's too arrive here), so `state()` is JSON.
    for name in ('noise_multiplier', 'delta', 'count_noise_multiplier'):
      object.__setattr__(self, name, float(getattr(self, name)))
    for name in ('population', 'bands', 'num_rounds'):
      object.__setattr__(self, name, int(getattr(self, name)))
    object.__setattr__(self, 'clients_per_round', (
        int(self.clients_per_round) if _is_int(self.clients_per_round)
        else float(self.clients_per_round)))
    if not self.noise_multiplier > 0:
      raise ValueError(f'noise_multiplier must be > 0, got '
                       f'{self.noise_multiplier!r}.')
    if not self.count_noise_multiplier >= 0:
      raise ValueError(f'count_noise_multiplier must be >= 0 (0: a fixed '
                       f'clip), got {self.count_noise_multiplier!r}.')
    if not 0 < self.delta < 1:
      raise ValueError(f'delta must be in (0, 1), got {self.delta!r}.')
    if self.population < 1:
      raise ValueError(f'population must be >= 1, got {self.population!r}.')
    k = self.clients_per_round
    if self.sampling != 'poisson' and not _is_int(k):
      raise ValueError(f'clients_per_round must be an integer for '
                       f'{self.sampling} sampling, got {k!r}.')
    if not 0 < k <= self.population:
      raise ValueError(
          f'clients_per_round / population = {k!r} / {self.population} is '
          'not a sampling probability in (0, 1].')
    if self.sampling != 'poisson' and k < 1:
      raise ValueError(f'clients_per_round must be >= 1, got {k!r}.')
    if self.sampling == 'fixed' and self.accountant == 'pld':
      raise ValueError("fixed-size sampling is accounted by RDP only "
                       "(dp-accounting's PLD has no sampling without "
                       "replacement): use accountant='rdp' or poisson "
                       "sampling.")
    if self.mechanism == 'banded':
      if self.sampling != 'cyclic':
        raise ValueError("mechanism='banded' (DP-FTRL, no amplification) is "
                         "accounted for cyclic sampling only, got "
                         f"sampling={self.sampling!r}.")
      if self.num_rounds < 1:
        raise ValueError(f'banded: num_rounds (the rounds planned) must be '
                         f'>= 1, got {self.num_rounds!r}.')
      if not 1 <= self.bands <= self.num_rounds:
        raise ValueError(f'banded: bands must be in [1, num_rounds='
                         f'{self.num_rounds}], got {self.bands!r}.')
      min_sep = self.population // int(k)
      if self.bands > min_sep:
        raise ValueError(_bands_error(self.bands, min_sep))

  @property
  def sampling_probability(self) -> float:
    """K / N for poisson and fixed; for cyclic the participation rate
    1 / (N // K) (a client trains once every N // K rounds)."""
    if self.sampling == 'cyclic':
      return 1.0 / (self.population // int(self.clients_per_round))
    return self.clients_per_round / self.population


def _is_int(x) -> bool:
  return (isinstance(x, numbers.Integral) and not isinstance(x, bool)) or (
      isinstance(x, float) and x.is_integer())


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _bands_error(bands: int, min_sep: int) -> str:
  return (f'bands={bands} > min_sep={min_sep}: a client could take part '
          'twice within one band (the banded sensitivity needs bands <= '
          'min_sep, e.g. N // K for cyclic sampling).')


def effective_noise_multiplier(noise_multiplier: float,
                               count_noise_multiplier: float) -> float:
  """The one Gaussian the update sum and the clipped count compose to.

  Andrew et al. 2021, Thm. 1: noise multiplier z_Δ on the update sum and
  noise std σ_b on the centred clipped count (sensitivity ½, so multiplier
  2σ_b) release as much as one Gaussian of multiplier
  z = (z_Δ⁻² + (2σ_b)⁻²)^(-1/2) <= min(z_Δ, 2σ_b). σ_b = 0 (a fixed clip,
  no count released) gives z_Δ.
  """
  if not noise_multiplier > 0:
    raise ValueError(f'noise_multiplier must be > 0, got '
                     f'{noise_multiplier!r}.')
  if not count_noise_multiplier >= 0:
    raise ValueError(f'count_noise_multiplier must be >= 0, got '
                     f'{count_noise_multiplier!r}.')
  if count_noise_multiplier == 0:
    return float(noise_multiplier)
  return float((noise_multiplier ** -2 +
                (2.0 * count_noise_multiplier) ** -2) ** -0.5)


def update_noise_multiplier(total_noise_multiplier: float,
                            count_noise_multiplier: float) -> float:
  """z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2): the update's noise multiplier that, with
  the count's noise σ_b, composes to the total z (the inverse of
  `effective_noise_multiplier`). σ_b = 0 gives z."""
  if not total_noise_multiplier > 0:
    raise ValueError(f'total noise multiplier must be > 0, got '
                     f'{total_noise_multiplier!r}.')
  if not count_noise_multiplier >= 0:
    raise ValueError(f'count_noise_multiplier must be >= 0, got '
                     f'{count_noise_multiplier!r}.')
  if count_noise_multiplier == 0:
    return float(total_noise_multiplier)
  if 2.0 * count_noise_multiplier <= total_noise_multiplier:
    raise ValueError(
        f'count_noise_multiplier={count_noise_multiplier:g} is too small '
        f'for a total noise multiplier of {total_noise_multiplier:g}: the '
        'clipped count alone releases more (it needs 2 x '
        'count_noise_multiplier > total); raise it or lower the total.')
  return float((total_noise_multiplier ** -2 -
                (2.0 * count_noise_multiplier) ** -2) ** -0.5)


@functools.lru_cache(maxsize=256)
def _banded_sensitivity_squared(num_rounds: int, bands: int, min_sep: int,
                                max_participations: int | None,
                                prefix: int | None) -> int:
  # jax-privacy (and so jax) only for banded schedules.
  from jax_privacy.matrix_factorization import banded  # pylint: disable=g-import-not-at-top
  strategy = banded.ColumnNormalizedBanded.default(num_rounds, bands)
  return int(banded.minsep_sensitivity_squared(
      strategy, min_sep, max_participations, n=prefix))


def banded_sensitivity(num_rounds: int, bands: int, min_sep: int,
                       max_participations: int | None, *,
                       prefix: int | None = None) -> float:
  """L2 sensitivity (not squared) of jax-privacy's
  `ColumnNormalizedBanded.default(num_rounds, bands)` for a client that
  takes part at most `max_participations` times (None: as often as
  `min_sep` allows) at least `min_sep` rounds apart.

  `prefix=t`: the sensitivity of the first t rows (the rounds released so
  far), counting the participations in the first t rounds; an upper bound
  (see the module docstring).
  """
  for name, v in (('num_rounds', num_rounds), ('bands', bands),
                  ('min_sep', min_sep)):
    if not (_is_int(v) and v >= 1):
      raise ValueError(f'{name} must be an integer >= 1, got {v!r}.')
  if bands > num_rounds:
    raise ValueError(f'bands={bands} > num_rounds={num_rounds}.')
  if bands > min_sep:
    raise ValueError(_bands_error(bands, min_sep))
  if max_participations is not None and not max_participations >= 1:
    raise ValueError(f'max_participations must be >= 1 (or None), got '
                     f'{max_participations!r}.')
  if prefix is not None and not 1 <= prefix <= num_rounds:
    raise ValueError(f'prefix={prefix} is not in [1, num_rounds='
                     f'{num_rounds}].')
  return math.sqrt(_banded_sensitivity_squared(
      int(num_rounds), int(bands), int(min_sep),
      None if max_participations is None else int(max_participations),
      None if prefix is None else int(prefix)))


def cyclic_participation(population: int, clients_per_round: int,
                         num_rounds: int) -> tuple[int, int]:
  """(min_sep, max_participations) of cyclic sampling: N // K blocks of K,
  round r trains block r mod (N // K), so min_sep = N // K and a client
  trains at most ceil(num_rounds / (N // K)) times."""
  if not 1 <= clients_per_round <= population:
    raise ValueError(f'clients_per_round={clients_per_round} is not in '
                     f'[1, population={population}].')
  if not num_rounds >= 1:
    raise ValueError(f'num_rounds must be >= 1, got {num_rounds!r}.')
  blocks = int(population) // int(clients_per_round)
  return blocks, -(-int(num_rounds) // blocks)


def _check_rounds(schedule: PrivacySchedule, rounds: int) -> int:
  if not (_is_int(rounds) and rounds >= 0):
    raise ValueError(f'rounds must be an integer >= 0, got {rounds!r}.')
  if schedule.mechanism == 'banded' and rounds > schedule.num_rounds:
    raise ValueError(f'rounds={rounds} > num_rounds={schedule.num_rounds}: '
                     'the banded strategy (and its noise) is sized for '
                     'num_rounds rounds.')
  return int(rounds)


def _participations(schedule: PrivacySchedule, rounds: int) -> int:
  """Cyclic: a client's most participations in the first `rounds` rounds."""
  min_sep, _ = cyclic_participation(schedule.population,
                                    int(schedule.clients_per_round), rounds)
  return -(-rounds // min_sep)


def _unit_event(schedule: PrivacySchedule, rounds: int,
                noise_multiplier: float | None = None
                ) -> tuple[dp_accounting.DpEvent, int]:
  """(event, count): the run's first `rounds` rounds are `event` composed
  `count` times. `noise_multiplier` overrides the schedule's (math.inf: the
  count's noise alone)."""
  z = schedule.noise_multiplier if noise_multiplier is None else (
      noise_multiplier)
  zb = schedule.count_noise_multiplier
  if schedule.mechanism == 'banded':
    min_sep, max_part = cyclic_participation(
        schedule.population, int(schedule.clients_per_round),
        schedule.num_rounds)
    sens = lambda t: banded_sensitivity(schedule.num_rounds, schedule.bands,
                                        min_sep, max_part, prefix=t)
    events = []
    if not math.isinf(z):
      events.append(dp_accounting.GaussianDpEvent(
          z * sens(schedule.num_rounds) / sens(rounds)))
    if zb > 0:
      events.append(dp_accounting.SelfComposedDpEvent(
          dp_accounting.GaussianDpEvent(2.0 * zb),
          _participations(schedule, rounds)))
    if len(events) == 1:
      return events[0], 1
    return dp_accounting.ComposedDpEvent(events), 1
  z_eff = (2.0 * zb if math.isinf(z) else
           effective_noise_multiplier(z, zb))
  if schedule.sampling == 'poisson':
    return dp_accounting.PoissonSampledDpEvent(
        schedule.sampling_probability,
        dp_accounting.GaussianDpEvent(z_eff)), rounds
  if schedule.sampling == 'fixed':
    # Replace-one: the sum's sensitivity is 2C (see the module docstring).
    return dp_accounting.SampledWithoutReplacementDpEvent(
        schedule.population, int(schedule.clients_per_round),
        dp_accounting.GaussianDpEvent(z_eff / 2.0)), rounds
  return dp_accounting.GaussianDpEvent(z_eff), _participations(
      schedule, rounds)


def dp_event(schedule: PrivacySchedule, rounds: int) -> dp_accounting.DpEvent:
  """The `DpEvent` of the run's first `rounds` rounds:

    poisson   SelfComposed(PoissonSampled(q, Gaussian(z_eff)), rounds)
    fixed     SelfComposed(SampledWithoutReplacement(N, K,
                           Gaussian(z_eff / 2)), rounds)   (replace-one)
    cyclic    SelfComposed(Gaussian(z_eff), ceil(rounds / (N // K)))
    banded    Gaussian(z s_T / s_rounds) (composed with SelfComposed(
              Gaussian(2σ_b), participations) with adaptive clipping)

  z_eff = `effective_noise_multiplier(z, σ_b)`; see the module docstring.
  """
  rounds = _check_rounds(schedule, rounds)
  if rounds == 0:
    return dp_accounting.NoOpDpEvent()
  event, count = _unit_event(schedule, rounds)
  return event if count == 1 and schedule.mechanism == 'banded' else (
      dp_accounting.SelfComposedDpEvent(event, count))


def make_accountant(schedule: PrivacySchedule
                    ) -> dp_accounting.PrivacyAccountant:
  """A fresh dp-accounting accountant for `schedule` (its kind, relation
  and discretisation)."""
  relation = (_REL.REPLACE_ONE if schedule.sampling == 'fixed' else
              _REL.ADD_OR_REMOVE_ONE)
  if schedule.accountant == 'rdp':
    return dp_accounting.rdp.RdpAccountant(RDP_ORDERS, relation)
  return dp_accounting.pld.PLDAccountant(
      relation, value_discretization_interval=PLD_VALUE_DISCRETIZATION)


def epsilon(schedule: PrivacySchedule, rounds: int) -> float:
  """ε at `schedule.delta` after `rounds` rounds (0 rounds: 0)."""
  rounds = _check_rounds(schedule, rounds)
  if rounds == 0:
    return 0.0
  return float(make_accountant(schedule).compose(
      dp_event(schedule, rounds)).get_epsilon(schedule.delta))


def noise_multiplier_for(target_epsilon: float, schedule: PrivacySchedule,
                         rounds: int) -> float:
  """The smallest noise multiplier z (the schedule's `noise_multiplier`
  field, i.e. z_Δ with adaptive clipping; the schedule's own value is
  ignored) whose ε after `rounds` rounds is <= `target_epsilon` at
  `schedule.delta`: dp-accounting's `calibrate_dp_mechanism` (Brent's
  method, within 1e-5 relative of the optimum, on the safe side)."""
  if not target_epsilon > 0:
    raise ValueError(f'target_epsilon must be > 0, got {target_epsilon!r}.')
  rounds = _check_rounds(schedule, rounds)
  if rounds == 0:
    raise ValueError('rounds must be >= 1 to calibrate a noise multiplier.')
  with_z = lambda z: dataclasses.replace(schedule, noise_multiplier=z)
  eps = lambda z: epsilon(with_z(z), rounds)

  if schedule.count_noise_multiplier > 0:
    event, count = _unit_event(schedule, rounds, math.inf)
    floor = float(make_accountant(schedule).compose(event, count)
                  .get_epsilon(schedule.delta))
    if floor >= target_epsilon:
      raise ValueError(
          f'the clipped count alone (count_noise_multiplier='
          f'{schedule.count_noise_multiplier:g}) spends epsilon {floor:.4g} '
          f'>= target {target_epsilon:g} in {rounds} rounds: raise '
          'count_noise_multiplier or the target.')

  # A bracket [lo, hi] with eps(lo) > target >= eps(hi), by doubling or
  # halving from z = 1 (eps falls with z).
  hi = 1.0
  if eps(hi) > target_epsilon:
    for _ in range(40):
      hi *= 2.0
      if eps(hi) <= target_epsilon:
        break
    else:
      raise ValueError(f'no noise multiplier <= {hi:g} reaches epsilon '
                       f'{target_epsilon:g}.')
    lo = hi / 2.0
  else:
    # Small z make PLD slow (its loss grid grows as 1 / z²): stop at 1/16.
    for _ in range(4):
      lo = hi / 2.0
      if eps(lo) > target_epsilon:
        break
      hi = lo
    else:
      raise ValueError(
          f'target_epsilon={target_epsilon:g} is reached with a noise '
          f'multiplier below {hi:g} (epsilon {eps(hi):.4g}); such a '
          'target is no meaningful guarantee.')
  return float(dp_accounting.calibrate_dp_mechanism(
      lambda: make_accountant(schedule),
      lambda z: dp_event(with_z(z), rounds),
      target_epsilon, schedule.delta,
      bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
      tol=1e-5 * hi))


def rounds_within(target_epsilon: float, schedule: PrivacySchedule,
                  max_rounds: int) -> int:
  """The largest r <= max_rounds (and <= num_rounds for 'banded') with
  epsilon(schedule, r) <= target_epsilon: a binary search (ε grows with
  the rounds)."""
  if not target_epsilon >= 0:
    raise ValueError(f'target_epsilon must be >= 0, got {target_epsilon!r}.')
  if not (_is_int(max_rounds) and max_rounds >= 0):
    raise ValueError(f'max_rounds must be an integer >= 0, got '
                     f'{max_rounds!r}.')
  hi = int(max_rounds)
  if schedule.mechanism == 'banded':
    hi = min(hi, schedule.num_rounds)
  acc = Accountant(schedule)
  if acc.epsilon_at(hi) <= target_epsilon:
    return hi
  lo = 0  # invariant: eps(lo) <= target < eps(hi)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if acc.epsilon_at(mid) <= target_epsilon:
      lo = mid
    else:
      hi = mid
  return lo


class Accountant:
  """Host-side, per run: ε after any number of rounds of one schedule.

    acc = Accountant(schedule)
    acc.epsilon(r)        # ε after r rounds (cached); r is then accounted
    acc.state()           # JSON-able: the schedule's fields and `rounds`
    Accountant.from_state(state)
    acc.summary(r)        # for summary.json

  Fast enough to call every round: with RDP one round's curve is computed
  once and scaled by the rounds (a composition is a sum of RDP curves:
  what `RdpAccountant` does for a `SelfComposedDpEvent`); with PLD one
  round's PLD is built once and self-composed (O(log rounds)
  convolutions, as `PLDAccountant` does). Banded and cyclic runs are one
  Gaussian (cheap) and are computed afresh.
  """

  def __init__(self, schedule: PrivacySchedule, rounds: int = 0):
    if not isinstance(schedule, PrivacySchedule):
      raise ValueError(f'schedule must be a PrivacySchedule, got '
                       f'{type(schedule).__name__}.')
    self.schedule = schedule
    self.rounds = _check_rounds(schedule, rounds)
    self._cache: dict[int, float] = {}
    self._unit: Any = None   # one round's RDP curve or PLD

  def epsilon(self, rounds: int | None = None) -> float:
    """ε after `rounds` rounds (default: the rounds accounted); the rounds
    accounted become max(accounted, rounds)."""
    if rounds is None:
      rounds = self.rounds
    eps = self.epsilon_at(rounds)
    self.rounds = max(self.rounds, int(rounds))
    return eps

  def epsilon_at(self, rounds: int) -> float:
    """ε after `rounds` rounds, without accounting them."""
    rounds = _check_rounds(self.schedule, rounds)
    if rounds not in self._cache:
      self._cache[rounds] = self._compute(rounds)
    return self._cache[rounds]

  def _compute(self, rounds: int) -> float:
    s = self.schedule
    if rounds == 0:
      return 0.0
    if s.mechanism == 'banded' or s.sampling == 'cyclic':
      return epsilon(s, rounds)
    event, count = _unit_event(s, rounds)
    if s.accountant == 'rdp':
      if self._unit is None:
        self._unit = make_accountant(s).compose(event).rdp
      eps, _ = rdp_privacy_accountant.compute_epsilon(
          RDP_ORDERS, count * self._unit, s.delta)
      return float(eps)
    if self._unit is None:  # poisson (fixed is RDP only)
      self._unit = privacy_loss_distribution.from_gaussian_mechanism(
          standard_deviation=event.event.noise_multiplier,
          sampling_prob=event.sampling_probability,
          value_discretization_interval=PLD_VALUE_DISCRETIZATION,
          neighboring_relation=_REL.ADD_OR_REMOVE_ONE)
    return float(self._unit.self_compose(count).get_epsilon_for_delta(
        s.delta))

  def state(self) -> dict:
    """JSON-able: the schedule's fields and the rounds accounted."""
    return dict(dataclasses.asdict(self.schedule), rounds=self.rounds)

  @classmethod
  def from_state(cls, state: dict) -> 'Accountant':
    state = dict(state)
    rounds = state.pop('rounds', 0)
    names = {f.name for f in dataclasses.fields(PrivacySchedule)}
    unknown = sorted(set(state) - names)
    if unknown:
      raise ValueError(f'accountant state has unknown keys {unknown}.')
    try:
      schedule = PrivacySchedule(**state)
    except TypeError as e:
      raise ValueError(f'accountant state is incomplete: {e}.') from None
    return cls(schedule, rounds)

  def summary(self, rounds: int | None = None) -> dict:
    """For summary.json: ε after `rounds` (default: the rounds accounted)
    and what it was computed from (`noise_multiplier` is the schedule's z,
    z_Δ with adaptive clipping; `effective_noise_multiplier` composes the
    count in: Andrew et al.'s one Gaussian per round for 'gaussian', None
    for 'banded' with a count, whose count composes per participation)."""
    if rounds is None:
      rounds = self.rounds
    s = self.schedule
    return dict(
        epsilon=self.epsilon(rounds), delta=s.delta,
        noise_multiplier=s.noise_multiplier,
        sampling_probability=s.sampling_probability, rounds=int(rounds),
        accountant=s.accountant, mechanism=s.mechanism, sampling=s.sampling,
        count_noise_multiplier=s.count_noise_multiplier,
        effective_noise_multiplier=None if (
            s.mechanism == 'banded' and s.count_noise_multiplier > 0) else
        effective_noise_multiplier(s.noise_multiplier,
                                   s.count_noise_multiplier))
