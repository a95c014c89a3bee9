"""FedYolo with a real backbone: module gap to full fine-tuning at two sizes.

FedYolo (Zhang et al. 2023, arXiv 2307.04905) claims that federated
fine-tuning of small modules (LoRA, adapters, prompts) on a frozen
pretrained transformer comes within ~2 points of full fine-tuning, and that
the gap shrinks as the backbone grows; per-task modules on one shared
backbone learn several tasks without forgetting. Tested here on
Fashion-MNIST (issue 16 item 2).

Backbones: ViTs of two sizes (`SIZES`: 'small' is benchmarks/caff_vs_lora.py's
4 blocks of d_model 64; 'large' 6 blocks of d_model 128), each pretrained
centrally on all 30,000 training images of classes 0-4
(`experiment.pretrain`, 100 clients and no held-out ones pooled; cached in
--workdir). Federated fine-tuning on the unseen classes 5-9 with a fresh
head (100 training + 10 held-out clients, Dirichlet alpha, 10 clients per
round, S local Adam steps of batch 16), arms (`ARMS`):

  full     every parameter (FedAvg)
  lora     LoRA rank 4 on the attention query/value kernels + head
  adapter  bottleneck adapters of width 16 + head
  prompt   8 learned prompt tokens + head
  head     the head only
  local    fully local (`mode=local`): 10 clients each fine-tune the whole
           pretrained model on their own data, nothing averaged; scored as
           the mean over those models of the central test accuracy

Each arm's client learning rate is chosen per backbone on a small grid
(`LR_GRIDS`, centred on caff_vs_lora's measured optima; extended past an
edge, up to --lr_extensions times, by `caff_vs_lora.extend_grid`, the same
rule) by seed 0's held-out
client accuracy at the main cell (alpha --alpha_main, S --steps_main), then
every seed runs at that rate; local takes full's rate (`LR_SHARED`: the
same parameters and optimizer; --tune_every_arm tunes it too). Gap to full = full's test accuracy minus the
arm's, per seed (same seed = same partition and cohorts), mean and sample sd.

Multi-task without forgetting (per size, seed 0): one model with two task
heads on the shared pretrained backbone, task 0 = classes 0-4, task 1 =
classes 5-9 (50 + 5 clients per task); rounds of task-0 clients only, then
rounds of task-1 clients only. Per-task modules (the best module of the main
cell) against shared full fine-tuning (`modules full=True`): task 0's
accuracy after task 0, after task 1, and whether task 0's program (backbone,
task-0 module, task-0 head) is bit-identical after task 1.

Grid. The issue's full grid (2 sizes x 6 arms x alpha {0.1, 1} x S {1, 4,
16} x 3 seeds) is `--grid full` (for an accelerator). The default
(`--grid reduced`, sized for one CPU core) runs every arm at the main cell
with every seed, and only full and the best module (smallest main gap) at
the other cells of --alphas x --steps, with --extra_seeds; both reuse the
main cell's learning rates.

  python benchmarks/fedyolo_scale.py               # resumable; see --time_limit
  python benchmarks/fedyolo_scale.py --quick       # a smoke run (minutes)
  python benchmarks/fedyolo_scale.py --grid full --seeds 0,1,2

Every finished run is stored in --workdir/cells.json and skipped when the
command is run again; a process stops starting runs after --time_limit
seconds and writes what it has (`"complete": false`): re-run the same
command to continue. Writes benchmarks/results/fedyolo_scale.{json,png,md};
the last line printed is one JSON object: the gap to full per arm and size
(mean, sd over seeds), accuracies, the other cells' gaps, multi-task
forgetting and the verdict.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import sys
import time
import types

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import caff_vs_lora as caff  # pylint: disable=g-import-not-at-top,wrong-import-position
from fedjax_eff.data import cohort as cohort_lib  # pylint: disable=wrong-import-position
from fedjax_eff.experiment import pretrain as pretrain_lib  # pylint: disable=wrong-import-position
from fedjax_eff.experiment import train as train_lib  # pylint: disable=wrong-import-position
from fedjax_eff.experiment.build import versions  # pylint: disable=wrong-import-position
from fedjax_eff.models.transformer import module_pattern  # pylint: disable=wrong-import-position
from fedjax_eff.techniques import structure as structure_lib  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'benchmarks', 'results')

SIZES = {
    'small': dict(caff.ARCH),
    'large': dict(num_layers=6, d_model=128, num_heads=4, mlp_dim=256,
                  patch_size=7),
}
# --quick: the same two-size shape, tiny.
QUICK_SIZES = {
    'small': dict(num_layers=1, d_model=16, num_heads=2, mlp_dim=32,
                  patch_size=7),
    'large': dict(num_layers=2, d_model=32, num_heads=2, mlp_dim=64,
                  patch_size=7),
}

ARMS = {
    'full': caff.BASELINES['full'],
    'lora': caff.module_arm('lora', 4),
    'adapter': caff.module_arm('adapter', 16),
    'prompt': caff.Arm('prompt_p8', 'prompt', model_kw=(('prompt_len', 8),),
                       entries=(caff._entry(name='modules', kinds='prompt'),)),  # pylint: disable=protected-access
    'head': caff.BASELINES['head'],
    'local': caff.Arm('local', 'local'),  # mode=local, full fine-tuning
}
MODULES = ('lora', 'adapter', 'prompt')  # the paper's modules
# caff_vs_lora's optima: full 1e-3 (after extension), LoRA 1e-2, adapters
# and head 3e-2; every grid is extended past an edge (at most
# --lr_extensions times).
LR_GRIDS = {'full': (3e-4, 1e-3, 3e-3), 'local': (3e-4, 1e-3, 3e-3),
            'lora': (3e-3, 1e-2, 3e-2), 'adapter': (3e-3, 1e-2, 3e-2),
            'prompt': (3e-3, 1e-2, 3e-2), 'head': (3e-3, 1e-2, 3e-2)}
# Arms that take another arm's tuned lr instead of a grid of their own
# (CPU time): local fine-tunes the same parameters with the same optimizer
# as full, and its held-out accuracy (local models scored on other
# clients) would not pick a rate for the local models' own data anyway.
LR_SHARED = {'local': 'full'}
BATCH = caff.BATCH
GAP_CLAIM = 0.02  # "within 2 points"


class OutOfTime(Exception):
  """The process's --time_limit is spent: re-run to continue."""


class Store:
  """Finished runs (key -> metrics) in one JSON file, rewritten atomically
  after each run; the time limit of this process."""

  def __init__(self, path: str, time_limit: float):
    self.path, self.t0, self.limit = path, time.time(), time_limit
    self.cells = {}
    if os.path.exists(path):
      with open(path) as f:
        self.cells = json.load(f)
    self.ran = 0

  def get(self, key, fn):
    if key in self.cells:
      return self.cells[key]
    if time.time() - self.t0 > self.limit:
      raise OutOfTime(key)
    value = fn()
    self.cells[key] = value
    self.ran += 1
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(self.cells, f, indent=1)
    os.replace(tmp, self.path)
    return value


def _n_params(arch: dict) -> int:
  model = caff.models.get_model('vit', 5, **arch)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))['params'])
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def _caff_args(args, rounds: int = 0, pretrain_steps: int = 0):
  """What caff_vs_lora's config builders read from their args."""
  return types.SimpleNamespace(data_dir=args.data_dir, rounds=rounds,
                               pretrain_steps=pretrain_steps,
                               backbone=caff.make_backbone('vit'),
                               clients_per_round=10)


def pretrain_config(args, size: str) -> ml_collections.ConfigDict:
  """caff_vs_lora's pretraining config at `size`, on all 30,000 images of
  classes 0-4 (no held-out clients left out of the pool)."""
  c = caff.pretrain_config(_caff_args(
      args, pretrain_steps=args.pretrain_by_size[size]))
  c.model.kwargs = ml_collections.ConfigDict(dict(args.sizes[size]))
  c.data.num_clients, c.data.heldout_clients = args.clients, 0
  c.clients_per_round = min(c.clients_per_round, args.clients)
  return c


def cell_config(args, size, arm_name, alpha, steps, lr, seed, backbone
                ) -> ml_collections.ConfigDict:
  """caff_vs_lora's fine-tuning config with this size, alpha, S, mode."""
  arm = ARMS[arm_name]
  c = caff.fine_tune_config(_caff_args(args, args.rounds), arm, lr, seed,
                            backbone)
  c.model.kwargs = ml_collections.ConfigDict(
      dict(args.sizes[size], **dict(arm.model_kw)))
  c.data.partition, c.data.dirichlet_alpha = 'dirichlet', float(alpha)
  c.data.num_clients, c.data.heldout_clients = args.clients, args.heldout
  c.clients_per_round = min(c.clients_per_round, args.clients)
  c.client.local_steps = steps
  if arm.family == 'local':
    c.mode = 'local'
    c.local.num_clients = c.clients_per_round
  return c


KEEP = ('test_accuracy', 'heldout_accuracy', 'test_accuracy_min',
        'test_accuracy_max', 'upload_bits', 'download_bits')


def cell_key(size, arm, alpha, steps, lr, seed, rounds) -> str:
  return f'{size}/{arm}/alpha{alpha:g}/S{steps}/lr{lr:g}/seed{seed}/R{rounds}'


def run_cell(args, store, log, size, arm, alpha, steps, lr, seed, backbone):
  key = cell_key(size, arm, alpha, steps, lr, seed, args.rounds)

  def go():
    workdir = os.path.join(args.workdir, 'runs', key.replace('/', '_'))
    shutil.rmtree(workdir, ignore_errors=True)
    t = time.time()
    s = train_lib.train_and_evaluate(
        cell_config(args, size, arm, alpha, steps, lr, seed, backbone),
        workdir)
    m = s['final_metrics']
    out = {k: float(m[k]) for k in KEEP if k in m}
    out['seconds'] = time.time() - t
    log(f'  {key:42s} test {out["test_accuracy"]:.4f} held-out '
        f'{out["heldout_accuracy"]:.4f} ({out["seconds"]:.0f} s)')
    shutil.rmtree(workdir, ignore_errors=True)
    return out

  return store.get(key, go)


def tune_lr(args, store, log, size, arm, backbone) -> dict:
  """The arm's lr at the main cell: seed 0's held-out accuracy over the
  grid, extended past an edge up to --lr_extensions times
  (`caff_vs_lora.extend_grid`)."""
  a, s, seed = args.alpha_main, args.steps_main, args.seeds[0]
  grid = args.lr_grids[arm]
  tried = {lr: run_cell(args, store, log, size, arm, a, s, lr, seed,
                        backbone) for lr in grid}
  lr = caff.extend_grid(tried, lambda x: run_cell(
      args, store, log, size, arm, a, s, x, seed, backbone),
                        times=args.lr_extensions)
  return dict(lr=lr, lr_at_grid_edge=len(grid) > 1 and lr in (
      min(tried), max(tried)),
              heldout_accuracy_by_lr={f'{k:g}': v['heldout_accuracy']
                                      for k, v in sorted(tried.items())})


def summarize(accs: list[float]) -> dict:
  return dict(per_seed=accs, mean=float(np.mean(accs)),
              sd=float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
              n=len(accs))


def gap(full: list[float], other: list[float]) -> dict:
  """full - other, paired by seed (both lists in seed order)."""
  return summarize([f - o for f, o in zip(full, other)])


# Multi-task: sequential tasks on one shared backbone.

def multitask_config(args, size, kind, lr, seed, backbone, rounds):
  """Two tasks (classes 0-4, 5-9), per-task `kind` modules and heads on
  the backbone, or shared full fine-tuning (kind 'full')."""
  arm = ARMS['full' if kind == 'full' else kind]
  c = caff.fine_tune_config(_caff_args(args, rounds), arm, lr, seed,
                            backbone)
  c.model.kwargs = ml_collections.ConfigDict(
      dict(args.sizes[size], **dict(arm.model_kw)))
  c.data.classes = []
  c.data.tasks = [ml_collections.ConfigDict(dict(classes=cl)) for cl in
                  (caff.PRETRAIN_CLASSES, caff.TASK_CLASSES)]
  c.data.num_clients = max(1, args.clients // 2)
  c.data.heldout_clients = max(1, args.heldout // 2)
  c.clients_per_round = min(c.clients_per_round, c.data.num_clients)
  c.data.partition, c.data.dirichlet_alpha = 'dirichlet', args.alpha_main
  c.client.local_steps = args.steps_main
  kinds = '' if kind in ('full', 'head') else arm.family
  c.techniques = [ml_collections.ConfigDict(dict(
      name='modules', kinds=kinds, train_head=True, full=kind == 'full'))]
  c.data_placement = 'host'
  return c


def _leaves(params) -> dict:
  return {structure_lib.path_name(p): np.array(v) for p, v in
          jax.tree_util.tree_flatten_with_path(params)[0]}


def _train_task(exp, state, task, rounds, offset):
  """`rounds` rounds of clients of `task` only (10 per round)."""
  ids = np.flatnonzero(exp.data.client_task == task)
  k = min(exp.config.clients_per_round, len(ids))
  for r in range(offset, offset + rounds):
    chosen = np.sort(np.random.default_rng([exp.config.seed, r]).choice(
        ids, k, replace=False))
    cohort = cohort_lib.pack(exp.data.train, chosen, **dict(
        exp.packing, round_num=r, ctx={'tier': exp.tier_of[chosen]}))
    state, _ = exp.round_fns.round_step(state, cohort, exp.round_key(r),
                                        round_num=r)
  return state


def multitask(args, size, kind, lr, seed, backbone, log) -> dict:
  t = time.time()
  rounds = args.rounds
  exp = train_lib.Experiment(multitask_config(args, size, kind, lr, seed,
                                              backbone, 2 * rounds))
  state = _train_task(exp, exp.init_state(), 0, rounds, 0)
  mid = _leaves(state.params)
  after_a = exp.eval_metrics(state.params, rounds)
  state = _train_task(exp, state, 1, rounds, rounds)
  after_b = exp.eval_metrics(state.params, 2 * rounds)
  end = _leaves(state.params)
  task1 = re.compile('|'.join(module_pattern(k, 1) for k in
                              ('lora', 'adapter', 'prompt')) + '|head_t1')
  unchanged = all(np.array_equal(end[p], mid[p]) for p in end
                  if not task1.search(p))
  out = dict(
      kind=kind, lr=lr, seed=seed, rounds_per_task=rounds,
      task0_after_task0=float(after_a['task0/test_accuracy']),
      task0_after_task1=float(after_b['task0/test_accuracy']),
      task1_after_task1=float(after_b['task1/test_accuracy']),
      task0_program_unchanged=bool(unchanged),
      seconds=time.time() - t)
  out['task0_drop'] = out['task0_after_task0'] - out['task0_after_task1']
  log(f"  {size}/multitask/{kind}: task0 {out['task0_after_task0']:.4f} -> "
      f"{out['task0_after_task1']:.4f}, task1 {out['task1_after_task1']:.4f}"
      f", task-0 program unchanged: {unchanged} ({out['seconds']:.0f} s)")
  return out


# Verdict.

def trend(g_small: dict, g_large: dict) -> str:
  """'shrinks' / 'grows' when the mean gaps differ by more than two
  standard errors of their difference, else 'no clear change'."""
  if g_small['n'] < 2 or g_large['n'] < 2:
    d = g_small['mean'] - g_large['mean']
    return ('shrinks' if d > 0 else 'grows') + ' (one seed, not tested)'
  se = math.sqrt(g_small['sd'] ** 2 / g_small['n'] +
                 g_large['sd'] ** 2 / g_large['n'])
  d = g_small['mean'] - g_large['mean']
  return 'shrinks' if d > 2 * se else 'grows' if d < -2 * se else \
      'no clear change'


def judge(main: dict, sizes: list[str]) -> dict:
  """Per arm: does the gap shrink from the first size to the last, and is
  it under 2 points at the largest; one sentence on the claim."""
  lo, hi = sizes[0], sizes[-1]
  per_arm = {}
  for arm in ARMS:
    if arm == 'full' or arm not in main.get(hi, {}).get('gap', {}):
      continue
    g_hi = main[hi]['gap'][arm]
    r = dict(gap_largest=g_hi['mean'], under_2_points=g_hi['mean'] <
             GAP_CLAIM)
    if len(sizes) > 1 and arm in main.get(lo, {}).get('gap', {}):
      r['trend'] = trend(main[lo]['gap'][arm], g_hi)
    per_arm[arm] = r
  mods = [a for a in MODULES if a in per_arm]
  both = [a for a in mods if per_arm[a]['under_2_points'] and
          per_arm[a].get('trend', '').startswith('shrinks')]
  under = [a for a in mods if per_arm[a]['under_2_points']]
  shrink = [a for a in mods if per_arm[a].get('trend', '').startswith(
      'shrinks')]
  if mods and len(both) == len(mods):
    claim = 'The claim holds here'
  elif both or under or shrink:
    claim = 'The claim holds only in part here'
  else:
    claim = 'The claim does not hold here'
  trends = '; '.join(
      f"{a} {100 * main[lo]['gap'][a]['mean']:+.1f} -> "
      f"{100 * per_arm[a]['gap_largest']:+.1f} points: {per_arm[a]['trend']}"
      for a in per_arm if 'trend' in per_arm[a])
  text = (f"{claim}: gap to full fine-tuning at the {hi} backbone under 2 "
          f"points for {', '.join(under) or 'no module'}; from {lo} to {hi} "
          f"it shrinks for {', '.join(shrink) or 'no module'} "
          f"({trends or 'one size only'}; shrinks/grows: the mean gaps "
          'differ by more than two standard errors).')
  return dict(per_arm=per_arm, summary=text)


# Outputs.

ARM_COLORS = {'full': 'C3', 'lora': 'C1', 'adapter': 'C2', 'prompt': 'C4',
              'head': 'C7', 'local': 'C5'}


def plot(out: dict, path: str) -> None:
  """Left: test accuracy per arm and size (mean ± sd); middle: gap to full
  against backbone parameters per arm; right: the other cells' gaps."""
  import plots  # pylint: disable=g-import-not-at-top (benchmarks/plots.py)
  plt = plots._pyplot()  # pylint: disable=protected-access
  if plt is None:
    return
  main, sizes = out['main'], [s for s in out['sizes'] if s in out['main']]
  if not sizes:
    return
  extra = out.get('extra', {})
  ncols = 3 if extra else 2
  fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.6))
  ax = axes[0]
  arms = [a for a in ARMS if any(a in main[s]['accuracy'] for s in sizes)]
  width = 0.8 / len(sizes)
  for i, s in enumerate(sizes):
    xs = [j + (i - (len(sizes) - 1) / 2) * width for j in range(len(arms))]
    ys = [main[s]['accuracy'].get(a, {}).get('mean', np.nan) for a in arms]
    es = [main[s]['accuracy'].get(a, {}).get('sd') or 0 for a in arms]
    ax.bar(xs, ys, width, yerr=es, capsize=3, alpha=0.85,
           color=f'C{i}', label=f"{s} ({out['backbones'][s]['params'] / 1e3:.0f}k params)")
  ax.set_xticks(range(len(arms)))
  ax.set_xticklabels(arms, rotation=30, ha='right')
  finite = [v['mean'] for s in sizes for v in main[s]['accuracy'].values()]
  lo, hi = max(0.0, min(finite) - 0.1), max(finite)
  ax.set_ylim(lo, hi + 0.3 * (hi - lo) + 0.02)  # room for the legend
  ax.set_ylabel('test accuracy, classes 5-9 (mean ± s.d. over seeds)')
  ax.set_title(f"alpha {out['alpha_main']:g}, S {out['steps_main']}",
               fontsize=10)
  ax.legend(fontsize=8, loc='upper center', ncol=len(sizes))
  ax.grid(True, axis='y', alpha=0.3, lw=0.5)

  ax = axes[1]
  params = [out['backbones'][s]['params'] / 1e3 for s in sizes]
  for a in ARMS:
    if a == 'full' or not all(a in main[s]['gap'] for s in sizes):
      continue
    ys = [100 * main[s]['gap'][a]['mean'] for s in sizes]
    es = [100 * (main[s]['gap'][a]['sd'] or 0) for s in sizes]
    ax.errorbar(params, ys, yerr=es, marker='o', capsize=3,
                color=ARM_COLORS[a], label=a)
  ax.axhline(100 * GAP_CLAIM, color='grey', ls='--', lw=1)
  ax.axhline(0, color='k', lw=0.5)
  ax.text(params[0], 100 * GAP_CLAIM, ' 2-point claim', fontsize=7,
          color='grey', va='bottom')
  ax.set_xscale('log')
  ax.set_xticks(params)
  ax.set_xticklabels([f'{s}\n{p:.0f}k' for s, p in zip(sizes, params)])
  ax.minorticks_off()
  ax.margins(x=0.25)
  ax.set_xlabel('backbone (parameters)')
  ax.set_ylabel('gap to full fine-tuning (points; mean ± s.d.)')
  ax.set_title('full minus arm, paired by seed', fontsize=10)
  ax.legend(fontsize=8, loc='best')
  ax.grid(True, alpha=0.3, lw=0.5)

  if extra:
    ax = axes[2]
    cells = sorted({c for s in extra for c in extra[s]},
                   key=lambda c: (float(c.split('/')[0][5:]),
                                  int(c.split('/')[1][1:])))
    for i, s in enumerate(sizes):
      if s not in extra:
        continue
      xs = [j + (i - (len(sizes) - 1) / 2) * 0.3 for j in range(len(cells))]
      ys = [100 * extra[s][c]['gap']['mean'] if c in extra[s] else np.nan
            for c in cells]
      es = [100 * (extra[s][c]['gap']['sd'] or 0) if c in extra[s] else 0
            for c in cells]
      ax.errorbar(xs, ys, yerr=es, fmt='o', capsize=3, color=f'C{i}',
                  label=f"{s}: {extra[s][cells[0]]['arm'] if cells[0] in extra[s] else ''}")
    ax.axhline(100 * GAP_CLAIM, color='grey', ls='--', lw=1)
    ax.axhline(0, color='k', lw=0.5)
    ax.set_xlim(-0.6, len(cells) - 0.4)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([c.replace('/', '\n') for c in cells], fontsize=8)
    ax.set_ylabel('gap to full (points; mean ± s.d.)')
    ax.set_title('best module at the other cells', fontsize=10)
    ax.legend(fontsize=8, loc='best')
    ax.grid(True, alpha=0.3, lw=0.5)
  fig.suptitle('FedYolo on Fashion-MNIST: ViT pretrained on classes 0-4, '
               'federated fine-tuning on 5-9', fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f'plot: {path}')


def headline(out: dict) -> dict:
  r4 = lambda x: None if x is None else round(x, 4)  # pylint: disable=unnecessary-lambda-assignment
  return {
      'complete': out['complete'],
      'gap_to_full': {s: {a: {'mean': r4(g['mean']), 'sd': r4(g['sd']),
                              'n': g['n']} for a, g in m['gap'].items()}
                      for s, m in out['main'].items()},
      'accuracy': {s: {a: {'mean': r4(v['mean']), 'sd': r4(v['sd'])}
                       for a, v in m['accuracy'].items()}
                   for s, m in out['main'].items()},
      'backbone_params': {s: b['params'] for s, b in out['backbones'].items()},
      'other_cells_gap': {s: {c: {'arm': v['arm'],
                                  'mean': r4(v['gap']['mean']),
                                  'sd': r4(v['gap']['sd'])}
                              for c, v in cells.items()}
                          for s, cells in out.get('extra', {}).items()},
      'multitask': {s: {k: {'task0_drop': r4(v['task0_drop']),
                            'task0_after_task1': r4(v['task0_after_task1']),
                            'task1': r4(v['task1_after_task1']),
                            'task0_program_unchanged':
                                v['task0_program_unchanged']}
                        for k, v in mt.items()}
                    for s, mt in out.get('multitask', {}).items()},
      'verdict': out['verdict']['summary'] if out.get('verdict') else None}


def markdown(out: dict) -> str:
  m = out['machine']
  lines = [
      '## FedYolo at two backbone sizes on Fashion-MNIST '
      '(`benchmarks/fedyolo_scale.py`, issue 16 item 2)', '',
      f"Machine: {m['processor']}, {m['cpus']} CPUs, {m['backend']}; "
      f"jax {m['jax']}, flax {m['flax']}, optax {m['optax']}, python "
      f"{m['python']}; commit {out['git_head']}.", '',
      f"Command: `{out['command']}` ({out['seconds'] / 60:.0f} min of "
      f"training over {out['processes']} process(es)"
      + ('' if out['complete'] else '; INCOMPLETE') + ').', '']
  for s, b in out['backbones'].items():
    a = b['arch']
    lines.append(
        f"* {s} backbone: ViT of {a['num_layers']} blocks, d_model "
        f"{a['d_model']}, {a['num_heads']} heads, MLP {a['mlp_dim']}, "
        f"{a['patch_size']}x{a['patch_size']} patches ({b['params']:,} "
        f"parameters), pretrained {b['steps']} Adam steps (batch 64) on the "
        f"30,000 training images of classes 0-4: test accuracy "
        f"{b['test_accuracy']:.3f}.")
  lines += [
      '',
      f"Fine-tuning on classes 5-9: {out['rounds']} rounds, "
      f"{out['clients']} clients + {out['heldout']} held-out, 10 per round, "
      f"Adam batch {BATCH}; main cell alpha "
      f"{out['alpha_main']:g}, S {out['steps_main']}, seeds {out['seeds']}; "
      'lr per arm and size chosen on the grid by seed '
      f"{out['seeds'][0]}'s held-out accuracy at the main cell.", '',
      '| backbone | arm | lr | test accuracy | gap to full (points) | '
      'upload kB / client / round |',
      '| --- | --- | --- | --- | --- | --- |']
  for s, mm in out['main'].items():
    for a, acc in mm['accuracy'].items():
      g = mm['gap'].get(a)
      sd = lambda x: '' if x is None else f' ± {x:.3f}'  # pylint: disable=unnecessary-lambda-assignment
      gtxt = '' if g is None else (
          f"{100 * g['mean']:+.1f}" + ('' if g['sd'] is None else
                                       f" ± {100 * g['sd']:.1f}"))
      lr = mm['lr'][a]
      up = mm['upload_kB'].get(a)
      lines.append(
          f"| {s} | {a} | {lr['lr']:g}{' (edge)' if lr['lr_at_grid_edge'] else ''}"
          f"{' (of ' + lr['lr_of'] + ')' if lr.get('lr_of') else ''}"
          f" | {acc['mean']:.3f}{sd(acc['sd'])} | {gtxt} | "
          f"{'' if up is None else f'{up:.1f}'} |")
  if out.get('extra'):
    lines += ['', 'Other cells (full vs the best module of the main cell; '
              'lr of the main cell; seeds ' + str(out['extra_seeds']) + '):',
              '', '| backbone | cell | module | full | module | gap (points) |',
              '| --- | --- | --- | --- | --- | --- |']
    for s, cells in out['extra'].items():
      for c, v in cells.items():
        g = v['gap']
        lines.append(
            f"| {s} | {c} | {v['arm']} | {v['full']['mean']:.3f} | "
            f"{v['module']['mean']:.3f} | {100 * g['mean']:+.1f}"
            + ('' if g['sd'] is None else f" ± {100 * g['sd']:.1f}") + ' |')
  if out.get('multitask'):
    lines += ['', 'Multi-task, sequential (task 0 = classes 0-4, then task '
              '1 = classes 5-9; ' f"{out['rounds']} rounds each, seed "
              f"{out['seeds'][0]}):", '',
              '| backbone | run | task 0 after task 0 | task 0 after '
              'task 1 | drop | task 1 | task-0 program unchanged |',
              '| --- | --- | --- | --- | --- | --- | --- |']
    for s, mt in out['multitask'].items():
      for k, v in mt.items():
        lines.append(
            f"| {s} | {'shared full fine-tuning' if k == 'full' else 'per-task ' + k}"
            f" | {v['task0_after_task0']:.3f} | "
            f"{v['task0_after_task1']:.3f} | {100 * v['task0_drop']:+.1f} | "
            f"{v['task1_after_task1']:.3f} | {v['task0_program_unchanged']} |")
  if out.get('verdict'):
    lines += ['', 'Verdict: ' + out['verdict']['summary']]
  if out['missing']:
    lines += ['', 'Not run (time): ' + ', '.join(out['missing']) + '.']
  lines += ['', f"Plot: `{out['plot']}`.", '']
  return '\n'.join(lines)


def write_outputs(out: dict, path: str) -> None:
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  stem = os.path.splitext(path)[0]
  with open(path, 'w') as f:
    json.dump(out, f, indent=1)
  with open(stem + '.md', 'w') as f:
    f.write(markdown(out))
  try:
    plot(out, stem + '.png')
  except Exception as e:  # pylint: disable=broad-except
    print(f'plot failed: {e!r}')


def parse_args(argv):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--sizes', default='small,large',
                  help=f'backbones, of {sorted(SIZES)}')
  ap.add_argument('--arms', default=','.join(ARMS))
  ap.add_argument('--rounds', type=int, default=30)
  ap.add_argument('--seeds', default='0,1,2')
  ap.add_argument('--alpha_main', type=float, default=0.1)
  ap.add_argument('--steps_main', type=int, default=4)
  ap.add_argument('--alphas', default='0.1,1',
                  help='Dirichlet alphas of the grid')
  ap.add_argument('--steps', default='1,4,16', help='local steps of the grid')
  ap.add_argument('--grid', choices=('reduced', 'full'), default='reduced',
                  help='reduced: every arm at the main cell only, full and '
                  'the best module at the other cells; full: every arm at '
                  'every cell with every seed')
  ap.add_argument('--extra_seeds', default='0,1,2',
                  help='seeds of the other cells (--grid reduced)')
  ap.add_argument('--lr_extensions', type=int, default=3,
                  help='how many times a tuned lr at its grid\'s edge '
                  'extends the grid past that edge')
  ap.add_argument('--lrs', default='',
                  help='one client-lr grid for every arm (default: '
                  'LR_GRIDS per arm)')
  ap.add_argument('--tune_every_arm', action='store_true',
                  help='tune local on its own grid too (default: the lr '
                  'of full, LR_SHARED)')
  ap.add_argument('--late_arms', default='local',
                  help='arms whose main-cell runs come last (after the '
                  'multi-task runs and the other cells): the slow ones')
  ap.add_argument('--pretrain_steps', default='1500,1500',
                  help='per size, or one number for all')
  ap.add_argument('--clients', type=int, default=100,
                  help='training clients (multi-task: half per task)')
  ap.add_argument('--heldout', type=int, default=10,
                  help='held-out clients, for the lr choice')
  ap.add_argument('--no_multitask', action='store_true')
  ap.add_argument('--multitask_kinds', default='best,full',
                  help="multi-task arms: 'best' (the main cell's best "
                  "module), a module name, 'full' (shared full fine-tuning)")
  ap.add_argument('--compile_cache', default='',
                  help="JAX's persistent compilation cache (default "
                  "WORKDIR/jax_cache; 'none': leave JAX's setting alone)")
  ap.add_argument('--quick', action='store_true',
                  help='smoke run: tiny backbones, 3 rounds, seed 0, one lr '
                  'per arm, 40 pretraining steps, one other cell')
  ap.add_argument('--time_limit', type=float, default=540,
                  help='seconds after which no run starts (re-run to go on)')
  ap.add_argument('--data_dir', default='',
                  help="Fashion-MNIST IDX files (default: Debian's path)")
  ap.add_argument('--workdir', default='/tmp/fedjax_eff_fedyolo_scale')
  ap.add_argument('--out', default='',
                  help='default: benchmarks/results/fedyolo_scale.json '
                  '(--quick: WORKDIR/fedyolo_scale_quick.json)')
  ap.add_argument('--replot', action='store_true',
                  help="train nothing: redraw --out's PNG and markdown")
  args = ap.parse_args(argv)
  # (--time_limit only decides where a process stops: not part of it)
  argv_ = list(argv if argv is not None else sys.argv[1:])
  for i, a in enumerate(argv_):
    if a == '--time_limit':
      del argv_[i:i + 2]
      break
  argv_ = [a for a in argv_ if not a.startswith('--time_limit=')]
  args.command = ' '.join(['python benchmarks/fedyolo_scale.py'] + argv_)
  if args.quick:
    args.rounds, args.seeds, args.extra_seeds = min(args.rounds, 3), '0', '0'
    args.pretrain_steps = '40'
    if args.steps == '1,4,16':  # the default: S of the main cell only
      args.steps = str(args.steps_main)
    args.sizes_table = QUICK_SIZES
  else:
    args.sizes_table = SIZES
  if not args.out:
    args.out = (os.path.join(args.workdir, 'fedyolo_scale_quick.json')
                if args.quick else os.path.join(RESULTS, 'fedyolo_scale.json'))
  names = args.sizes.split(',')
  args.sizes = {s: args.sizes_table[s] for s in names}
  args.arms = [a for a in args.arms.split(',') if a]
  args.multitask_kinds = [k for k in args.multitask_kinds.split(',') if k]
  args.late_arms = [a for a in args.late_arms.split(',') if a]
  if 'full' not in args.arms:
    raise ValueError('--arms needs full (every gap is to full).')
  args.seeds = [int(s) for s in args.seeds.split(',')]
  args.extra_seeds = [int(s) for s in args.extra_seeds.split(',')]
  args.alphas = [float(x) for x in args.alphas.split(',')]
  args.steps = [int(x) for x in args.steps.split(',')]
  steps = [int(x) for x in str(args.pretrain_steps).split(',')]
  args.pretrain_by_size = {s: steps[min(i, len(steps) - 1)]
                           for i, s in enumerate(names)}
  if args.lrs:
    grid = tuple(float(x) for x in args.lrs.split(','))
    args.lr_grids = {a: grid for a in ARMS}
  else:
    args.lr_grids = dict(LR_GRIDS)
  if args.quick:
    args.lr_grids = {a: (g[1],) for a, g in args.lr_grids.items()}
  args.lr_shared = {} if args.tune_every_arm else dict(LR_SHARED)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.replot:
    with open(args.out) as f:
      out = json.load(f)
    write_outputs(out, args.out)
    return out
  os.makedirs(args.workdir, exist_ok=True)
  if args.compile_cache != 'none':
    jax.config.update('jax_compilation_cache_dir', args.compile_cache or
                      os.path.join(args.workdir, 'jax_cache'))
    # every program, even the eager ops of model.init (~100 per run)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  v = versions()
  machine = dict(processor=platform.processor() or platform.machine(),
                 cpus=os.cpu_count(), backend=jax.default_backend(),
                 jax=v.get('jax'), flax=v.get('flax'), optax=v.get('optax'),
                 python=v.get('python'))
  store = Store(os.path.join(
      args.workdir, 'cells_quick.json' if args.quick else 'cells.json'),
                args.time_limit)
  t0 = time.time()

  def log(msg):
    print(f'[{time.time() - t0:5.0f} s] {msg}', flush=True)

  log(f"jax {machine['jax']} on {machine['backend']}, {machine['cpus']} cpus;"
      f" {len(store.cells)} runs already stored in {store.path}")
  backbones, main_res, extra, mt, missing = {}, {}, {}, {}, []

  def step(what, fn):
    """Runs `fn`; on OutOfTime records `what` as missing."""
    try:
      return fn()
    except OutOfTime:
      missing.append(what)
      return None

  # 1. Backbones (cached by size and steps).
  for s, arch in args.sizes.items():
    steps = args.pretrain_by_size[s]
    tag = '_'.join(f'{k}{v}' for k, v in sorted(arch.items()))
    path = os.path.join(args.workdir, f'backbone_{tag}_{steps}')

    def pre(s=s, steps=steps, path=path):
      t = time.time()
      c = pretrain_config(args, s)
      r = pretrain_lib.pretrain(c, path)
      log(f"backbone {s}: {r['steps']} steps, test accuracy "
          f"{r['test_accuracy']:.3f} ({time.time() - t:.0f} s)")
      return dict(test_accuracy=float(r['test_accuracy']),
                  steps=int(r['steps']), seconds=time.time() - t)

    b = step(f'{s} backbone', lambda: store.get(f'{s}/backbone/{steps}', pre))
    if b is not None:
      backbones[s] = dict(b, arch=arch, params=_n_params(arch), path=path)

  # 2. Main cell: every arm, lr tuned, every seed.
  a0, s0 = args.alpha_main, args.steps_main

  per_seed: dict[str, dict] = {}

  def main_cell(s, arms):
    bb = backbones[s]['path']
    res = main_res.setdefault(
        s, {'lr': {}, 'accuracy': {}, 'gap': {}, 'upload_kB': {}})
    for arm in arms:
      if arm in args.lr_shared:
        src = res['lr'].get(args.lr_shared[arm])
        if src is None:
          missing.append(f'{s} {arm} (needs the lr of '
                         f'{args.lr_shared[arm]})')
          continue
        t = dict(lr=src['lr'], lr_at_grid_edge=False,
                 heldout_accuracy_by_lr={}, lr_of=args.lr_shared[arm])
      else:
        t = step(f'{s} {arm} lr', lambda arm=arm: tune_lr(
            args, store, log, s, arm, bb))
      if t is None:
        continue
      accs = []
      for seed in args.seeds:
        r = step(f'{s} {arm} seed {seed}', lambda arm=arm, seed=seed:
                 run_cell(args, store, log, s, arm, a0, s0, t['lr'], seed,
                          bb))
        if r is None:
          break
        accs.append(r['test_accuracy'])
        if seed == args.seeds[0] and 'upload_bits' in r:
          res['upload_kB'][arm] = r['upload_bits'] / 8e3
      if len(accs) == len(args.seeds):
        per_seed.setdefault(s, {})[arm] = accs
        res['lr'][arm] = t
        res['accuracy'][arm] = summarize(accs)
    mine = per_seed.get(s, {})
    if 'full' in mine:
      for arm, accs in mine.items():
        if arm != 'full':
          res['gap'][arm] = gap(mine['full'], accs)

  # Arms of --late_arms (the slow fully-local runs) after everything else.
  late = [a for a in args.arms if a in args.late_arms]
  for s in backbones:
    main_cell(s, [a for a in args.arms if a not in late])

  # 3. Multi-task without forgetting (seed 0): the best module vs full.
  def best_module(s):
    g = {a: v['mean'] for a, v in main_res[s]['gap'].items() if a in MODULES}
    return min(g, key=g.get) if g else None

  if not args.no_multitask:
    for s in backbones:
      best = best_module(s)
      if best is None or 'full' not in main_res[s]['lr']:
        missing.append(f'{s} multitask (no full or module at the main '
                       'cell)')
        continue
      for kind in [best if k == 'best' else k for k in args.multitask_kinds]:
        if kind not in main_res[s]['lr']:
          missing.append(f'{s} multitask {kind} (no tuned lr)')
          continue
        lr = main_res[s]['lr'][kind]['lr']
        r = step(f'{s} multitask {kind}', lambda s=s, kind=kind, lr=lr:
                 store.get(f'{s}/multitask/{kind}/lr{lr:g}/seed'
                           f'{args.seeds[0]}/R{args.rounds}',
                           lambda: multitask(args, s, kind, lr,
                                             args.seeds[0],
                                             backbones[s]['path'], log)))
        if r is not None:
          mt.setdefault(s, {})[kind] = r

  # 4. The other cells of the grid, cell by cell for every size (alpha
  # and S both off the main cell's first: --alphas x --steps, ordered).
  cells = sorted(((a, S) for a in args.alphas for S in args.steps
                  if (a, S) != (a0, s0)),
                 key=lambda c: ((c[0] == a0) + (c[1] == s0), c))
  plan = {}
  for s in backbones if cells else ():
    best = best_module(s)
    if args.grid == 'full':
      arms = [a for a in args.arms if a != 'full' and
              a in main_res[s]['lr']]
      seeds = args.seeds
    else:
      arms, seeds = ([best] if best else []), args.extra_seeds
    if 'full' not in main_res[s]['lr'] or not arms:
      missing.append(f'{s} other cells (no full or module at the main '
                     'cell)')
    else:
      plan[s] = (arms, seeds)
  for alpha, S in cells:
    cell = f'alpha{alpha:g}/S{S}'
    for s, (arms, seeds) in plan.items():
      accs = {}
      for arm in ['full'] + arms:
        lr = main_res[s]['lr'][arm]['lr']
        got = []
        for seed in seeds:
          r = step(f'{s} {cell} {arm} seed {seed}',
                   lambda s=s, arm=arm, lr=lr, seed=seed, alpha=alpha, S=S:
                   run_cell(args, store, log, s, arm, alpha, S, lr, seed,
                            backbones[s]['path']))
          if r is None:
            break
          got.append(r['test_accuracy'])
        if len(got) == len(seeds):
          accs[arm] = got
      if 'full' not in accs:
        continue
      for arm in arms:
        if arm in accs:
          name = cell if len(arms) == 1 else f'{cell}/{arm}'
          extra.setdefault(s, {})[name] = dict(
              arm=arm, full=summarize(accs['full']),
              module=summarize(accs[arm]), gap=gap(accs['full'], accs[arm]))

  for s in backbones:
    main_cell(s, late)

  sizes_done = [s for s in args.sizes if s in main_res and
                'full' in main_res[s]['accuracy']]
  verdict = judge(main_res, sizes_done) if sizes_done else None
  if verdict and mt:
    forget = '; '.join(
        f"{s}: {'shared full fine-tuning' if k == 'full' else 'per-task ' + k}"
        f" task-0 drop {100 * v['task0_drop']:+.1f} points"
        f" (program unchanged: {v['task0_program_unchanged']})"
        for s, m in mt.items() for k, v in m.items())
    verdict['multitask'] = forget
    verdict['summary'] += ' Multi-task (task 0 then task 1): ' + forget + '.'
  prev = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      try:
        prev = json.load(f)
      except ValueError:
        prev = {}
  same = re.sub(r' --time_limit[ =]\S+', '', prev.get('command', '')
                ) == args.command
  out = {
      'complete': not missing,
      'sizes': list(args.sizes), 'arms': args.arms, 'rounds': args.rounds,
      'clients': args.clients, 'heldout': args.heldout,
      'seeds': args.seeds, 'extra_seeds': args.extra_seeds,
      'alpha_main': a0, 'steps_main': s0, 'alphas': args.alphas,
      'steps': args.steps, 'grid': args.grid,
      'lr_grids': {a: list(g) for a, g in args.lr_grids.items()},
      'lr_shared': args.lr_shared,
      'backbones': backbones, 'main': main_res, 'extra': extra,
      'multitask': mt, 'verdict': verdict, 'missing': missing,
      'machine': machine, 'versions': v,
      'git_head': caff._git('rev-parse', '--short', 'HEAD'),  # pylint: disable=protected-access
      'command': args.command,
      # training seconds summed over the stored runs (every process)
      'seconds': float(sum(c.get('seconds', 0) for c in store.cells.values()
                           if isinstance(c, dict))),
      'processes': (prev.get('processes', 0) if same else 0) + 1,
      'cells': store.cells,
      'plot': os.path.relpath(os.path.splitext(args.out)[0] + '.png', ROOT)}
  out['headline'] = headline(out)
  if missing:
    log(f'incomplete ({len(missing)} steps left, {store.ran} runs this '
        'process): re-run the same command to continue')
  elif verdict:
    print(verdict['summary'])
  write_outputs(out, args.out)
  print(json.dumps(out['headline']))
  return out


if __name__ == '__main__':
  main()
