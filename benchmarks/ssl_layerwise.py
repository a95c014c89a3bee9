"""Federated SSL that learns something: baselines, then end-to-end SimCLR
vs layer-wise vs layer-wise + depth dropout (Guo et al. 2023) on
Fashion-MNIST (issue 16 item 1).

Setup: `configs/fashion_ssl.py` (a 4-block ViT, d_model 64, 7x7 patches of
28x28 images; 100 training + 10 held-out Dirichlet(0.5) clients, 10 per
round, 4 local Adam steps of batch 32, two SimCLR views each, NT-Xent).
Three arms at equal rounds and equal client work (the same clients, local
steps, batch and learning rate every round):

  end_to_end     every client trains the whole ViT and its projection head
  layerwise      one stage per block (rounds / 4 rounds each, first to
                 last), a fresh projection head per block, the blocks below
                 frozen (forward only, no backward, not uploaded)
  layerwise_dd   layerwise + depth dropout: each frozen block below the
                 active one is skipped with probability --depth_dropout,
                 drawn per client

each with --seeds seeds (model initialisation and cohorts; the partition
is data.seed's).

Evaluation: a linear probe (`ssl.probe_accuracy`: L-BFGS logistic
regression on the frozen, standardised features before the projection head)
fit on N labelled training images (a fixed uniform random subset of the
pooled training clients, the same for every arm and baseline; N in
--probe_labels, the first is the headline) and scored on the whole official
test set (10,000 images). The same probe on the same images gives the
baselines: raw pixels (784 features) and the randomly initialised encoder
(each seed's initial parameters). The run's own evaluation (its probe on
the first 5,000 pooled training images, scored on the first 5,000 test
images) is kept as `run_probe_accuracy`.

Device cost, measured once per arm (`arm_costs`: the compiled
single-client device program of every stage and depth-dropout variant,
`accounting.client_cost`, as launch/device_cost.py reports it; never typed
in); what travels, from each run's metrics.jsonl:

  peak_bytes             the largest XLA peak of any program a client ran:
                         the memory a device must have (with depth dropout,
                         the program that skipped nothing)
  mean_peak_bytes        the peak of the program a client runs, averaged
                         over the rounds and over depth dropout's draws
                         (Binomial(i, p) of i frozen blocks skipped): what
                         depth dropout saves
  training_state_bytes   gradients + optimizer state + activations kept for
                         the backward pass (analytic), largest and mean, as
                         above
  flops_per_round        per client per round, averaged the same way
  upload / download      bits per client per round, mean over rounds

Ratios are end-to-end's over the arm's (> 1: the arm needs less). The goal
checked (from the paper): >= 5x less training memory (training state of
the largest program) with a probe within 2 points of end to end.
--cost_depths also measures (trains nothing) end to end and layer-wise at
other ViT depths: how the ratio grows with the number of blocks.

  python benchmarks/ssl_layerwise.py                # ~35 min on one core
  python benchmarks/ssl_layerwise.py --quick        # a smoke run, ~1 min
  python benchmarks/ssl_layerwise.py --replot

Writes benchmarks/results/ssl_layerwise.{json,png} (--quick: under
--workdir); finished runs in --workdir are read, not retrained. The last
line printed is one JSON object: per arm the probe accuracy (per seed,
mean, sd) and the memory ratios, the baselines, the goal's verdict.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from fedjax_eff import core
from fedjax_eff import ssl
from fedjax_eff.experiment import build
from fedjax_eff.experiment import sweep
from fedjax_eff.experiment import train as train_lib
from fedjax_eff.experiment.defaults import load_config_module
from fedjax_eff.experiment.metrics import read_metrics

import plots  # pylint: disable=g-import-not-at-top  (benchmarks/plots.py)
import study  # pylint: disable=g-import-not-at-top  (benchmarks/study.py)

RESULTS = os.path.join(ROOT, 'benchmarks', 'results')
ARMS = ('end_to_end', 'layerwise', 'layerwise_dd')
LABELS = {'end_to_end': 'end to end', 'layerwise': 'layer-wise',
          'layerwise_dd': 'layer-wise + depth dropout'}
PROBE_SUBSET_SEED = 1234  # which labelled images the probe sees
MEMORY_GOAL, ACCURACY_GOAL = 5.0, 0.02


def _config_module():
  return load_config_module(os.path.join(ROOT, 'configs', 'x.py'),
                            'fashion_ssl')


def base_config(args) -> ml_collections.ConfigDict:
  c = study.quiet_config('fashion_ssl', rounds=args.rounds,
                         eval_every=args.rounds)
  # Device costs are measured once per arm (`arm_costs`), not per run.
  c.accounting = False
  if args.data_dir:
    c.data.data_dir = args.data_dir
  c.data.num_clients, c.data.heldout_clients = args.clients, args.heldout
  c.clients_per_round = args.clients_per_round
  c.client.local_steps, c.client.batch_size = args.local_steps, args.batch
  c.client.learning_rate = args.lr
  c.task.probe_steps = args.probe_steps  # the run's own evaluation
  c.model.kwargs.num_layers = args.layers
  c.model.kwargs.d_model = args.d_model
  c.model.kwargs.mlp_dim = 2 * args.d_model
  if args.quick:  # cheap views: a smoke run compiles less
    c.task.augment.update(min_scale=1.0, noise_std=0.0)
  return c


def arm_config(base, arm: str, seed: int, args) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(base.to_dict())
  c.seed = seed
  if arm != 'end_to_end':
    _config_module().layerwise(
        c, args.rounds // args.layers,
        args.depth_dropout if arm == 'layerwise_dd' else 0.0)
  return c


def final_params(workdir: str, rounds: int):
  """The server parameters the run saved after its last round."""
  path = os.path.join(workdir, 'checkpoints', str(rounds), 'default')
  ckpt = ocp.StandardCheckpointer()
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax: no step metadata
  try:
    meta = ckpt.metadata(path).item_metadata
    meta = getattr(meta, 'tree', meta)
    saved = ckpt.restore(path, jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta))
  finally:
    absl_logging.set_verbosity(level)
  return jax.tree.map(np.asarray, saved['state']['params'])


class Prober:
  """The linear probe of every arm and baseline on the same images: N
  labelled training images (a fixed random subset of the pooled training
  clients) per N in `labels`, scored on the whole test set."""

  def __init__(self, data, labels, steps: int):
    train = data.train.concatenated()
    order = np.random.default_rng(PROBE_SUBSET_SEED).permutation(
        len(train['y']))
    self.labels = [n for n in labels if n <= len(order)] or [len(order)]
    self.subsets = {n: (train['x'][order[:n]], train['y'][order[:n]])
                    for n in self.labels}
    self.test = (data.test['x'], data.test['y'])
    self.num_classes, self.steps = data.num_classes, steps

  def encoder(self, model, params, **forward) -> dict[str, float]:
    return {str(n): ssl.probe_accuracy(
        model, params, xy, self.test, self.num_classes, steps=self.steps,
        **forward)['test_accuracy'] for n, xy in self.subsets.items()}

  def raw_pixels(self) -> dict[str, float]:
    flat = lambda x: np.asarray(x).reshape(len(x), -1)
    return {str(n): ssl.linear_probe(
        flat(x), y, flat(self.test[0]), self.test[1], self.num_classes,
        steps=self.steps)['test_accuracy']
            for n, (x, y) in self.subsets.items()}


def init_params(exp: build.Experiment, seed: int):
  """The initial parameters of the run with `config.seed = seed` (what
  `build.Experiment` draws), checked against `exp`'s own for its seed."""
  x = np.zeros((1,) + tuple(exp.data.input_shape), np.float32)

  def draw(s):
    return exp.model.init(jax.random.fold_in(jax.random.key(s), 0x1417),
                          x)['params']
  mine = draw(exp.config.seed)
  if not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(mine), jax.tree.leaves(exp.init_params))):
    raise AssertionError('init_params no longer matches build.Experiment')
  return draw(seed)


def _mean(values):
  values = [v for v in values if v is not None]
  return float(statistics.mean(values)) if values else None


def arm_costs(exp: build.Experiment, p: float) -> dict:
  """What a client's device pays in this arm: every program a client can
  run (each stage of the schedule; with depth dropout, each number k of
  the i frozen blocks below the active one skipped) compiled for one
  client and read by `accounting.client_cost` (`Experiment.device_cost`,
  what summary.json's device_cost and launch/device_cost.py report).

  (`Experiment.device_cost` caches each program by everything that
  defines it, depth dropout's static `layer_gates` included.)

  Returns the programs and, over the run, the largest peak and training
  state (the memory a device must have), and their means weighted by how
  often a client runs each program: stages by their rounds, variants by
  Binomial(i, p), the chance that k of i frozen blocks are skipped.
  """
  tech = exp.round_fns.technique
  rounds = exp.config.num_rounds
  stages: dict = {}
  for r in range(rounds):
    stages.setdefault(tech.stage(r) if tech.stage else None, []).append(r)
  programs = []
  for i, (stage, rs) in enumerate(stages.items()):
    _, prog = exp.program(rs[0], 0)
    variants = range(i + 1) if prog.device_variant else [None]
    for k in variants:
      cost = exp.device_cost(core.technique.device_program(prog, k))
      weight = (math.comb(i, k) * p ** k * (1 - p) ** (i - k)
                if k is not None else 1.0)
      programs.append(dict(stage=repr(stage), variant=k,
                           share=len(rs) / rounds * weight, **cost.as_dict()))

  def most(key):
    return float(max(q[key] for q in programs))

  def mean(key):
    return float(sum(q['share'] * q[key] for q in programs))

  return dict(
      peak_bytes=most('device_peak_bytes'),
      mean_peak_bytes=mean('device_peak_bytes'),
      training_state_bytes=most('training_state_bytes'),
      mean_training_state_bytes=mean('training_state_bytes'),
      flops_per_round=mean('device_flops_per_round'),
      programs=programs)


def depth_costs(args, depths) -> dict:
  """End to end's and layer-wise's device costs for ViTs of other depths
  (nothing trained: only the programs compiled), to see how the memory
  ratio grows with the number of blocks layer-wise splits the model into."""
  out = {}
  for d in depths:
    a = argparse.Namespace(**dict(vars(args), layers=d, rounds=d))
    base = base_config(a)
    row = {}
    for arm in ('end_to_end', 'layerwise'):
      c = arm_costs(build.Experiment(arm_config(base, arm, 0, a)), 0.0)
      row[arm] = {k: v for k, v in c.items() if k != 'programs'}
    e2e, lw = row['end_to_end'], row['layerwise']
    row['peak_memory_ratio'] = e2e['peak_bytes'] / lw['peak_bytes']
    row['training_state_ratio'] = (e2e['training_state_bytes'] /
                                   lw['training_state_bytes'])
    out[str(d)] = row
  return out


def run_one(c, workdir: str, prober: Prober, exp: build.Experiment,
            log) -> dict:
  """Trains (unless `workdir` holds the finished run), then probes the
  final parameters; what travelled, from the rounds' metrics."""
  t0 = time.time()
  summary = sweep.finished(workdir, c)
  reused = summary is not None
  if not reused:
    shutil.rmtree(workdir, ignore_errors=True)
    summary = train_lib.train_and_evaluate(c, workdir)
  records = read_metrics(workdir)
  params = final_params(workdir, c.num_rounds)
  forward = exp.forward(params, c.num_rounds)
  out = dict(probe=prober.encoder(exp.model, params, **forward),
             run_probe_accuracy=summary['final_metrics'].get('test_accuracy'),
             final_train_loss=summary['final_metrics'].get('train_loss'),
             upload_bits=_mean(r.get('upload_bits') for r in records),
             download_bits=_mean(r.get('download_bits') for r in records),
             seconds=float(summary.get('wall_time_seconds') or 0.0),
             reused=reused)
  log(f"  seed {c.seed}: probe {out['probe']} (run's own "
      f"{out['run_probe_accuracy']:.4f}), up/down "
      f"{out['upload_bits'] / 1e6:.3f}/{out['download_bits'] / 1e6:.3f} "
      f"Mbit ({time.time() - t0:.0f} s{', reused' if reused else ''})")
  return out


def mean_sd(values) -> dict:
  values = [float(v) for v in values]
  return dict(mean=statistics.mean(values),
              sd=statistics.stdev(values) if len(values) > 1 else 0.0,
              per_seed=values)


def summarize(out: dict) -> dict:
  """Per arm: mean/sd of every figure over the seeds, ratios to end to
  end; the baselines; the goal's verdict."""
  main_n = str(out['probe_labels'][0])
  arms = {}
  for arm, seeds in out['runs'].items():
    rows = list(seeds.values())
    a = {'probe_accuracy': {n: mean_sd(r['probe'][n] for r in rows)
                            for n in rows[0]['probe']},
         'run_probe_accuracy': mean_sd(r['run_probe_accuracy'] for r in rows)}
    for k in ('upload_bits', 'download_bits', 'seconds'):
      a[k] = _mean(r[k] for r in rows)
    a.update({k: v for k, v in out['costs'][arm].items() if k != 'programs'})
    arms[arm] = a
  e2e = arms.get('end_to_end')
  for a in arms.values():
    ratio = lambda k, a=a: (e2e[k] / a[k] if e2e and e2e[k] and a[k]
                            else None)
    a['peak_memory_ratio'] = ratio('peak_bytes')
    a['mean_peak_memory_ratio'] = ratio('mean_peak_bytes')
    a['training_state_ratio'] = ratio('training_state_bytes')
    a['mean_training_state_ratio'] = ratio('mean_training_state_bytes')
    a['flops_ratio'] = ratio('flops_per_round')
    a['upload_ratio'] = ratio('upload_bits')
    a['download_ratio'] = ratio('download_bits')
    a['probe_gap_to_end_to_end'] = (
        {n: a['probe_accuracy'][n]['mean'] - e2e['probe_accuracy'][n]['mean']
         for n in a['probe_accuracy']} if e2e else None)
  base = out['baselines']
  random_init = {n: mean_sd(v) for n, v in base['random_init'].items()}
  verdict = {}
  for arm in ('layerwise', 'layerwise_dd'):
    if arm not in arms or not e2e:
      continue
    a = arms[arm]
    gap = a['probe_gap_to_end_to_end'][main_n]
    mem = a['training_state_ratio']
    peak = a['peak_memory_ratio']
    verdict[arm] = dict(
        training_state_ratio=mem, peak_memory_ratio=peak,
        probe_gap=gap,
        memory_goal_met=bool(mem and mem >= MEMORY_GOAL),
        peak_memory_goal_met=bool(peak and peak >= MEMORY_GOAL),
        accuracy_goal_met=gap >= -ACCURACY_GOAL,
        holds=bool(mem and mem >= MEMORY_GOAL and gap >= -ACCURACY_GOAL))
  learned = ({n: e2e['probe_accuracy'][n]['mean'] - random_init[n]['mean']
              for n in random_init} if e2e else None)
  return dict(arms=arms, random_init=random_init,
              raw_pixels=base['raw_pixels'],
              end_to_end_minus_random_init=learned, verdict=verdict,
              main_probe_labels=int(main_n))


def headline(out: dict) -> dict:
  s = out['summary']
  n = str(s['main_probe_labels'])
  arms = {}
  for arm, a in s['arms'].items():
    arms[arm] = dict(
        probe_accuracy={k: round(v, 4) for k, v in
                        a['probe_accuracy'][n].items() if k != 'per_seed'},
        probe_accuracy_per_seed=[round(v, 4) for v in
                                 a['probe_accuracy'][n]['per_seed']],
        peak_memory_ratio=_round(a['peak_memory_ratio']),
        mean_peak_memory_ratio=_round(a['mean_peak_memory_ratio']),
        training_state_ratio=_round(a['training_state_ratio']),
        peak_mb=_round(a['peak_bytes'] / 1e6),
        training_state_mb=_round(a['training_state_bytes'] / 1e6),
        gflops_per_round=_round(a['flops_per_round'] / 1e9),
        upload_mbit=_round(a['upload_bits'] / 1e6),
        download_mbit=_round(a['download_bits'] / 1e6))
  by_depth = {}
  if 'layerwise' in s['arms'] and 'end_to_end' in s['arms']:
    lw = s['arms']['layerwise']
    by_depth[str(out['layers'])] = dict(
        peak_memory_ratio=_round(lw['peak_memory_ratio']),
        training_state_ratio=_round(lw['training_state_ratio']))
  for d, row in (out.get('costs_by_depth') or {}).items():
    by_depth[d] = dict(
        peak_memory_ratio=_round(row['peak_memory_ratio']),
        training_state_ratio=_round(row['training_state_ratio']))
  return dict(
      probe_labels=int(n), seeds=out['seeds'], rounds=out['rounds'],
      arms=arms, layerwise_memory_ratio_by_depth=by_depth,
      baselines=dict(
          raw_pixels=round(s['raw_pixels'][n], 4),
          random_init={k: round(v, 4) for k, v in
                       s['random_init'][n].items() if k != 'per_seed'}),
      end_to_end_minus_random_init=_round(
          (s['end_to_end_minus_random_init'] or {}).get(n)),
      goal=dict(memory_ratio=MEMORY_GOAL, probe_within=ACCURACY_GOAL,
                holds={k: v['holds'] for k, v in s['verdict'].items()}))


def _round(v, nd=4):
  return None if v is None else round(float(v), nd)


def plot(out: dict, path: str):
  """Probe accuracy (mean +- sd over seeds) against each arm's device
  peak memory and training state; the baselines as horizontal lines."""
  plt = plots._pyplot()  # pylint: disable=protected-access
  if plt is None:
    return
  s = out['summary']
  n = str(s['main_probe_labels'])
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
  arms = [a for a in ARMS if a in s['arms']]
  colors = {a: f'C{i}' for i, a in enumerate(arms)}
  lines = [('raw pixels', s['raw_pixels'][n], 'gray', ':'),
           ('random-init encoder', s['random_init'][n]['mean'], 'k', '--')]
  for ax, key, xlabel in (
      (axes[0], 'peak_bytes', 'device peak memory, largest program (MB)'),
      (axes[1], 'training_state_bytes',
       'training state, largest program (MB)')):
    xy = []
    for arm in arms:
      a = s['arms'][arm]
      x, p = a[key] / 1e6, a['probe_accuracy'][n]
      ax.errorbar([x], [p['mean']], yerr=[p['sd']], fmt='o',
                  color=colors[arm], capsize=4, ms=6, zorder=3)
      xy.append((x, p['mean']))
    for label, y, col, ls in lines:
      ax.axhline(y, color=col, ls=ls, lw=1, label=label)
    ax.set_xscale('log')
    plots.plain_log_ticks(ax.xaxis, [x for x, _ in xy])
    ax.margins(x=0.35, y=0.15)
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3, which='both', lw=0.5)
    ys = [y for _, y in xy] + [y for _, y, _, _ in lines]
    ax.set_ylim(min(ys) - 0.03, max(ys) + 0.03)
  axes[0].set_ylabel(f'linear-probe test accuracy ({n} labels)')
  fig.tight_layout(rect=(0, 0.06, 1, 0.93))
  for ax, key in ((axes[0], 'peak_bytes'), (axes[1], 'training_state_bytes')):
    xy = [(s['arms'][a][key] / 1e6, s['arms'][a]['probe_accuracy'][n]['mean'])
          for a in arms]
    for text in plots.place_labels(ax, xy, [LABELS[a] for a in arms],
                                   [colors[a] for a in arms]):
      # Legible where a label crosses a baseline's line.
      text.set_bbox(dict(facecolor='white', edgecolor='none', alpha=0.85,
                         pad=1))
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='lower center', ncol=2, fontsize=8,
             frameon=False)
  fig.suptitle(
      f"Federated SimCLR on Fashion-MNIST: {out['rounds']} rounds, "
      f"{len(out['seeds'])} seeds (mean ± sd); ViT {out['layers']} blocks",
      fontsize=10)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f'plot: {path}')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true',
                 help='smoke run: 1 seed, 4 rounds, a tiny ViT and cohort, '
                 'small probes; writes under --workdir unless --out is set')
  p.add_argument('--rounds', type=int, default=200,
                 help='rounds per run (a multiple of --layers: layer-wise '
                 'trains each block for rounds / layers)')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--arms', default=','.join(ARMS))
  p.add_argument('--depth_dropout', type=float, default=0.5)
  p.add_argument('--lr', type=float, default=1e-3, help='client Adam lr')
  p.add_argument('--clients', type=int, default=100)
  p.add_argument('--heldout', type=int, default=10)
  p.add_argument('--clients_per_round', type=int, default=10)
  p.add_argument('--local_steps', type=int, default=4)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--d_model', type=int, default=64)
  p.add_argument('--probe_labels', default='1000,5000',
                 help='labelled images the probe is fit on (the first is '
                 'the headline)')
  p.add_argument('--probe_steps', type=int, default=300)
  p.add_argument('--cost_depths', default='8,12',
                 help='also measure (not train) end to end and layer-wise '
                 'at these ViT depths: how the memory ratio grows')
  p.add_argument('--data_dir', default='',
                 help="Fashion-MNIST's IDX files (default: Debian's path)")
  p.add_argument('--workdir', default='/tmp/fedjax_eff_ssl_layerwise')
  p.add_argument('--out', default=None,
                 help='output path without extension (default: '
                 'benchmarks/results/ssl_layerwise; --quick: under '
                 '--workdir)')
  p.add_argument('--replot', action='store_true',
                 help='train nothing: redraw the PNG from the JSON')
  args = p.parse_args(argv)
  if args.out is None:
    args.out = (os.path.join(args.workdir, 'ssl_layerwise_quick')
                if args.quick else os.path.join(RESULTS, 'ssl_layerwise'))
  if args.replot:
    study.replot(args.out, plot)
    return
  if args.quick:
    args.rounds, args.seeds, args.layers, args.d_model = 4, '0', 2, 16
    args.clients, args.heldout, args.clients_per_round = 8, 0, 2
    args.local_steps, args.batch = 1, 8
    # All labelled images: the probe's shapes are the run's own probe's
    # (one compile).
    args.probe_labels, args.probe_steps = '5000', 30
    args.depth_dropout = 0.5
    args.cost_depths = ''
  if args.rounds % args.layers:
    p.error(f'--rounds {args.rounds} is not a multiple of --layers '
            f'{args.layers}')
  seeds = [int(x) for x in args.seeds.split(',')]
  arms = [a for a in args.arms.split(',') if a]
  if set(arms) - set(ARMS):
    p.error(f'--arms: unknown {sorted(set(arms) - set(ARMS))}')
  labels = [int(x) for x in args.probe_labels.split(',')]
  os.makedirs(args.workdir, exist_ok=True)
  study.compile_cache(args.workdir)
  t0 = time.time()

  def log(msg):
    print(f'[{time.time() - t0:6.0f} s] {msg}', flush=True)

  base = base_config(args)
  log(f'jax {jax.__version__} on {jax.default_backend()}, '
      f'{os.cpu_count()} cpus; {args.rounds} rounds, seeds {seeds}')
  # 1. Baselines, on the end-to-end model's data and initialisation.
  exps = {'end_to_end': build.Experiment(arm_config(base, 'end_to_end',
                                                    seeds[0], args))}
  prober = Prober(exps['end_to_end'].data, labels, args.probe_steps)
  labels = prober.labels
  baselines = dict(raw_pixels=prober.raw_pixels(), random_init={})
  for seed in seeds:
    acc = prober.encoder(exps['end_to_end'].model,
                         init_params(exps['end_to_end'], seed))
    for n, v in acc.items():
      baselines['random_init'].setdefault(n, []).append(v)
  log(f"baselines: raw pixels {baselines['raw_pixels']}, random-init "
      f"encoder {baselines['random_init']}")
  # 2. The arms.
  runs, costs = {}, {}
  for arm in arms:
    log(f'{arm}:')
    if arm not in exps:  # its model and schedule: probe's forward, costs
      exps[arm] = build.Experiment(arm_config(base, arm, seeds[0], args))
    costs[arm] = arm_costs(exps[arm], args.depth_dropout
                           if arm == 'layerwise_dd' else 0.0)
    c = costs[arm]
    log(f"  device: peak {c['peak_bytes'] / 1e6:.3f} MB (mean "
        f"{c['mean_peak_bytes'] / 1e6:.3f}), training state "
        f"{c['training_state_bytes'] / 1e6:.3f} MB (mean "
        f"{c['mean_training_state_bytes'] / 1e6:.3f}), "
        f"{c['flops_per_round'] / 1e9:.3f} GFLOPs/round, "
        f"{len(c['programs'])} programs")
    runs[arm] = {str(s): run_one(arm_config(base, arm, s, args),
                                 os.path.join(args.workdir, f'{arm}_seed{s}'),
                                 prober, exps[arm], log)
                 for s in seeds}
  depths = [int(x) for x in args.cost_depths.split(',') if x]
  by_depth = depth_costs(args, depths)
  for d, row in by_depth.items():
    log(f"depth {d} (costs only): peak {row['peak_memory_ratio']:.2f}x, "
        f"training state {row['training_state_ratio']:.2f}x less layer-wise")
  out = dict(
      rounds=args.rounds, seeds=seeds, layers=args.layers,
      costs_by_depth=by_depth,
      probe_labels=labels, depth_dropout=args.depth_dropout,
      setup=dict(clients=args.clients, heldout=args.heldout,
                 clients_per_round=args.clients_per_round,
                 local_steps=args.local_steps, batch=args.batch, lr=args.lr,
                 d_model=args.d_model, probe_steps=args.probe_steps,
                 probe_test_images=int(len(prober.test[1])),
                 augment=base.task.augment.to_dict(),
                 temperature=base.task.temperature),
      baselines=baselines, runs=runs, costs=costs,
      meta=study.meta(git=_git_head(), quick=args.quick))
  out['summary'] = summarize(out)
  for arm, v in out['summary']['verdict'].items():
    log(f"{arm}: training state {v['training_state_ratio']:.2f}x less, "
        f"peak {v['peak_memory_ratio']:.2f}x less, probe "
        f"{v['probe_gap']:+.4f} vs end to end: goal "
        f"{'holds' if v['holds'] else 'does not hold'}")
  study.finish(out, args.out, plot, headline, t0)
  return out


def _git_head() -> str:
  try:
    import subprocess  # pylint: disable=g-import-not-at-top
    return subprocess.run(('git', '-C', ROOT, 'rev-parse', '--short',
                           'HEAD'), capture_output=True, text=True,
                          timeout=20).stdout.strip()
  except (OSError, ValueError):
    return ''


if __name__ == '__main__':
  main()
