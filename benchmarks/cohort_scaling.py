"""Accuracy and rounds-to-target against the cohort size K under three
server learning-rate rules: the shape of Charles et al. 2021 ("On
Large-Cohort Training for Federated Learning") on Fashion-MNIST, offline
(issue 22 item 3).

Setup: `configs/cohort_scaling.py` (2,000 Dirichlet(0.5) clients of ~30
images, an MLP 784-64-10, 3 local SGD steps of 10 at lr 0.1, server
FedAvg). The grid is K in `--cohorts` x rule in `--rules` x `--seeds`
seeds, each cell an ordinary run of `train_and_evaluate` for `--rounds`
rounds with test accuracy every 5 rounds. The rules set the server lr from
a base lr and K0 = `server.lr_reference_clients` = 10:

  none     base                    (a constant server lr)
  sqrt     base x sqrt(K / K0)
  linear   base x K / K0

Tuning: the base lr is chosen once, on seed 0 at K = K0 over
`--server_lrs` (score: mean test accuracy of the last 4 evaluations). At
K = K0 the three rules give the same server lr, so tuning "per rule at
the reference cohort" picks the same base for every rule; the K0 runs are
run once and shared by the three rules. Seeds change the model's
initialisation and the cohorts drawn, not the partition (data.seed = 0).

Read from each run's metrics.jsonl:
  final accuracy       test accuracy after the last round
  accuracy at budget   test accuracy at round `--budget_round`
  rounds to target     the first evaluated round with test accuracy >=
                       `--target` (None: not reached within the run)
A run that stops (RunFailed: non-finite updates for max_failed_rounds
rounds) is kept with its status and the evaluations it made. Finished
cells in --workdir are read, not retrained (the same command resumes).

`--probe_lrs 2,3,5` adds the constant rule at those server lrs (seed 0,
K in `--probe_cohorts`): is the largest stable server lr a function of K?

  python benchmarks/cohort_scaling.py            # ~30 min on 2 busy cores
  python benchmarks/cohort_scaling.py --quick    # 1 seed, K 10 and 100
  python benchmarks/cohort_scaling.py --replot

Writes benchmarks/results/cohort_scaling.{json,png} (--quick: under its
--workdir); the last line printed is the JSON's headline: per rule and K,
final accuracy and accuracy at the budget (mean, sd), rounds to target
(mean, sd over the seeds that reached it, and how many did).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import ml_collections

from fedjax_eff.experiment import build
from fedjax_eff.experiment import errors
from fedjax_eff.experiment import sweep
from fedjax_eff.experiment import train as train_lib
from fedjax_eff.experiment.metrics import read_metrics

import study  # pylint: disable=g-import-not-at-top  (benchmarks/study.py)

RESULTS = os.path.join(ROOT, 'benchmarks', 'results')
RULES = ('none', 'sqrt', 'linear')
LAST_EVALS = 4  # the tuning score: mean of this many last evaluations


def git_state() -> dict:
  """HEAD and the files that differ from it (the tree the runs import)."""
  def git(*a):
    try:
      return subprocess.run(('git', '-C', ROOT) + a, capture_output=True,
                            text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ''
  return dict(commit=git('rev-parse', 'HEAD'),
              modified=git('diff', '--name-only', 'HEAD').split())


def base_config(args):
  return study.quiet_config('cohort_scaling', rounds=args.rounds,
                            eval_every=args.eval_every)


def cell_config(base, k: int, rule: str, lr: float, seed: int):
  c = ml_collections.ConfigDict(base.to_dict())
  c.clients_per_round = k
  c.server.lr_scaling = rule
  c.server.learning_rate = lr
  c.seed = seed
  return c


def read_run(workdir: str, args, status: str, seconds: float) -> dict:
  """The run's evaluations and what the study reads from them."""
  records = read_metrics(workdir)
  evals = [(r['round'], float(r['test_accuracy'])) for r in records
           if isinstance(r.get('test_accuracy'), (int, float))]
  finite = all(math.isfinite(float(r.get('train_loss', 0.0)))
               for r in records)
  by_round = dict(evals)
  reached = [r for r, a in evals if a >= args.target]
  last = [a for _, a in evals[-LAST_EVALS:]]
  done = records[-1]['round'] if records else 0
  return dict(
      status=status,
      rounds_done=done,
      final_accuracy=(by_round.get(args.rounds) if done == args.rounds
                      else None),
      accuracy_at_budget=by_round.get(args.budget_round),
      rounds_to_target=reached[0] if reached else None,
      score=statistics.mean(last) if last and done == args.rounds else 0.0,
      finite_loss=finite,
      max_train_loss=max((float(r['train_loss']) for r in records
                          if math.isfinite(float(r.get('train_loss', 0.0)))),
                         default=None),
      evals=evals,
      seconds=seconds)


def run(c, workdir: str, args) -> dict:
  """Trains the cell (skipped when `workdir` holds it finished) and reads
  its metrics."""
  t0 = time.time()
  status = 'ok'
  before = sweep.finished(workdir, c)
  if before is None:
    shutil.rmtree(workdir, ignore_errors=True)
    try:
      train_lib.train_and_evaluate(c, workdir)
    except (errors.RunFailed, errors.RunRefused) as e:
      status = f'{type(e).__name__}: ' + ' '.join(str(e).split())[:200]
  # A cell finished by an earlier invocation keeps its own run's wall time.
  seconds = (time.time() - t0 if before is None
             else float(before.get('wall_time_seconds') or 0.0))
  out = read_run(workdir, args, status, seconds)
  out['server_lr'] = build.server_learning_rate(c)
  out['reused'] = before is not None
  return out


def _fmt_acc(v):
  return '-' if v is None else f'{v:.4f}'


def log_run(tag: str, r: dict):
  rtt = r['rounds_to_target']
  print(f"{tag}: server lr {r['server_lr']:g}, final "
        f"{_fmt_acc(r['final_accuracy'])}, at budget "
        f"{_fmt_acc(r['accuracy_at_budget'])}, to target "
        f"{'not reached' if rtt is None else rtt}"
        f"{'' if r['status'] == 'ok' else ', ' + r['status']} "
        f"({r['seconds']:.0f} s)", flush=True)


def _mean_sd(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return (statistics.mean(values),
          statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(out: dict) -> dict:
  head = {'base_server_lr': out['base_server_lr'],
          'target': out['meta']['target'],
          'budget_round': out['meta']['budget_round'],
          'rounds': out['meta']['rounds'], 'rules': {}}
  for rule, by_k in out['runs'].items():
    rows = {}
    for k, seeds in by_k.items():
      runs = list(seeds.values())
      fm, fs = _mean_sd([r['final_accuracy'] for r in runs])
      bm, bs = _mean_sd([r['accuracy_at_budget'] for r in runs])
      reached = [r['rounds_to_target'] for r in runs
                 if r['rounds_to_target'] is not None]
      tm, ts = _mean_sd(reached)
      rows[k] = dict(
          server_lr=runs[0]['server_lr'],
          final_mean=None if fm is None else round(fm, 4),
          final_sd=None if fs is None else round(fs, 4),
          budget_mean=None if bm is None else round(bm, 4),
          budget_sd=None if bs is None else round(bs, 4),
          rounds_to_target_mean=None if tm is None else round(tm, 1),
          rounds_to_target_sd=None if ts is None else round(ts, 1),
          reached=f'{len(reached)}/{len(runs)}',
          failed=sum(r['status'] != 'ok' for r in runs))
    head['rules'][rule] = rows
  if out.get('probe'):
    head['probe_constant_lr_seed0'] = {
        k: {lr: dict(final=r['final_accuracy'],
                     at_budget=r['accuracy_at_budget'],
                     rounds_to_target=r['rounds_to_target'])
            for lr, r in by_lr.items()}
        for k, by_lr in out['probe'].items()}
  return head


def plot(out: dict, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  head, meta = out['headline'], out['meta']
  colors = {'none': 'tab:blue', 'sqrt': 'tab:orange', 'linear': 'tab:red'}
  label = {'none': 'constant (none)', 'sqrt': 'sqrt(K/10)',
           'linear': 'linear K/10'}
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
  ks_all = set()
  for rule, rows in head['rules'].items():
    ks = sorted(int(k) for k in rows)
    ks_all.update(ks)
    col = colors.get(rule)
    pts = [(k, rows[str(k)]) for k in ks]
    fin = [(k, h) for k, h in pts if h['final_mean'] is not None]
    ax1.errorbar([k for k, _ in fin], [h['final_mean'] for _, h in fin],
                 yerr=[h['final_sd'] for _, h in fin], color=col,
                 marker='o', capsize=3,
                 label=f"{label.get(rule, rule)}, round {meta['rounds']}")
    bud = [(k, h) for k, h in pts if h['budget_mean'] is not None]
    ax1.errorbar([k for k, _ in bud], [h['budget_mean'] for _, h in bud],
                 yerr=[h['budget_sd'] for _, h in bud], color=col,
                 marker='s', ls='--', capsize=3, alpha=0.7, mfc='none',
                 label=f"{label.get(rule, rule)}, round "
                 f"{meta['budget_round']}")
    got = [(k, h) for k, h in pts if h['rounds_to_target_mean'] is not None]
    ax2.errorbar([k for k, _ in got],
                 [h['rounds_to_target_mean'] for _, h in got],
                 yerr=[h['rounds_to_target_sd'] for _, h in got], color=col,
                 marker='o', capsize=3, label=label.get(rule, rule))
    for k, h in got:
      n, total = h['reached'].split('/')
      if n != total:
        ax2.annotate(h['reached'], (k, h['rounds_to_target_mean']),
                     textcoords='offset points', xytext=(4, 4), fontsize=7,
                     color=col)
    lift = 1.2 + 0.15 * list(colors).index(rule) if rule in colors else 1.2
    for k, h in pts:
      if h['rounds_to_target_mean'] is None:  # no seed reached the target
        ax2.scatter([k], [meta['rounds'] * lift], marker='x', color=col)
  ref = head['rules'].get('none', {}).get(str(min(ks_all)))
  if ref and ref['rounds_to_target_mean']:
    k0, r0 = min(ks_all), ref['rounds_to_target_mean']
    xs = sorted(ks_all)
    ax2.plot(xs, [r0 * k0 / k for k in xs], color='gray', ls=':', lw=1,
             label='ideal: rounds ∝ 1/K')
  ax2.axhline(meta['rounds'], color='k', lw=0.6, ls='--')
  ax2.text(min(ks_all), meta['rounds'] * 1.35,
           f"× = not reached in {meta['rounds']} rounds", fontsize=7,
           va='center')
  ax2.set_ylim(meta['eval_every'] / 2, meta['rounds'] * 2)
  ax1.axhline(0.1, color='k', ls=':', lw=0.8)
  for ax in (ax1, ax2):
    ax.set_xscale('log')
    ax.set_xticks(sorted(ks_all), [str(k) for k in sorted(ks_all)])
    ax.minorticks_off()
    ax.set_xlabel('clients per round K')
    ax.grid(alpha=0.3)
  ax2.set_yscale('log')
  ax1.set_ylabel('test accuracy (mean ± sd over seeds)')
  ax2.set_ylabel(f"rounds to test accuracy ≥ {meta['target']:g}")
  ax1.set_title(f"Fashion-MNIST, {meta['clients']} Dirichlet(0.5) clients, "
                f"base server lr {out['base_server_lr']:g}", fontsize=9)
  ax2.set_title(f"first evaluation (every {meta['eval_every']} rounds) at "
                f"≥ {meta['target']:g}; {meta['seeds']} seeds", fontsize=9)
  ax1.legend(fontsize=6.5, ncol=1)
  ax2.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true',
                 help='1 seed, 20 rounds, K 10 and 100, base lr 1')
  p.add_argument('--cohorts', default='10,30,100,300,1000')
  p.add_argument('--rules', default=','.join(RULES))
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--rounds', type=int, default=200)
  p.add_argument('--eval_every', type=int, default=5)
  p.add_argument('--budget_round', type=int, default=50,
                 help='the fixed round budget accuracy is also read at')
  p.add_argument('--target', type=float, default=0.75)
  p.add_argument('--server_lrs', default='0.5,1.0,2.0',
                 help='base server lrs tried on seed 0 at K = K0')
  p.add_argument('--probe_lrs', default='',
                 help='also: the constant rule at these server lrs, seed 0, '
                 'at --probe_cohorts (is the largest stable lr a function '
                 'of K?)')
  p.add_argument('--probe_cohorts', default='30,1000')
  p.add_argument('--workdir', default='/tmp/fedjax_eff_cohort')
  p.add_argument('--out', default=os.path.join(RESULTS, 'cohort_scaling'))
  p.add_argument('--replot', action='store_true')
  args = p.parse_args()
  if args.replot:
    return study.replot(args.out, plot)
  if args.quick:
    args.seeds, args.rounds, args.server_lrs = 1, 20, '1.0'
    args.cohorts, args.budget_round, args.target = '10,100', 10, 0.6
    if args.out == p.get_default('out'):
      args.out = os.path.join(args.workdir, 'cohort_scaling_quick')
  t0 = time.time()
  load0 = os.getloadavg()
  study.compile_cache(args.workdir)
  base = base_config(args)
  k0 = base.server.lr_reference_clients
  cohorts = [int(k) for k in args.cohorts.split(',')]
  rules = args.rules.split(',')
  for rule in rules:
    if rule not in RULES:
      p.error(f'--rules: {rule!r} is not one of {RULES}')
  out = {'meta': study.meta(
      rounds=args.rounds, seeds=args.seeds, cohorts=cohorts, rules=rules,
      clients=base.data.num_clients, reference_clients=k0,
      eval_every=args.eval_every, budget_round=args.budget_round,
      target=args.target, server_lrs=args.server_lrs,
      client_lr=base.client.learning_rate,
      local_steps=base.client.local_steps, batch=base.client.batch_size,
      model=f'{base.model.name} {tuple(base.model.kwargs.hidden)}',
      loadavg_start=[round(x, 2) for x in load0], git=git_state()),
         'runs': {rule: {} for rule in rules}}
  print(f'jax {jax.__version__} on {jax.default_backend()}, '
        f'{os.cpu_count()} cpus; K {cohorts} x {rules} x {args.seeds} seeds, '
        f'{args.rounds} rounds, load {load0[0]:.2f}', flush=True)

  # The base server lr: seed 0 at K0, where every rule gives the same lr
  # (study.tuned_arm then runs seeds 1.. at the best).
  c = cell_config(base, k0, rules[0], 1.0, 0)
  row = study.tuned_arm(
      c, args.server_lrs, args.seeds,
      lambda cfg, wd: run(cfg, wd, args), 'score',
      os.path.join(args.workdir, f'K{k0}'))
  best = row['server_lr']
  out['base_server_lr'] = best
  out['tuning'] = row['tuning']
  print(f"base server lr {best:g} (score at K={k0}, seed 0, mean of last "
        f"{LAST_EVALS} evals: {row['tuning']})", flush=True)
  shared = {int(s): r for s, r in row['seeds'].items()}
  for seed, r in sorted(shared.items()):
    log_run(f'K={k0:4d} all rules seed {seed}', r)

  for seed in range(args.seeds):
    for rule in rules:
      for k in cohorts:
        cell = out['runs'][rule].setdefault(str(k), {})
        if k == k0:
          cell[str(seed)] = shared[seed]
          continue
        r = run(cell_config(base, k, rule, best, seed),
                os.path.join(args.workdir, f'K{k}', rule, f'seed{seed}'),
                args)
        cell[str(seed)] = r
        log_run(f'K={k:4d} {rule:6s} seed {seed}', r)
  if args.probe_lrs:
    out['probe'] = {}
    for k in (int(x) for x in args.probe_cohorts.split(',')):
      for lr in (float(x) for x in args.probe_lrs.split(',')):
        r = run(cell_config(base, k, 'none', lr, 0),
                os.path.join(args.workdir, 'probe', f'K{k}', f'lr{lr:g}'),
                args)
        out['probe'].setdefault(str(k), {})[f'{lr:g}'] = r
        log_run(f'probe K={k:4d} constant lr {lr:g} seed 0', r)
  runs = [r for by_k in out['runs'].values() for seeds in by_k.values()
          for r in seeds.values()]
  runs += [r for by_lr in out.get('probe', {}).values()
           for r in by_lr.values()]
  runs = list({id(r): r for r in runs}.values())  # K0's runs are shared
  out['meta']['run_seconds_total'] = round(sum(r['seconds'] for r in runs),
                                           1)
  out['meta']['runs_reused'] = sum(r.get('reused', False) for r in runs)
  out['meta']['loadavg_end'] = [round(x, 2) for x in os.getloadavg()]
  if out['meta']['runs_reused'] and os.path.exists(args.out + '.json'):
    # Cells trained by an earlier invocation: keep what it recorded.
    with open(args.out + '.json') as f:
      old = json.load(f).get('meta', {})
    out['meta']['earlier'] = [{k: v for k, v in old.items()
                               if k != 'earlier'}] + old.get('earlier', [])
  study.finish(out, args.out, plot, summarize, t0)


if __name__ == '__main__':
  main()
