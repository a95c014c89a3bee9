"""Federated dropout's per-layer rate schedules at equal sub-model size
(Guliani et al. 2022), on Fashion-MNIST (a small CNN: conv 16, conv 32,
dense 64) and the offline espeak-ng speech set (`configs/conformer_fd.py`
with the 'tiny' Conformer CTC, 4 heads, client Adam lr 3e-3).

Every width the layer stack allows drops (`scope='all'`: the residual
width, conv channels and front end too; `techniques/federated_dropout.py`
says what stays full and why). Each schedule's base rate is calibrated
(`calibrate_rate`, bisection) so that every client's sub-model keeps the
same fraction `--target` of the parameters:

  constant  every group drops at p
  depth     p ramps linearly from 0 at the first group to p at the last
  size      p_l = p * width_l / max width

and 'full' (no dropout) is the baseline. Per task, arm and seed (3 seeds) a
federated run of `--*_rounds` rounds; then the nested sub-models (the first
r of every group's units, r = 0.25/0.5/0.75/1.0, evaluated alone on the
central test set / held-out speakers): accuracy (Fashion-MNIST), CER/WER
(speech). Per arm: upload and FLOPs ratios against the full model, from
the compiled device program (`accounting.client_cost`, via
`Experiment.program_cost`). Also the keep-ratio cost table of the
Conformer, scope 'units' (heads and feed-forward units only, as before)
against scope 'all': the sub-model's parameter fraction and the upload /
FLOPs ratios at keep 0.25 (the config's 'cpu' Conformer).

The rounds are few (a 2-core CPU shared with other jobs): speech CER after
`--speech_rounds` rounds is far from converged, so read its numbers as a
comparison of schedules at equal budget early in training, not as the
accuracy a converged model reaches.

  python benchmarks/fd_schedules.py            # ~20 min on 2 busy cores
  python benchmarks/fd_schedules.py --quick    # 1 seed, a few rounds
  python benchmarks/fd_schedules.py --replot   # redraw the PNG from JSON

Writes benchmarks/results/fd_schedules.{json,png}; the last line printed is
the JSON's headline: per task and arm the sub-model fraction, upload_ratio,
flops_ratio and the nested sub-models' accuracy / CER mean and sd.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import ml_collections

from fedjax_eff.experiment import train as train_lib
from fedjax_eff.experiment.defaults import load_config_module
from fedjax_eff.techniques import federated_dropout as fd

RESULTS = os.path.join(ROOT, 'benchmarks', 'results')
KEEPS = (0.25, 0.5, 0.75, 1.0)
SCHEDULES = ('constant', 'depth', 'size')
COST_KEEPS = (0.25,)


def _config(name: str):
  return load_config_module(os.path.join(ROOT, 'configs', 'x.py'),
                            name).get_config()


def task_config(task: str, args):
  """The run of one task, without techniques."""
  if task == 'fmnist':
    c = _config('fashion_mnist')
    c.model.name = 'cnn'
    c.model.kwargs = ml_collections.ConfigDict(dict(features=(16, 32),
                                                    hidden=64))
    c.clients_per_round = args.fm_clients
    c.num_rounds = args.fm_rounds
  else:
    c = _config('conformer_fd')
    c.model.kwargs = ml_collections.ConfigDict(dict(preset=args.speech_preset,
                                                    num_heads=4))
    c.client.learning_rate = args.speech_lr
    c.clients_per_round = args.speech_clients
    c.num_rounds = args.speech_rounds
  c.techniques = []
  c.eval_every = c.checkpoint_every = c.num_rounds
  c.progress = c.tensorboard = False
  c.submodel_keeps = list(KEEPS)
  return c


def arm_technique(arm: str, target: float):
  if arm == 'full':  # rate 0: every unit, the same run as FedAvg
    return dict(name='federated_dropout', rate=0.0, scope='all')
  return dict(name='federated_dropout', schedule=arm, rate_first=0.0,
              scope='all', target_fraction=target)


def with_technique(c, tech: dict):
  c = ml_collections.ConfigDict(c.to_dict())
  c.techniques = [ml_collections.ConfigDict(tech)]
  return c


def cost(c) -> dict:
  exp = train_lib.Experiment(c)
  d = exp.program_cost(0, 0)
  return dict(upload_bits=float(d.upload_bits),
              download_bits=float(d.download_bits),
              flops=float(d.flops_per_round), peak_bytes=float(d.peak_bytes))


def model_and_params(c):
  exp = train_lib.Experiment(c)
  return exp.model, exp.init_params


def metric_keys(task: str):
  return ('test_accuracy',) if task == 'fmnist' else ('test_cer', 'test_wer')


def run_task(task: str, args, out: dict):
  base = task_config(task, args)
  model, params = model_and_params(base)
  arms = ('full',) + tuple(args.schedules.split(','))
  res = out.setdefault(task, {})
  for arm in arms:
    tech = arm_technique(arm, args.target)
    c = with_technique(base, tech)
    info = fd.describe(model, params, schedule=tech.get('schedule',
                                                        'constant'),
                       rate=tech.get('rate', 0.25), scope='all',
                       target_fraction=tech.get('target_fraction'))
    t0 = time.time()
    row = dict(rate=info['rate'], fraction=info['fraction'],
               group_rates={k: round(v['rate'], 4)
                            for k, v in info['groups'].items()},
               cost=cost(c), seeds={})
    for seed in range(args.seeds):
      cs = ml_collections.ConfigDict(c.to_dict())
      cs.seed = seed
      wd = os.path.join(args.workdir, task, arm, f'seed{seed}')
      shutil.rmtree(wd, ignore_errors=True)
      m = train_lib.train_and_evaluate(cs, wd)['final_metrics']
      row['seeds'][seed] = {k: float(v) for k, v in m.items()
                            if k.startswith('keep') or k in metric_keys(task)
                            or k in ('train_loss',)}
    row['seconds'] = time.time() - t0
    res[arm] = row
    keep = {k: [row['seeds'][s][f'keep{k:g}/{metric_keys(task)[0]}']
                for s in row['seeds']] for k in KEEPS}
    print(f"{task:6s} {arm:8s} p={info['rate']:.4f} kept "
          f"{info['fraction']:.3f} of the parameters; " + '  '.join(
              f'keep {k:g}: {statistics.mean(v):.3f}' for k, v in
              keep.items()) + f"  ({row['seconds']:.0f} s)", flush=True)


def keep_cost_table(args, out: dict):
  """The 'cpu' Conformer of configs/conformer_fd.py per keep ratio:
  scope 'units' vs 'all'."""
  base = task_config('speech', args)
  base.model.kwargs = ml_collections.ConfigDict(dict(preset='cpu'))
  model, params = model_and_params(base)
  full = cost(with_technique(base, dict(name='federated_dropout', rate=0.0)))
  table = {}
  for scope in ('units', 'all'):
    groups = fd.width_groups(model, scope)
    for keep in COST_KEEPS:
      c = with_technique(base, dict(name='federated_dropout',
                                    rate=1.0 - keep, scope=scope))
      r = cost(c)
      frac = fd.kept_fraction(groups, params, fd.kept_counts(
          groups, [1.0 - keep] * len(groups)))
      table[f'{scope}/{keep:g}'] = dict(
          fraction=frac, upload_ratio=full['upload_bits'] / r['upload_bits'],
          flops_ratio=full['flops'] / r['flops'],
          peak_memory_ratio=full['peak_bytes'] / r['peak_bytes'])
      t = table[f'{scope}/{keep:g}']
      print(f"conformer cost, scope {scope:5s} keep {keep:4.2f}: "
            f"{t['fraction']:.3f} of the parameters, upload "
            f"{t['upload_ratio']:.2f}x, FLOPs {t['flops_ratio']:.2f}x, peak "
            f"{t['peak_memory_ratio']:.2f}x smaller", flush=True)
  out['conformer_keep_costs'] = table


def summarize(out: dict) -> dict:
  head = {}
  for task in ('fmnist', 'speech'):
    if task not in out:
      continue
    full = out[task]['full']['cost']
    for arm, row in out[task].items():
      c = row['cost']
      h = dict(fraction=round(row['fraction'], 4),
               upload_ratio=round(full['upload_bits'] / c['upload_bits'], 3),
               flops_ratio=round(full['flops'] / c['flops'], 3))
      for name in metric_keys(task):
        short = name.split('_')[1]
        for k in KEEPS:
          v = [s[f'keep{k:g}/{name}'] for s in row['seeds'].values()]
          h[f'{short}_keep{k:g}_mean'] = round(statistics.mean(v), 4)
          h[f'{short}_keep{k:g}_sd'] = round(
              statistics.stdev(v) if len(v) > 1 else 0.0, 4)
      head[f'{task}/{arm}'] = h
  if 'conformer_keep_costs' in out:
    t = out['conformer_keep_costs']
    head['conformer_keep0.25'] = {
        scope: dict(fraction=round(t[f'{scope}/0.25']['fraction'], 4),
                    upload_ratio=round(t[f'{scope}/0.25']['upload_ratio'], 3),
                    flops_ratio=round(t[f'{scope}/0.25']['flops_ratio'], 3))
        for scope in ('units', 'all')}
  return head


def plot(out: dict, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = [(t, m) for t, m in (('fmnist', 'test_accuracy'),
                                ('speech', 'test_cer')) if t in out]
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2),
                           squeeze=False)
  for ax, (task, metric) in zip(axes[0], panels):
    full = out[task]['full']['cost']
    for arm, row in out[task].items():
      means, sds = [], []
      for k in KEEPS:
        v = [s[f'keep{k:g}/{metric}'] for s in row['seeds'].values()]
        means.append(statistics.mean(v))
        sds.append(statistics.stdev(v) if len(v) > 1 else 0.0)
      up = full['upload_bits'] / row['cost']['upload_bits']
      fl = full['flops'] / row['cost']['flops']
      label = arm if arm == 'full' else (
          f"{arm} (kept {row['fraction']:.2f}; upload {up:.1f}x, "
          f'FLOPs {fl:.1f}x less)')
      ax.errorbar(KEEPS, means, yerr=sds, marker='o', capsize=3, label=label)
    ax.set_xlabel('nested sub-model keep ratio (every width group)')
    ax.set_ylabel({'test_accuracy': 'test accuracy',
                   'test_cer': 'held-out CER'}[metric])
    ax.set_title({'fmnist': 'Fashion-MNIST, CNN',
                  'speech': 'espeak-ng speech, Conformer CTC'}[task])
    ax.set_xticks(KEEPS)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle('Federated dropout schedules at equal sub-model size\n'
               f"({out['meta']['target']:g} of the parameters; mean ± sd "
               f"over {out['meta']['seeds']} seeds)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true',
                 help='1 seed, 3 rounds per run')
  p.add_argument('--tasks', default='fmnist,speech')
  p.add_argument('--schedules', default=','.join(SCHEDULES))
  p.add_argument('--target', type=float, default=0.5,
                 help='fraction of the parameters every sub-model keeps')
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--fm_rounds', type=int, default=20)
  p.add_argument('--fm_clients', type=int, default=10)
  p.add_argument('--speech_rounds', type=int, default=30)
  p.add_argument('--speech_clients', type=int, default=8)
  p.add_argument('--speech_preset', default='tiny',
                 help="conformer_ctc preset trained (4 heads); the cost "
                 "table uses configs/conformer_fd.py's 'cpu'")
  p.add_argument('--speech_lr', type=float, default=3e-3)
  p.add_argument('--no_cost_table', action='store_true')
  p.add_argument('--workdir', default='/tmp/fedjax_eff_fd_schedules')
  p.add_argument('--out', default=os.path.join(RESULTS, 'fd_schedules'))
  p.add_argument('--replot', action='store_true')
  args = p.parse_args()
  if args.replot:
    with open(args.out + '.json') as f:
      out = json.load(f)
    plot(out, args.out + '.png')
    print(json.dumps(out['headline']))
    return
  if args.quick:
    args.seeds, args.fm_rounds, args.speech_rounds = 1, 3, 3
    if args.out == p.get_default('out'):
      args.out += '_quick'
  t0 = time.time()
  # Seeds and arms share programs: compile each once (XLA's own cache on
  # disk; the executables are the same, only the waiting is saved).
  cache = os.path.join(args.workdir, 'jax_cache')
  shutil.rmtree(cache, ignore_errors=True)
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  out = {'meta': dict(
      target=args.target, seeds=args.seeds, fm_rounds=args.fm_rounds,
      fm_clients=args.fm_clients, speech_rounds=args.speech_rounds,
      speech_clients=args.speech_clients,
      speech_preset=args.speech_preset, speech_lr=args.speech_lr,
      jax=jax.__version__,
      backend=jax.default_backend(), cpus=os.cpu_count(),
      machine=platform.processor() or platform.machine(),
      command=' '.join(sys.argv))}
  print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} "
        f"cpus; target {args.target:g} of the parameters, {args.seeds} seeds",
        flush=True)
  if not args.no_cost_table and 'speech' in args.tasks:
    keep_cost_table(args, out)
  for task in args.tasks.split(','):
    run_task(task, args, out)
  out['meta']['seconds'] = time.time() - t0
  out['headline'] = summarize(out)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + '.json', 'w') as f:
    json.dump(out, f, indent=1)
  plot(out, args.out + '.png')
  print(f"wrote {args.out}.json and .png in {out['meta']['seconds']:.0f} s")
  print(json.dumps(out['headline']))


if __name__ == '__main__':
  main()
