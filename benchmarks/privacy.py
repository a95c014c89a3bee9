"""Accuracy against epsilon: DP-FedAvg at three noise levels and banded
DP-FTRL, against the same run without privacy, on Fashion-MNIST over 3,000
clients (`configs/dp_fedavg.py`).

Arms (every one: uniform client weights, adaptive clipping to the median
update norm with count noise σ_b = K / 20, server momentum 0.9, the same
rounds; 3 seeds each):

  nonprivate   no clipping, no noise (Poisson sampling, weights as the DP
               arms): the ceiling
  z=<z>        DP-FedAvg, Poisson sampling q = K / N, total noise
               multiplier z (update and count composed: Andrew et al.
               2021), ε from dp-accounting's RDP accountant
  dp_ftrl      banded DP-FTRL (Choquette-Choo et al. 2023; jax-privacy's
               banded strategy, bands = N // K), cyclic sampling, no
               amplification; its update noise multiplier is calibrated so
               that its final ε equals that of the middle z

Each arm's server learning rate is tuned on seed 0 over `--server_lrs`
(best final test accuracy), then the three seeds run at it. Chance is
10%; the non-private arm is the ceiling at this model and round count.
Prints a table (accuracy mean ± sd, ε at δ = 1e-5) and draws accuracy
against ε.

  python benchmarks/privacy.py            # ~25 min on 2 busy cores
  python benchmarks/privacy.py --quick    # 1 seed, 5 rounds
  python benchmarks/privacy.py --replot

Writes benchmarks/results/privacy.{json,png}; the last line printed is the
JSON's headline: per arm the accuracy mean and sd, epsilon and the noise
multiplier.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import ml_collections

from fedjax_eff.experiment import train as train_lib
from fedjax_eff.privacy import accounting

import study  # pylint: disable=g-import-not-at-top  (benchmarks/study.py)



def base_config(args):
  return study.quiet_config('dp_fedavg', rounds=args.rounds,
                            eval_every=args.rounds)


def arm_config(base, arm: str, z_ftrl: float | None = None):
  c = ml_collections.ConfigDict(base.to_dict())
  if arm == 'nonprivate':
    c.privacy.mechanism = 'none'
  elif arm == 'dp_ftrl':
    c.privacy.mechanism = 'banded'
    c.sampling = 'cyclic'
    c.privacy.noise_multiplier = z_ftrl
  else:
    c.privacy.noise_multiplier = float(arm.split('=')[1])
  return c


def ftrl_noise(base, target_epsilon: float) -> float:
  """The banded arm's update noise multiplier whose final ε (with the
  clipped count composed) equals `target_epsilon`."""
  n, k = base.data.num_clients, base.clients_per_round
  schedule = accounting.PrivacySchedule(
      noise_multiplier=1.0, sampling='cyclic', population=n,
      clients_per_round=k, delta=base.privacy.delta, mechanism='banded',
      bands=min(n // k, base.num_rounds), num_rounds=base.num_rounds,
      count_noise_multiplier=k / 20)
  return accounting.noise_multiplier_for(target_epsilon, schedule,
                                         base.num_rounds)


def run(c, workdir: str) -> dict:
  shutil.rmtree(workdir, ignore_errors=True)
  s = train_lib.train_and_evaluate(c, workdir)
  m = s['final_metrics']
  return dict(test_accuracy=float(m['test_accuracy']),
              epsilon=(s['privacy']['epsilon'] if 'privacy' in s else None),
              noise_multiplier=(s['privacy']['noise_multiplier']
                                if 'privacy' in s else 0.0),
              clip_norm=(s['privacy']['clip_norm'] if 'privacy' in s
                         else None),
              seconds=s['wall_time_seconds'])


def summarize(out: dict) -> dict:
  head = {}
  for arm, row in out['arms'].items():
    acc = [v['test_accuracy'] for v in row['seeds'].values()]
    eps = [v['epsilon'] for v in row['seeds'].values()]
    head[arm] = dict(
        accuracy_mean=round(statistics.mean(acc), 4),
        accuracy_sd=round(statistics.stdev(acc), 4) if len(acc) > 1 else 0.0,
        epsilon=None if eps[0] is None else round(eps[0], 3),
        server_lr=row['server_lr'],
        noise_multiplier=round(row['seeds']['0']['noise_multiplier'], 4)
        if '0' in row['seeds'] else None)
  return head


def plot(out: dict, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  head = out['headline']
  fig, ax = plt.subplots(figsize=(6, 4.2))
  dp = [(a, h) for a, h in head.items() if a.startswith('z=')]
  ax.errorbar([h['epsilon'] for _, h in dp],
              [h['accuracy_mean'] for _, h in dp],
              yerr=[h['accuracy_sd'] for _, h in dp], marker='o', capsize=3,
              label='DP-FedAvg (Poisson, RDP)')
  for a, h in dp:
    ax.annotate(a, (h['epsilon'], h['accuracy_mean']),
                textcoords='offset points', xytext=(5, -12), fontsize=8)
  if 'dp_ftrl' in head:
    h = head['dp_ftrl']
    ax.errorbar([h['epsilon']], [h['accuracy_mean']],
                yerr=[h['accuracy_sd']], marker='s', capsize=3,
                label='banded DP-FTRL (cyclic, no amplification)')
  if 'nonprivate' in head:
    h = head['nonprivate']
    ax.axhline(h['accuracy_mean'], color='gray', ls='--',
               label=f"no privacy ({h['accuracy_mean']:.3f})")
  ax.axhline(0.1, color='k', ls=':', lw=0.8, label='chance')
  ax.set_xscale('log')
  ax.set_xlabel(f"epsilon at delta = {out['meta']['delta']:g}")
  ax.set_ylabel('test accuracy')
  ax.set_title(f"Fashion-MNIST, {out['meta']['clients']} clients, "
               f"{out['meta']['per_round']} per round, "
               f"{out['meta']['rounds']} rounds\n(mean ± sd over "
               f"{out['meta']['seeds']} seeds)", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  study.common_flags(p, 'privacy', '/tmp/fedjax_eff_privacy')
  p.add_argument('--rounds', type=int, default=200)
  p.add_argument('--noise', default='0.5,1.0,2.0',
                 help='total noise multipliers of the DP-FedAvg arms')
  args = p.parse_args()
  if args.replot:
    return study.replot(args.out, plot)
  if args.quick:
    args.seeds, args.rounds, args.server_lrs = 1, 5, '1.0'
    if args.out == p.get_default('out'):
      args.out += '_quick'
  t0 = time.time()
  study.compile_cache(args.workdir)
  base = base_config(args)
  noise = [float(z) for z in args.noise.split(',')]
  middle = sorted(noise)[len(noise) // 2]
  arms = ['nonprivate'] + [f'z={z:g}' for z in noise] + ['dp_ftrl']
  out = {'meta': study.meta(
      rounds=args.rounds, seeds=args.seeds, clients=base.data.num_clients,
      per_round=base.clients_per_round, delta=base.privacy.delta,
      server_lrs=args.server_lrs), 'arms': {}}
  print(f'jax {jax.__version__} on {jax.default_backend()}, '
        f'{os.cpu_count()} cpus; {args.rounds} rounds, {args.seeds} seeds',
        flush=True)
  z_ftrl = None
  for arm in arms:
    if arm == 'dp_ftrl':
      target = out['arms'][f'z={middle:g}']['seeds']['0']['epsilon']
      z_ftrl = ftrl_noise(base, target)
      print(f'dp_ftrl: update noise multiplier {z_ftrl:.4f} for epsilon '
            f'{target:.3f}', flush=True)
    t_arm = time.time()
    row = study.tuned_arm(arm_config(base, arm, z_ftrl), args.server_lrs,
                          args.seeds, run, 'test_accuracy',
                          os.path.join(args.workdir, arm))
    out['arms'][arm] = row
    acc, sd = study.mean_sd(row, 'test_accuracy')
    eps = row['seeds']['0']['epsilon']
    print(f"{arm:11s} server lr {row['server_lr']:g}: accuracy {acc:.4f} "
          f"(sd {sd:.4f}); epsilon {'-' if eps is None else f'{eps:.3f}'}  "
          f'({time.time() - t_arm:.0f} s)', flush=True)
  study.finish(out, args.out, plot, summarize, t0)


if __name__ == '__main__':
  main()
