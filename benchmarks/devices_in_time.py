"""Accuracy against simulated hours: synchronous FedAvg, over-selection, a
deadline, and FedBuff, on the same simulated phones (issue 20 item 4).

`configs/fedbuff.py`:
- data and model: Fashion-MNIST over 500 clients, an MLP 784-128-10, 5
  local steps of 20;
- devices: the parametric phone/IoT classes, always online, jitter 0.2.
Each client's time comes from its profile and the compiled program's cost.

Arms:
- `sync`: K = 20 per round; the round waits for the slowest.
- `over_selection`: 26 sampled, the first 20 to finish aggregated
  (Bonawitz et al. 2019).
- `deadline`: over-selection, plus a deadline at the 80th percentile of
  the clients' times (late clients dropped).
- `fedbuff`: 40 clients in flight; the server steps on every 10 arrivals,
  staleness-weighted 1/sqrt(1+τ) (Nguyen et al. 2022).

Every arm gets the same simulated-time budget H: the time `--sync_rounds`
synchronous rounds take on seed 0. Each arm runs enough rounds to pass H,
estimated from a host-only simulation of its clock with a margin; a run
that falls short says so (`reached_budget`). Accuracy is read at H by linear
interpolation of the evaluations against `sim_hours`. Each arm's server
learning rate is tuned over `--server_lrs` on seed 0 (accuracy at H);
seeds 1 and 2 run at the best one.

  python benchmarks/devices_in_time.py          # ~20 min on 2 busy cores
  python benchmarks/devices_in_time.py --quick  # 1 seed, a short budget
  python benchmarks/devices_in_time.py --replot

Writes benchmarks/results/devices_in_time.{json,png}. The last line printed
is the JSON's headline: per arm, the accuracy at H (mean and sd), rounds
to H, simulated seconds per round, and updates aggregated per simulated
hour.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import ml_collections
import numpy as np

from fedjax_eff.devices import timing
from fedjax_eff.experiment import build
from fedjax_eff.experiment import train as train_lib
from fedjax_eff.experiment.metrics import read_metrics

import study  # pylint: disable=g-import-not-at-top  (benchmarks/study.py)

ARMS = ('sync', 'over_selection', 'deadline', 'fedbuff')


def base_config(args):
  c = study.quiet_config('fedbuff', rounds=10 ** 6, eval_every=args.eval_every)
  c.accounting = True  # (device cost sets the clients' times)
  return c


def arm_config(base, arm: str, deadline: float):
  c = ml_collections.ConfigDict(base.to_dict())
  if arm != 'fedbuff':
    c.mode = 'federated'
  if arm in ('over_selection', 'deadline'):
    c.devices.over_selection = 0.3
  if arm == 'deadline':
    c.devices.deadline_seconds = deadline
  return c


def client_time_percentile(base, q: float) -> float:
  """The q-th percentile of every training client's time (no jitter)."""
  c = ml_collections.ConfigDict(base.to_dict())
  c.mode = 'federated'
  exp = build.Experiment(c)
  cost = exp.program_cost(0, 0)
  seconds = timing.client_seconds(
      exp.device_time.profiles, None, download_bits=cost.download_bits,
      upload_bits=cost.upload_bits, flops=cost.flops_per_round)
  return float(np.percentile(seconds, q))


def seconds_per_round(c, rounds: int = 50) -> float:
  """Simulated seconds per round from the arm's clock alone (host only:
  no training). FedBuff: M arrivals of P in flight, each client's time
  drawn as the synchronous plan draws it."""
  exp = build.Experiment(ml_collections.ConfigDict(
      dict(c.to_dict(), mode='federated')))
  dt = exp.device_time
  if c.mode == 'fedbuff':
    cost = exp.program_cost(0, 0)
    s = timing.client_seconds(dt.profiles, None,
                              download_bits=cost.download_bits,
                              upload_bits=cost.upload_bits,
                              flops=cost.flops_per_round)
    return float(np.mean(s)) * c.fedbuff.buffer_size / c.fedbuff.concurrency
  for r in range(rounds):
    dt.round(r)
  return dt.clock[rounds] / rounds


def accuracy_at(rows, hours: float) -> float:
  ev = [(r['sim_hours'], r['test_accuracy']) for r in rows
        if 'test_accuracy' in r]
  h = [0.0] + [x for x, _ in ev]
  a = [0.1] + [y for _, y in ev]  # chance at hour 0
  return float(np.interp(hours, h, a))


def run(c, workdir: str, hours: float) -> dict:
  shutil.rmtree(workdir, ignore_errors=True)
  s = train_lib.train_and_evaluate(c, workdir)
  rows = read_metrics(workdir)
  ev = [(r['sim_hours'], r['test_accuracy']) for r in rows
        if 'test_accuracy' in r]
  return dict(accuracy_at_budget=accuracy_at(rows, hours),
              reached_budget=bool(ev and ev[-1][0] >= hours),
              final_sim_hours=rows[-1]['sim_hours'], rounds=len(rows),
              curve=ev, seconds=s['wall_time_seconds'],
              updates=float(sum(r['num_clients'] for r in rows)))


def summarize(out: dict) -> dict:
  head = {}
  for arm, row in out['arms'].items():
    acc = [v['accuracy_at_budget'] for v in row['seeds'].values()]
    s0 = row['seeds']['0']
    head[arm] = dict(
        accuracy_at_budget_mean=round(statistics.mean(acc), 4),
        accuracy_at_budget_sd=round(statistics.stdev(acc), 4)
        if len(acc) > 1 else 0.0,
        rounds=row['rounds'], server_lr=row['server_lr'],
        sim_seconds_per_round=round(s0['final_sim_hours'] * 3600
                                    / s0['rounds'], 3),
        updates_per_sim_hour=round(s0['updates'] / s0['final_sim_hours'], 1),
        reached_budget=all(v['reached_budget']
                           for v in row['seeds'].values()))
  head['budget_sim_hours'] = round(out['meta']['budget_hours'], 4)
  return head


def plot(out: dict, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  hours = out['meta']['budget_hours']
  grid = np.linspace(0, hours, 60)
  fig, ax = plt.subplots(figsize=(6.2, 4.2))
  for arm, row in out['arms'].items():
    curves = []
    for v in row['seeds'].values():
      h = [0.0] + [x for x, _ in v['curve']]
      a = [0.1] + [y for _, y in v['curve']]
      curves.append(np.interp(grid, h, a))
    curves = np.asarray(curves)
    mean, sd = curves.mean(0), curves.std(0)
    h = out['headline'][arm]
    line, = ax.plot(grid * 60, mean, label=(
        f"{arm} (lr {row['server_lr']:g}; {h['sim_seconds_per_round']:.2f} "
        f"s/round)"))
    ax.fill_between(grid * 60, mean - sd, mean + sd, alpha=0.2,
                    color=line.get_color())
  ax.axhline(0.1, color='k', ls=':', lw=0.8, label='chance')
  ax.set_xlabel('simulated minutes')
  ax.set_ylabel('test accuracy')
  ax.set_title('Fashion-MNIST, MLP, parametric phones: accuracy against '
               f"simulated time\n(mean ± sd over {out['meta']['seeds']} "
               'seeds)', fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  study.common_flags(p, 'devices_in_time', '/tmp/fedjax_eff_devices_in_time')
  p.add_argument('--sync_rounds', type=int, default=60,
                 help='the budget: simulated time of this many sync rounds')
  p.add_argument('--eval_every', type=int, default=10)
  args = p.parse_args()
  if args.replot:
    return study.replot(args.out, plot)
  if args.quick:
    args.seeds, args.sync_rounds, args.server_lrs = 1, 10, '1.0'
    args.eval_every = 5
    if args.out == p.get_default('out'):
      args.out += '_quick'
  t0 = time.time()
  study.compile_cache(args.workdir)
  base = base_config(args)
  deadline = client_time_percentile(base, 80)
  sync = arm_config(base, 'sync', deadline)
  hours = seconds_per_round(sync, args.sync_rounds) * args.sync_rounds / 3600
  out = {'meta': study.meta(
      sync_rounds=args.sync_rounds, budget_hours=hours, deadline=deadline,
      seeds=args.seeds, server_lrs=args.server_lrs), 'arms': {}}
  print(f'jax {jax.__version__} on {jax.default_backend()}; budget '
        f'{hours * 60:.2f} simulated minutes ({args.sync_rounds} sync '
        f'rounds); deadline {deadline:.3f} s', flush=True)
  for arm in ARMS:
    c = arm_config(base, arm, deadline)
    per = seconds_per_round(c)
    e = args.eval_every
    margin = 1.3 if arm == 'fedbuff' else 1.15  # (its estimate is rough)
    c.num_rounds = int(math.ceil(hours * 3600 / per * margin / e)) * e + e
    t_arm = time.time()
    row = study.tuned_arm(c, args.server_lrs, args.seeds,
                          lambda c, wd: run(c, wd, hours),
                          'accuracy_at_budget',
                          os.path.join(args.workdir, arm))
    row['rounds'] = c.num_rounds
    out['arms'][arm] = row
    acc, sd = study.mean_sd(row, 'accuracy_at_budget')
    print(f"{arm:15s} lr {row['server_lr']:g}, {c.num_rounds} rounds: "
          f'accuracy at the budget {acc:.4f} (sd {sd:.4f}); '
          f"{row['seeds']['0']['final_sim_hours'] * 60:.2f} simulated min "
          f'({time.time() - t_arm:.0f} s)', flush=True)
  study.finish(out, args.out, plot, summarize, t0)


if __name__ == '__main__':
  main()
