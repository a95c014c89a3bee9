r"""The noise multiplier that keeps a run within a target (ε, δ).

  python launch/noise_multiplier.py --target_epsilon=8 --delta=1e-5 \
      --rounds=1000 --sampling_probability=0.01
  python launch/noise_multiplier.py --target_epsilon=8 --delta=1e-5 \
      --rounds=1000 --sampling_probability=0.01 --population=10000 \
      --sampling=fixed --count_noise_multiplier=5 --json

Prints the smallest noise multiplier z whose ε after --rounds rounds is at
most --target_epsilon at --delta (`privacy.accounting.noise_multiplier_for`:
dp-accounting's calibration) and the ε it reaches. With
--count_noise_multiplier=σ_b (adaptive clipping, Andrew et al. 2021), z is
the noise on the update sum (z_Δ) and `effective_noise_multiplier` is the
total that the update and the clipped count compose to (what
config.privacy.noise_multiplier takes for DP-FedAvg).

  --sampling=poisson  q = --sampling_probability (--population optional)
  --sampling=fixed    K = q N clients per round: --population required,
                      RDP only (replace-one, see privacy/accounting.py)
  --sampling=cyclic   blocks of K = q N (--population required), no
                      amplification; with --mechanism=banded (DP-FTRL),
                      --bands and --num_rounds (default --rounds)

--json prints one JSON object instead: {noise_multiplier,
effective_noise_multiplier, epsilon, delta, rounds, sampling_probability,
population, clients_per_round, sampling, accountant, mechanism, bands,
count_noise_multiplier}. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from absl import app
from absl import flags
from absl import logging

from fedjax_eff.privacy import accounting

_TARGET = flags.DEFINE_float('target_epsilon', None, 'Target ε (> 0).')
_DELTA = flags.DEFINE_float('delta', None, 'δ, in (0, 1).')
_ROUNDS = flags.DEFINE_integer('rounds', None, 'Rounds of training (>= 1).')
_Q = flags.DEFINE_float(
    'sampling_probability', None,
    'q = K / N: a client\'s chance to be in a round (poisson), or the '
    'cohort fraction (fixed, cyclic).')
_POPULATION = flags.DEFINE_integer(
    'population', None, 'N, the training clients (fixed and cyclic: '
    'required).')
_SAMPLING = flags.DEFINE_enum('sampling', 'poisson', accounting.SAMPLING,
                              'How cohorts are drawn.')
_ACCOUNTANT = flags.DEFINE_enum('accountant', 'rdp', accounting.ACCOUNTANTS,
                                'RDP or PLD (dp-accounting).')
_MECHANISM = flags.DEFINE_enum(
    'mechanism', 'gaussian', accounting.MECHANISMS,
    'gaussian (DP-FedAvg) or banded (DP-FTRL, cyclic sampling).')
_BANDS = flags.DEFINE_integer('bands', 1, 'Banded: the bands b.')
_NUM_ROUNDS = flags.DEFINE_integer(
    'num_rounds', None, 'Banded: the rounds the strategy is sized for '
    '(default --rounds).')
_COUNT_Z = flags.DEFINE_float(
    'count_noise_multiplier', 0.0, 'σ_b, the noise std on the clipped count '
    'of adaptive clipping (0: a fixed clip).')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON line.')

_REQUIRED = ('target_epsilon', 'delta', 'rounds', 'sampling_probability')


def fail(message: str, code: int = 2):
  """One line on stderr, then exit `code`."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr,
        flush=True)
  sys.exit(code)


def parse_flags(argv):
  """absl parsing; a bad flag is one error line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    fail(lines[0] if lines else 'bad flags')


def schedule_from(q: float, population: int | None, *, sampling: str,
                  delta: float, accountant: str, mechanism: str, bands: int,
                  num_rounds: int, count_noise_multiplier: float
                  ) -> accounting.PrivacySchedule:
  """The schedule the flags describe (the noise multiplier a placeholder)."""
  if not 0 < q <= 1:
    raise ValueError(f'--sampling_probability must be in (0, 1], got {q!r}.')
  if population is None:
    if sampling != 'poisson':
      raise ValueError(f'--sampling={sampling} needs --population (the '
                       'clients K = q N per round depend on it).')
    population, k = 1, q  # only q matters to poisson accounting
  else:
    k = q * population
    if sampling != 'poisson':
      if abs(k - round(k)) > 1e-6 * max(1.0, k):
        raise ValueError(
            f'--sampling_probability x --population = {k:g} is not a whole '
            f'number of clients per round ({sampling} sampling).')
      k = int(round(k))
  return accounting.PrivacySchedule(
      noise_multiplier=1.0, sampling=sampling, population=population,
      clients_per_round=k, delta=delta, accountant=accountant,
      mechanism=mechanism, bands=bands, num_rounds=num_rounds,
      count_noise_multiplier=count_noise_multiplier)


def calibrate(target_epsilon: float, rounds: int,
              schedule: accounting.PrivacySchedule) -> dict:
  """The noise multiplier for the target and what it reaches."""
  z = accounting.noise_multiplier_for(target_epsilon, schedule, rounds)
  s = dataclasses.replace(schedule, noise_multiplier=z)
  effective = accounting.effective_noise_multiplier(
      z, s.count_noise_multiplier)
  if s.mechanism == 'banded' and s.count_noise_multiplier > 0:
    effective = None  # the count composes per participation: no one total
  return dict(
      noise_multiplier=z, effective_noise_multiplier=effective,
      epsilon=accounting.epsilon(s, rounds), delta=s.delta, rounds=rounds,
      sampling_probability=s.sampling_probability,
      population=s.population, clients_per_round=s.clients_per_round, sampling=s.sampling,
      accountant=s.accountant, mechanism=s.mechanism, bands=s.bands,
      count_noise_multiplier=s.count_noise_multiplier)


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:  # quiet libraries (jax) by default
    logging.set_verbosity(logging.WARNING)
  missing = [f'--{n}' for n in _REQUIRED if flags.FLAGS[n].value is None]
  if missing:
    fail(f'missing {", ".join(missing)} (see --help).')
  try:
    schedule = schedule_from(
        _Q.value, _POPULATION.value, sampling=_SAMPLING.value,
        delta=_DELTA.value, accountant=_ACCOUNTANT.value,
        mechanism=_MECHANISM.value, bands=_BANDS.value,
        num_rounds=(_NUM_ROUNDS.value or _ROUNDS.value
                    if _MECHANISM.value == 'banded' else 0),
        count_noise_multiplier=_COUNT_Z.value)
    out = calibrate(_TARGET.value, _ROUNDS.value, schedule)
    if _POPULATION.value is None:  # poisson without N: only q is known
      out.update(population=None, clients_per_round=None)
  except ValueError as e:
    fail(str(e))
  if _JSON.value:
    print(json.dumps(out))
    return
  z, eff = out['noise_multiplier'], out['effective_noise_multiplier']
  what = f'noise_multiplier {z:.6g}'
  if out['count_noise_multiplier'] > 0:
    what += (f' on the update sum (count noise '
             f'{out["count_noise_multiplier"]:g}' +
             (f'; effective {eff:.6g})' if eff is not None else ')'))
  print(f'{what}: epsilon {out["epsilon"]:.6g} at delta {out["delta"]:g} '
        f'after {out["rounds"]} rounds ({out["sampling"]} sampling, '
        f'q={out["sampling_probability"]:.6g}, {out["mechanism"]}'
        + (f' b={out["bands"]}' if out['mechanism'] == 'banded' else '')
        + f', {out["accountant"]})')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
