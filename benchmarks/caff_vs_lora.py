"""CAFF (last-n layers) vs LoRA vs adapters at equal device budget.

Pfeiffer et al. 2024 (arXiv 2411.07826) claim that, when every device must
fit a memory (and FLOPs) budget, training the last n layers of a pretrained
transformer (the largest n that fits) beats LoRA, which is parameter-lean
but still back-propagates through every layer. This script tests it.

Backbone: a small ViT (4 pre-LN blocks, d_model 64, 4 heads, MLP 128,
7x7 patches of 28x28 images: 16 tokens) pretrained centrally on
Fashion-MNIST classes 0-4 (`experiment.pretrain`, cached in --workdir),
then fine-tuned federatedly on the unseen classes 5-9 with a fresh head
(100 training + 10 held-out clients, Dirichlet 0.5; 10 clients per round,
4 local Adam steps of batch 16).

Device costs are measured at run time, never typed in: every program a
device could run (last n = 0..4, LoRA of each rank, adapters of each
bottleneck width, each tier of the mixed arms) is compiled for one client
and read by `accounting.client_cost` (XLA's memory and cost analyses). The
budgets (peak training memory of one client) are:

  lora_r4   LoRA rank 4's measured peak (attention query/value kernels)
  lora_r8   LoRA rank 8's
  tight     between the peaks of last-(n*-1) and last-n*, n* the n that
            fits lora_r4 (a budget no LoRA rank meets; if one did, just
            below the smallest LoRA's peak)

Text arm (`--backbone minilm`): the shipped all-MiniLM-L6-v2 (BERT, 6
post-LN blocks, d 384, 22.7M parameters, `models/hf.py`), pretrained by
others on a billion sentence pairs, fine-tuned federatedly with a fresh
head on the offline docstring-topic task `stdlib_docs` (a docstring
paragraph of the Python standard library -> which of ten packages it is
from; 32 WordPiece tokens; 100 training + 10 held-out clients, Dirichlet
0.5). Same budgets, arms and rules; no pretraining step.

At each budget, with every client on that budget (equal tiers): the largest
last-n that fits (`last_n.choose_n`, the picker of `budgeted_last_n`), the
largest LoRA rank that fits, the largest adapter width that fits. Mixed
tiers (a third of the clients on each budget): last-n with each tier's own
n, against LoRA / adapters of the one size that every tier able to run a
module can hold (modules of different sizes cannot be averaged), the
clients that can hold none training the head only. Baselines (no budget):
head only, full fine-tuning, full training from a random init.

Each arm's client learning rate is chosen from the same grid (--lrs) by
its held-out-client accuracy with seed 0 (where the best lies on the
grid's edge, the grid is extended once by one step beyond it, for every
arm alike); the chosen rate is then run with
every seed (--seeds) and the central test accuracy is reported as mean and
sample standard deviation. FLOPs and upload are reported, not budgeted
(modules upload far less); the verdict says whether the last-n a budget
allows needs more FLOPs per round than the module it is compared with.

  python benchmarks/caff_vs_lora.py              # ~20 min on 2 CPU cores
  python benchmarks/caff_vs_lora.py --quick      # ~2-3 min: a smoke run
  python benchmarks/caff_vs_lora.py --rounds 40 --seeds 0,1,2,3
  python benchmarks/caff_vs_lora.py --backbone minilm   # an accelerator's:
      # ~20 s a round on one CPU core (10 clients x 4 steps of 16 x 32 ids)
  # The text arm at CPU scale, one --only set per core, then assembled:
  python benchmarks/caff_vs_lora.py --backbone minilm --rounds 15 \
      --clients_per_round 5 --only full,last_2,lora_r4,head   # core 0 ...
  python benchmarks/caff_vs_lora.py --backbone minilm --rounds 15 \
      --clients_per_round 5 --from_cache                      # assemble

Writes benchmarks/results/caff_vs_lora.{json,png,md} (the text arm:
caff_vs_lora_text.*). Last line: one JSON
object with, per budget and arm, `accuracy_mean`, `accuracy_sd`,
`peak_bytes` and `lr` (the JSON file holds everything: FLOPs, upload,
per-seed accuracies, the cost table), the budgets in bytes and the
verdict per budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from fedjax_eff import accounting, core, models
from fedjax_eff import techniques as techniques_lib
from fedjax_eff.data import task_registry
from fedjax_eff.models import hf
from fedjax_eff.experiment import pretrain as pretrain_lib
from fedjax_eff.experiment import train as train_lib
from fedjax_eff.experiment.build import versions
from fedjax_eff.experiment.defaults import base_config
from fedjax_eff.techniques import last_n as last_n_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'benchmarks', 'results')

ARCH = dict(num_layers=4, d_model=64, num_heads=4, mlp_dim=128, patch_size=7)
PRETRAIN_CLASSES, TASK_CLASSES = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
LORA_RANKS = (1, 4, 8)
ADAPTER_DIMS = (2, 8, 16, 32, 64)
LR_GRID = (3e-3, 1e-2, 3e-2)
# The text arm: one step lower (Adam on a pretrained BERT; the grid is
# extended once beyond an edge as for every arm).
TEXT_LR_GRID = (3e-4, 1e-3, 3e-3)
TEXT_SEQ_LEN = 32
BATCH, STEPS = 16, 4


class Backbone(NamedTuple):
  """What is fine-tuned: the model (`models.get_model` name and kwargs),
  its input batch and the data it is fine-tuned on."""
  name: str                 # 'vit' | 'minilm'
  model: str
  arch: dict
  num_classes: int
  batch_x: np.ndarray       # a zero batch [BATCH, ...] of its inputs
  model_dir: str = ''       # minilm: its Hugging Face directory

  @property
  def num_layers(self) -> int:
    return self.arch['num_layers']

  @property
  def pretrained_elsewhere(self) -> bool:
    """True: its checkpoint ships (no central pretraining step here)."""
    return self.name == 'minilm'


def make_backbone(name: str, model_dir: str = '') -> Backbone:
  if name == 'vit':
    return Backbone('vit', 'vit', dict(ARCH), len(TASK_CLASSES),
                    np.zeros((BATCH, 28, 28, 1), np.float32))
  if name == 'minilm':
    from fedjax_eff.data import stdlib_docs  # pylint: disable=g-import-not-at-top
    model_dir = os.path.abspath(model_dir or hf.minilm_dir())
    return Backbone('minilm', 'transformer',
                    hf.bert_model_kwargs(hf.read_config(model_dir)),
                    len(stdlib_docs.TOPICS),
                    np.zeros((BATCH, TEXT_SEQ_LEN), np.int32), model_dir)
  raise ValueError(f"--backbone={name!r} is not 'vit' or 'minilm'.")


def write_f16(out_dir: str) -> None:
  """A float16 copy of the installed all-MiniLM-L6-v2 (weights 91 -> 45
  MB; config and tokenizer files as they are), for a machine that must be
  carried its weights (`benchmarks/on_accelerator.sh`, part caff_text)."""
  import shutil as sh  # pylint: disable=g-import-not-at-top
  src = hf.minilm_dir()
  os.makedirs(out_dir, exist_ok=True)
  for name in ('config.json', 'vocab.txt', 'tokenizer_config.json',
               'special_tokens_map.json'):
    if os.path.isfile(os.path.join(src, name)):
      sh.copy(os.path.join(src, name), out_dir)
  hf.write_safetensors(
      os.path.join(out_dir, 'model.safetensors'),
      {k: v.astype(np.float16) if v.dtype == np.float32 else v
       for k, v in hf.read_weights(src).items()},
      metadata={'format': 'pt', 'note': 'float16 copy of all-MiniLM-L6-v2'})
  print(f'wrote {out_dir}')


class Arm(NamedTuple):
  """One fine-tuning configuration (the same one may serve several
  budgets). `entries`: config.techniques; `tiers`: tier fractions."""
  name: str
  family: str            # 'last_n' | 'lora' | 'adapter' | baseline name
  model_kw: tuple = ()   # extra ViT kwargs, as (key, value) pairs
  entries: tuple = ()    # technique entries, as tuples of (key, value)
  tiers: tuple = ()
  pretrained: bool = True

  @property
  def techniques(self) -> list[dict]:
    return [dict(e) for e in self.entries]


def _entry(**kw) -> tuple:
  return tuple(sorted(kw.items()))


def last_n_arm(n) -> Arm:
  if isinstance(n, int):
    return Arm(f'last_{n}', 'last_n', entries=(_entry(name='last_n', n=n),))
  return Arm('last_n' + '_'.join(map(str, n)), 'last_n',
             entries=(_entry(name='last_n', n=tuple(n)),),
             tiers=(1 / len(n),) * len(n))


def module_arm(family: str, size: int, head_only_tiers: tuple = (),
               num_layers: int = ARCH['num_layers']) -> Arm:
  """LoRA (`size` = rank) or adapters (`size` = bottleneck width); with
  `head_only_tiers` (a bool per tier), those tiers train the head only."""
  knob = {'lora': 'lora_rank', 'adapter': 'adapter_dim'}[family]
  tag = {'lora': 'r', 'adapter': 'd'}[family]
  entries = (_entry(name='modules', kinds=family),)
  name = f'{family}_{tag}{size}'
  if head_only_tiers:
    # A tier on n=0 trains the head only; n=L keeps every module trainable
    # (masks multiply).
    entries += (_entry(name='last_n', n=tuple(
        0 if h else num_layers for h in head_only_tiers)),)
    name += '_mixed'
  return Arm(name, family, model_kw=((knob, size),), entries=entries,
             tiers=((1 / len(head_only_tiers),) * len(head_only_tiers)
                    if head_only_tiers else ()))


BASELINES = {
    'head': Arm('head', 'head', entries=(_entry(name='modules', kinds=''),)),
    'full': Arm('full', 'full'),
    'scratch': Arm('scratch', 'scratch', pretrained=False),
}


def largest_fitting(sizes, cost_of, budget: last_n_lib.Budget):
  """The largest of `sizes` whose cost (`cost_of(size)`) fits `budget`, or
  None. Every size is measured; costs need not be monotone."""
  fits = [s for s in sizes if budget.fits(cost_of(s))]
  return max(fits) if fits else None


def tight_budget(last_costs: dict, n_star: int, lora_floor
                 ) -> last_n_lib.Budget:
  """A memory budget below what `n_star` layers need (between the peaks of
  n_star - 1 and n_star) and below the cheapest LoRA (`lora_floor`: its
  cost)."""
  if n_star < 1:
    raise ValueError('the LoRA r4 budget fits no layer: no tighter budget '
                     'leaves last-n anything to train.')
  lo, hi = last_costs[n_star - 1].peak_bytes, last_costs[n_star].peak_bytes
  mem = (lo + hi) / 2
  if mem >= lora_floor.peak_bytes:
    below = [c.peak_bytes for c in last_costs.values()
             if c.peak_bytes < lora_floor.peak_bytes]
    if not below:
      raise ValueError('no last-n is cheaper than the cheapest LoRA.')
    mem = (max(below) + lora_floor.peak_bytes) / 2
  return last_n_lib.Budget(memory_bytes=float(int(mem)))


def budget_of(cost) -> last_n_lib.Budget:
  """A device whose memory is exactly `cost`'s peak."""
  return last_n_lib.Budget(memory_bytes=float(cost.peak_bytes))


class Costs:
  """Measured device cost of each arm's program per tier: the same
  `accounting.client_cost` call as `Experiment.device_cost`, without
  loading the data, cached like it by what defines the program (model,
  technique name, static trainable mask, static forward kwargs), so a
  mixed arm's tier that runs last-2 reuses last-2's measurement."""

  def __init__(self, backbone: Backbone):
    self._cache: dict[tuple, Any] = {}
    self.backbone = backbone
    self.task_config = base_config().task
    self.optimizer = core.make_optimizer('adam', LR_GRID[0])
    self.batch = {'x': backbone.batch_x, 'y': np.zeros((BATCH,), np.int32)}

  def __call__(self, arm: Arm, tier: int = 0):
    b = self.backbone
    model = models.get_model(b.model, b.num_classes,
                             **{**b.arch, **dict(arm.model_kw)})
    params = jax.eval_shape(lambda: model.init(
        jax.random.key(0), self.batch['x'][:1])['params'])
    tech = techniques_lib.build(
        [ml_collections.ConfigDict(e) for e in arm.techniques],
        techniques_lib.TechniqueContext(model, params))
    if tech.specialize:
      tech = tech.specialize(None, tier)
    tech = core.technique.device_program(tech)
    ctx = {'client_index': np.int32(0), 'tier': np.int32(0)}
    found = core.technique.trace_plan(core.chain(tech), params, ctx)
    key = (arm.model_kw, tech.name, str(jax.tree.leaves(found['flags'])),
           str(sorted(found['forward'].items())))
    if key not in self._cache:
      task, _ = task_registry.build(self.task_config, model)
      self._cache[key] = accounting.client_cost(
          model, task, tech, self.optimizer, params, self.batch, STEPS, ctx,
          analytic=False)
    return self._cache[key]

  def mean_peak(self, arm: Arm) -> float:
    tiers = arm.tiers or (1.0,)
    return float(sum(f * self(arm, t).peak_bytes
                     for t, f in enumerate(tiers)))


def _config(args) -> ml_collections.ConfigDict:
  c = base_config()
  b = args.backbone
  c.model.name = b.model
  c.model.kwargs = ml_collections.ConfigDict(dict(b.arch))
  if b.name == 'minilm':
    c.data.source, c.data.seq_len = 'stdlib_docs', TEXT_SEQ_LEN
    c.data.data_dir = b.model_dir  # its vocab.txt tokenizes
  else:
    c.data.source = 'fashion_mnist'
  if args.data_dir:
    c.data.data_dir = args.data_dir
  c.data.num_clients, c.data.heldout_clients = 100, 10
  c.progress = c.tensorboard = False
  return c


def pretrain_config(args) -> ml_collections.ConfigDict:
  c = _config(args)
  c.data.classes = PRETRAIN_CLASSES
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=args.pretrain_steps, batch_size=64, optimizer='adam',
      learning_rate=1e-3, log_every=100, checkpoint_every=args.pretrain_steps))
  return c


def fine_tune_config(args, arm: Arm, lr: float, seed: int, backbone: str
                     ) -> ml_collections.ConfigDict:
  c = _config(args)
  c.seed = seed
  if args.backbone.name == 'vit':
    c.data.classes = TASK_CLASSES
  for k, v in arm.model_kw:
    c.model.kwargs[k] = v
  c.techniques = [ml_collections.ConfigDict(e) for e in arm.techniques]
  c.devices.tier_fractions = list(arm.tiers)
  c.num_rounds, c.clients_per_round = args.rounds, args.clients_per_round
  c.client.optimizer, c.client.learning_rate = 'adam', lr
  c.client.local_steps, c.client.batch_size = STEPS, BATCH
  if arm.pretrained:
    c.init_checkpoint, c.init_checkpoint_skip = backbone, '^head'
    if args.backbone.pretrained_elsewhere:  # a Hugging Face dir: no head
      c.init_checkpoint_skip = ''
  c.eval_every = c.checkpoint_every = args.rounds
  c.accounting = False  # measured once per program above
  return c


# Training seconds per arm over its runs (cached runs: as recorded when they
# ran), for the record of a study assembled from several invocations.
RUN_SECONDS: dict[str, float] = {}


class NotRun(Exception):
  """An arm this invocation may not train (`--only`, `--from_cache`) and
  whose runs are not all in the run cache."""


def run_key(args) -> dict:
  """What a cached run's metrics depend on besides arm, lr and seed."""
  return dict(backbone=args.backbone.name, rounds=args.rounds,
              clients_per_round=args.clients_per_round,
              pretrain_steps=(None if args.backbone.pretrained_elsewhere
                              else args.pretrain_steps),
              data_dir=args.data_dir, model_dir=args.backbone.model_dir)


def run_arm(args, arm: Arm, backbone: str, log, may_train: bool = True
            ) -> dict:
  """Learning rate from the grid by seed 0's held-out accuracy, then every
  seed at that rate; test accuracy per seed.

  Every run's final metrics are kept in `<workdir>/runs/<run>.json` with
  `run_key(args)`; a run whose file matches is not trained again. So an
  interrupted study resumes, and several invocations with disjoint
  `--only` sets (one per core) fill one cache that a last `--from_cache`
  invocation assembles. Without `may_train`, a missing run raises NotRun."""

  def one(lr, seed):
    workdir = os.path.join(args.workdir, 'runs',
                           f'{arm.name}_lr{lr:g}_seed{seed}')
    key = run_key(args)
    if os.path.isfile(workdir + '.json'):
      with open(workdir + '.json') as f:
        cached = json.load(f)
      if cached['key'] == key:
        RUN_SECONDS[arm.name] = RUN_SECONDS.get(arm.name, 0.) + \
            cached['seconds']
        return cached['metrics']
    if not may_train:
      raise NotRun(arm.name)
    shutil.rmtree(workdir, ignore_errors=True)  # always a fresh run
    t = time.time()
    s = train_lib.train_and_evaluate(
        fine_tune_config(args, arm, lr, seed, backbone), workdir)
    m = {k: float(v) for k, v in s['final_metrics'].items()
         if np.ndim(v) == 0 and np.issubdtype(np.asarray(v).dtype, np.number)}
    log(f'  {arm.name:22s} lr {lr:<7g} seed {seed}: test '
        f"{m['test_accuracy']:.4f} held-out {m['heldout_accuracy']:.4f} "
        f'({time.time() - t:.0f} s)')
    RUN_SECONDS[arm.name] = RUN_SECONDS.get(arm.name, 0.) + \
        time.time() - t
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    with open(workdir + '.json.tmp', 'w') as f:
      json.dump(dict(key=key, metrics=m, seconds=time.time() - t), f)
    os.replace(workdir + '.json.tmp', workdir + '.json')
    return m

  first = {lr: one(lr, args.seeds[0]) for lr in args.lrs}
  lr = extend_grid(first, lambda x: one(x, args.seeds[0]),
                   getattr(args, 'extend', 1))
  accs = [float(first[lr]['test_accuracy'])] + [
      float(one(lr, s)['test_accuracy']) for s in args.seeds[1:]]
  return dict(lr=lr, lr_at_grid_edge=len(first) > 1 and lr in (
      min(first), max(first)),
              heldout_accuracy_by_lr={f'{k:g}': float(v['heldout_accuracy'])
                                      for k, v in sorted(first.items())},
              accuracy_per_seed=accs, accuracy_mean=float(np.mean(accs)),
              accuracy_sd=float(np.std(accs, ddof=1)) if len(accs) > 1
              else None)


# Learning rates beyond a grid's edge: the 1-3-10 sequence.
LR_LADDER = tuple(sorted(k * 10.0 ** e for e in range(-7, 2) for k in (1, 3)))


def extend_grid(tried: dict, run, times: int = 1) -> float:
  """The learning rate with the best held-out accuracy in `tried` (lr ->
  metrics); while it is at the grid's edge, the grid is extended, at most
  `times` times, by the next rate of `LR_LADDER` beyond that edge, and
  `run(lr)` adds it to `tried`. The same rule for every arm."""

  def best():
    return max(tried, key=lambda x: tried[x]['heldout_accuracy'])

  if len(tried) < 2:
    return best()
  for _ in range(times):
    lr = best()
    beyond = ([x for x in LR_LADDER if x < lr / 1.01][-1:]
              if lr == min(tried) else
              [x for x in LR_LADDER if x > lr * 1.01][:1]
              if lr == max(tried) else [])
    if not beyond:
      break
    tried[beyond[0]] = run(beyond[0])
  return best()


def compare(a: dict, b: dict | None) -> str:
  """'wins' / 'loses' when the means differ by more than two standard
  errors of their difference, else 'ties'; 'unopposed' without b."""
  if b is None:
    return 'unopposed'
  k_a, k_b = len(a['accuracy_per_seed']), len(b['accuracy_per_seed'])
  if k_a < 2 or k_b < 2:
    return 'inconclusive (one seed)'
  se = math.sqrt(a['accuracy_sd'] ** 2 / k_a + b['accuracy_sd'] ** 2 / k_b)
  diff = a['accuracy_mean'] - b['accuracy_mean']
  return 'wins' if diff > 2 * se else 'loses' if diff < -2 * se else 'ties'


def judge(results: dict, budgets: list[str]) -> tuple[dict, str]:
  """Per budget, last-n against each module arm (and, where no module
  fits, against head-only training, what such a device can still train);
  and one sentence on the claim (last-n beats LoRA at equal budget)."""
  verdict, against = {}, {'lora': {}, 'adapter': {}}
  head = results.get('unconstrained', {}).get('head')
  if head is not None and head.get('not_run'):
    head = None

  def versus(mine, other):
    res = compare(mine, other)
    return res, (f"{res} ({mine['accuracy_mean']:.3f} vs "
                 f"{other['accuracy_mean']:.3f}; "
                 f"{mine['flops_per_round'] / 1e6:.0f} vs "
                 f"{other['flops_per_round'] / 1e6:.0f} MFLOPs/round)")

  for b in budgets:
    mine, parts = results[b]['last_n'], []
    if mine.get('not_run'):
      verdict[b] = f"{mine['planned']}: not run"
      continue
    for family in against:
      other = results[b][family]
      if other.get('not_run'):
        against[family][b] = 'not run'
        parts.append(f"vs {other['planned']}: not run")
        continue
      if 'arm' not in other:
        against[family][b] = 'unopposed'
        parts.append(f'vs {family}: none fits the budget')
        continue
      against[family][b], text = versus(mine, other)
      parts.append(f"vs {other['arm']}: {text}")
    if head and all(v[b] == 'unopposed' for v in against.values()):
      parts.append(f'vs head only (all such a device can train otherwise): '
                   f'{versus(mine, head)[1]}')
    verdict[b] = f"{mine['arm']}: " + '; '.join(parts)

  def sentence(family):
    found = {}
    for b, res in against[family].items():
      found.setdefault(res, []).append(b)
    return '; '.join(f"{res} at {', '.join(bs)}" for res, bs in found.items())

  lora = [r for r in against['lora'].values()
          if r not in ('unopposed', 'not run')]
  if any(r.startswith('inconclusive') for r in lora) or not lora:
    claim = 'The claim cannot be judged from this run'
  elif all(r == 'wins' for r in lora):
    claim = 'The claim holds here'
  elif 'wins' not in lora:
    claim = 'The claim does not hold here'
  else:
    claim = 'The claim holds only in part here'
  summary = (f"{claim}. Largest last-n that fits, against LoRA: "
             f"{sentence('lora')}. Against adapters: "
             f"{sentence('adapter')}. ('unopposed': no module of that kind "
             'fits the budget, so only last-n trains the backbone.)')
  return verdict, summary


def plot(table: dict, budgets: dict, path: str, text: bool = False) -> None:
  """Test accuracy (mean ± sd) against device peak memory, one colour per
  arm family, the budgets as dotted lines."""
  import plots  # pylint: disable=g-import-not-at-top (benchmarks/plots.py)
  plt = plots._pyplot()  # pylint: disable=protected-access
  if plt is None:
    return
  colors = {'last_n': 'C0', 'lora': 'C1', 'adapter': 'C2', 'head': 'C7',
            'full': 'C3', 'scratch': 'C5'}
  fig, ax = plt.subplots(figsize=(8, 5))
  xy, labels, cols, seen = [], [], [], set()
  for budget, arms in table.items():
    for r in arms.values():
      if 'arm' not in r or r['arm'] in seen:  # nothing fits / drawn
        continue
      seen.add(r['arm'])
      x, y = r['peak_bytes'] / 1e6, r['accuracy_mean']
      c = colors.get(r['family'], 'k')
      ax.errorbar(x, y, yerr=r['accuracy_sd'] or 0, fmt='none', ecolor=c,
                  elinewidth=1, capsize=3)
      ax.scatter(x, y, color=c, zorder=3, s=30,
                 marker='D' if budget == 'mixed' else
                 's' if budget == 'unconstrained' else 'o')
      xy.append((x, y))
      labels.append(r['arm'] + (' (tier mean)' if budget == 'mixed' else ''))
      cols.append(c)
  for name, b in budgets.items():
    ax.axvline(b['memory_bytes'] / 1e6, color='grey', ls=':', lw=1)
    ax.text(b['memory_bytes'] / 1e6, 0.01, f' {name}', rotation=90,
            transform=ax.get_xaxis_transform(), fontsize=7, color='grey',
            va='bottom')
  ax.margins(x=0.15, y=0.12)
  ax.set_xlabel('device peak memory per client (MB, XLA memory analysis)')
  ax.set_ylabel(('test accuracy, 10 docstring topics' if text else
                 'test accuracy, classes 5-9') + ' (mean ± s.d. over seeds)')
  ax.set_title('Last-n layers vs LoRA vs adapters under device budgets ' + (
      '(all-MiniLM-L6-v2, stdlib docstrings)' if text else
      '(pretrained ViT, Fashion-MNIST)'), fontsize=10)
  ax.grid(True, alpha=0.3, lw=0.5)
  fig.tight_layout()
  plots.place_labels(ax, xy, labels, cols)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f'plot: {path}')


def _git(*cmd) -> str:
  try:
    return subprocess.run(['git', *cmd], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return '?'


def headline(out: dict) -> dict:
  """The last line: per budget and arm, accuracy mean/sd and peak bytes."""
  return {
      'budgets_peak_bytes': {b: v['memory_bytes']
                             for b, v in out['budgets'].items()},
      'accuracy': {b: {f: ({'arm': r['arm'],
                            'accuracy_mean': round(r['accuracy_mean'], 4),
                            'accuracy_sd': (None if r['accuracy_sd'] is None
                                            else round(r['accuracy_sd'], 4)),
                            'peak_bytes': r['peak_bytes'], 'lr': r['lr']}
                           if 'arm' in r else None)
                       for f, r in arms.items()}
                   for b, arms in out['results'].items()},
      'verdict': out['verdict']}


def write_outputs(out: dict, path: str) -> None:
  """The JSON at `path`, its plot (.png) and its markdown section (.md)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  stem = os.path.splitext(path)[0]
  plot(out['results'], out['budgets'], stem + '.png',
       text=out.get('backbone') == 'minilm')
  with open(path, 'w') as f:
    json.dump(out, f, indent=2)
  with open(stem + '.md', 'w') as f:
    f.write(markdown(out))


def backbone_line(out: dict) -> str:
  a, k = out['arch'], out.get('clients_per_round', 10)
  if out.get('backbone') == 'minilm':
    what = (f"Backbone: all-MiniLM-L6-v2 as shipped ({a['num_layers']} "
            f"post-LN BERT blocks, d_model {a['d_model']}, {a['num_heads']} "
            f"heads, MLP {a['mlp_dim']}); fine-tuned federatedly with a "
            f"fresh head on the stdlib docstring topics ({TEXT_SEQ_LEN} "
            f"WordPiece ids, 10 classes) for {out['rounds']} rounds")
  else:
    what = (f"Backbone: ViT of {a['num_layers']} pre-LN blocks (d_model "
            f"{a['d_model']}, {a['num_heads']} heads, MLP {a['mlp_dim']}, "
            f"{a['patch_size']}x{a['patch_size']} patches), pretrained "
            f"{out['pretrain_steps']} Adam steps on Fashion-MNIST classes "
            f"0-4 (test accuracy {out['backbone_test_accuracy']:.3f}); "
            f"fine-tuned federatedly on classes 5-9 for {out['rounds']} "
            'rounds')
  return (what + f' (100 clients, Dirichlet 0.5, {k} per round, {STEPS} '
          f"Adam steps of batch {BATCH}); lr chosen per arm from "
          f"{out['lrs']} (extended past an edge up to "
          f"{out.get('extend', 1)}x) by held-out accuracy (seed "
          f"{out['seeds'][0]}), "
          f"then seeds {out['seeds']}.")


def markdown(out: dict) -> str:
  m = out['machine']
  lines = [
      '## CAFF (last-n) vs LoRA vs adapters at equal device budget',
      '',
      f"Machine: {m['processor']}, {m['cpus']} CPUs, {m['backend']}; "
      f"jax {m['jax']}, flax {m['flax']}, optax {m['optax']}; commit "
      f"{out['git_head']} (accounting last changed in "
      f"{out['accounting_commit']}).",
      '',
      f'Command: `{out["command"]}` ({out["seconds"] / 60:.0f} min' + (
          f"; its runs trained for {out['train_seconds'] / 60:.0f} min in "
          'all' if out.get('train_seconds') else '') + ').',
      '',
      backbone_line(out),
      '',
      'Budgets are peak memory per client; FLOPs and upload are reported, '
      'not budgeted. Mixed arms: peak, FLOPs and upload are means over the '
      'tiers.',
      '',
      '| budget (peak MB) | arm | lr | test accuracy | peak MB | '
      'MFLOPs/round | upload kB |',
      '| --- | --- | --- | --- | --- | --- | --- |']
  for budget, arms in out['results'].items():
    b = out['budgets'].get(budget)
    head = (f"{budget} ({b['memory_bytes'] / 1e6:.2f})" if b else
            f"mixed: a third on each of {' / '.join(out['mixed_tier_budgets'])}"
            if budget == 'mixed' else budget)
    for name, r in arms.items():
      if r.get('fits') is False:
        lines.append(f'| {head} | {name}: nothing fits | | | | | |')
        continue
      if r.get('not_run'):
        lines.append(f"| {head} | {r['planned']}: not run | | | | | |")
        continue
      sd = f" ± {r['accuracy_sd']:.3f}" if r['accuracy_sd'] is not None \
          else ''
      tiers = r.get('peak_bytes_per_tier')
      arm = r['arm'] + (' (tier peaks ' + ' / '.join(
          f'{p / 1e6:.2f}' for p in tiers) + ' MB)' if tiers else '')
      lines.append(
          f"| {head} | {arm} | {r['lr']:g}"
          f"{' (edge)' if r['lr_at_grid_edge'] else ''} | "
          f"{r['accuracy_mean']:.3f}{sd} | {r['peak_bytes'] / 1e6:.2f} | "
          f"{r['flops_per_round'] / 1e6:.0f} | "
          f"{r['upload_bytes'] / 1e3:.1f} |")
  lines += ['', f"Plot: `{out['plot']}`.", '', 'Verdict (last-n vs each '
            'module arm: wins/loses when the means differ by more than two '
            'standard errors):', '']
  lines += [f'* {b}: {v}' for b, v in out['verdict'].items()]
  lines += ['', f"Baselines (test accuracy): {out['baselines']}."]
  lines += ['', out['summary'], '']
  return '\n'.join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--backbone', default='vit', choices=('vit', 'minilm'),
                  help="vit: a ViT pretrained here on Fashion-MNIST 0-4; "
                  'minilm: the shipped all-MiniLM-L6-v2 on stdlib docstring '
                  'topics')
  ap.add_argument('--model_dir', default='',
                  help='minilm: a Hugging Face directory of all-MiniLM-L6-v2 '
                  '(default: the installed package\'s)')
  ap.add_argument('--write_f16', default='', metavar='DIR',
                  help='write a float16 copy of all-MiniLM-L6-v2 to DIR and '
                  'exit (for a machine it must be carried to)')
  ap.add_argument('--rounds', type=int, default=30)
  ap.add_argument('--clients_per_round', type=int, default=10)
  ap.add_argument('--seeds', default='0,1,2')
  ap.add_argument('--lrs', default='',
                  help='client Adam learning rates tried by every arm '
                  f'(default: {LR_GRID}; minilm {TEXT_LR_GRID})')
  ap.add_argument('--pretrain_steps', type=int, default=1500)
  ap.add_argument('--quick', action='store_true',
                  help='smoke run: 5 rounds, seed 0, one lr, 200 pretraining '
                  'steps, two adapter widths, no baselines but head-only')
  ap.add_argument('--data_dir', default='',
                  help='vit: the Fashion-MNIST IDX files (default: Debian\'s '
                  'path); minilm: the tokenizer dir (default: the model\'s)')
  ap.add_argument('--workdir', default='',
                  help='default /tmp/fedjax_eff_caff_vs_lora[_text]')
  ap.add_argument('--out', default='', help='default benchmarks/results/'
                  'caff_vs_lora.json (minilm: caff_vs_lora_text.json)')
  ap.add_argument('--extend', type=int, default=1,
                  help='how many times a grid whose best rate lies on its '
                  'edge is extended past it (the same for every arm)')
  ap.add_argument('--only', default='',
                  help='comma-separated arm names (as the plan prints them) '
                  'this invocation may train; other arms come from the run '
                  'cache in --workdir or are reported as not run')
  ap.add_argument('--from_cache', action='store_true',
                  help='train nothing: assemble the results from the run '
                  'cache of earlier invocations (e.g. one --only set per '
                  'core)')
  ap.add_argument('--replot', action='store_true',
                  help="train nothing: redraw --out's PNG and markdown from "
                  'its JSON')
  args = ap.parse_args()
  if args.write_f16:
    write_f16(args.write_f16)
    return
  text = args.backbone == 'minilm'
  args.out = args.out or os.path.join(
      RESULTS, 'caff_vs_lora_text.json' if text else 'caff_vs_lora.json')
  args.workdir = args.workdir or (
      '/tmp/fedjax_eff_caff_vs_lora' + ('_text' if text else ''))
  args.lrs = args.lrs or ','.join(
      f'{x:g}' for x in (TEXT_LR_GRID if text else LR_GRID))
  if args.replot:
    with open(args.out) as f:
      write_outputs(json.load(f), args.out)
    return
  if args.quick:
    args.rounds, args.seeds, args.pretrain_steps = 5, '0', 200
    args.lrs = args.lrs.split(',')[0]
  args.seeds = [int(s) for s in args.seeds.split(',')]
  args.only = set(filter(None, args.only.split(',')))
  args.lrs = [float(x) for x in args.lrs.split(',')]
  command = 'python benchmarks/caff_vs_lora.py ' + ' '.join(sys.argv[1:])
  # Seeds of one arm and lr compile the same programs: cache them.
  jax.config.update('jax_compilation_cache_dir',
                    os.path.join(args.workdir, 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  v = versions()
  machine = dict(processor=platform.processor() or platform.machine(),
                 cpus=os.cpu_count(), backend=jax.default_backend(),
                 jax=v.get('jax'), flax=v.get('flax'), optax=v.get('optax'),
                 python=v.get('python'))
  print(f"jax {machine['jax']} on {machine['backend']} "
        f"({machine['processor']}), {machine['cpus']} cpus; flax "
        f"{machine['flax']}, optax {machine['optax']}, python "
        f"{machine['python']}; git {_git('rev-parse', '--short', 'HEAD')}",
        flush=True)
  t0 = time.time()

  def log(msg):
    print(f'[{time.time() - t0:5.0f} s] {msg}', flush=True)

  # 1. Device costs, budgets and the arm each budget allows.
  args.backbone = make_backbone(args.backbone, args.model_dir)
  costs = Costs(args.backbone)
  L = args.backbone.num_layers
  last = {n: costs(last_n_arm(n)) for n in range(L + 1)}
  lora = {r: costs(module_arm('lora', r)) for r in LORA_RANKS}
  adapter_dims = (2, 16) if args.quick else ADAPTER_DIMS
  adapter = {d: costs(module_arm('adapter', d)) for d in adapter_dims}
  for name, table in (('last', last), ('lora_r', lora), ('adapter_d',
                                                        adapter)):
    for k, c in table.items():
      log(f'cost {name}{k:<3}: peak {c.peak_bytes / 1e6:6.3f} MB, '
          f'{c.flops_per_round / 1e6:6.0f} MFLOPs/round, '
          f'{c.upload_bits / 8e3:6.1f} kB up')
  budgets = {'lora_r4': budget_of(lora[4]), 'lora_r8': budget_of(lora[8])}
  n_star = last_n_lib.choose_n([budgets['lora_r4']], L, last.get)[0][0]
  budgets['tight'] = tight_budget(last, n_star, lora[min(LORA_RANKS)])
  order = ['tight', 'lora_r4', 'lora_r8']
  plans: dict[str, dict[str, Arm | None]] = {}
  for b in order:
    n = last_n_lib.choose_n([budgets[b]], L, last.get)[0][0]
    r = largest_fitting(LORA_RANKS, lora.get, budgets[b])
    d = largest_fitting(adapter_dims, adapter.get, budgets[b])
    plans[b] = {'last_n': last_n_arm(n),
                'lora': r and module_arm('lora', r),
                'adapter': d and module_arm('adapter', d)}
  # Mixed tiers: a third of the clients on each budget.
  tier_budgets = [budgets[b] for b in order]
  mixed_n, _ = last_n_lib.choose_n(tier_budgets, L, last.get)
  plans['mixed'] = {'last_n': last_n_arm(tuple(mixed_n))}
  for family, sizes, table in (('lora', LORA_RANKS, lora),
                               ('adapter', adapter_dims, adapter)):
    able = [b for b in tier_budgets
            if largest_fitting(sizes, table.get, b) is not None]
    size = min(largest_fitting(sizes, table.get, b) for b in able) \
        if able else None
    plans['mixed'][family] = size and module_arm(
        family, size, tuple(b not in able for b in tier_budgets),
        num_layers=L)
  plans['unconstrained'] = ({'head': BASELINES['head']} if args.quick
                   else dict(BASELINES))
  for b, arms in plans.items():
    bud = budgets.get(b)
    log(f'budget {b}' + (f' ({bud.memory_bytes / 1e6:.3f} MB)'
                         if bud else '') + ': ' +
        ', '.join(f'{k} -> {a.name if a else "nothing fits"}'
                  for k, a in arms.items()))
  planned = {a.name for arms in plans.values() for a in arms.values() if a}
  if args.only - planned:
    raise SystemExit(f'--only: no arm named {sorted(args.only - planned)}; '
                     f'this plan has {sorted(planned)}')
  for arm in plans['mixed'].values():  # every tier within its budget
    for t, tb in enumerate(tier_budgets):
      if arm and not tb.fits(costs(arm, t)):
        raise AssertionError(f'{arm.name} tier {t} exceeds its budget')

  # 2. The backbone: pretrained here (ViT), or as shipped (MiniLM).
  if args.backbone.pretrained_elsewhere:
    backbone, pre = args.backbone.model_dir, None
    log(f'backbone: {backbone}')
  else:
    backbone = os.path.join(args.workdir, f'backbone_{args.pretrain_steps}')
    pre = pretrain_lib.pretrain(pretrain_config(args), backbone)
    log(f"backbone: {pre['steps']} steps on classes 0-4, test accuracy "
        f"{pre['test_accuracy']:.3f}")

  # 3. Fine-tuning: each distinct arm once (lr grid, then seeds).
  done: dict[str, dict] = {}
  for b in ['unconstrained'] + order + ['mixed']:
    for arm in plans[b].values():
      if arm is not None and arm.name not in done:
        may_train = not args.from_cache and (
            not args.only or arm.name in args.only)
        try:
          done[arm.name] = run_arm(args, arm, backbone, log, may_train)
        except NotRun:
          log(f'  {arm.name}: not run (--only / --from_cache, not cached)')

  results: dict[str, dict] = {}
  for b, arms in plans.items():
    results[b] = {}
    for family, arm in arms.items():
      if arm is None:
        results[b][family] = {'fits': False}
        continue
      if arm.name not in done:
        results[b][family] = {'not_run': True, 'planned': arm.name}
        continue
      r = dict(done[arm.name])
      c = costs(arm)
      tiers = arm.tiers or (1.0,)
      r.update(arm=arm.name, family=arm.family,
               peak_bytes=costs.mean_peak(arm),
               peak_bytes_per_tier=[costs(arm, t).peak_bytes
                                    for t in range(len(tiers))]
               if arm.tiers else None,
               flops_per_round=float(sum(
                   f * costs(arm, t).flops_per_round
                   for t, f in enumerate(tiers))),
               upload_bytes=float(sum(f * costs(arm, t).upload_bits / 8
                                      for t, f in enumerate(tiers))),
               download_bytes=float(c.download_bits / 8))
      results[b][family] = r
  verdict, summary = judge(results, order + ['mixed'])
  un = {k: r for k, r in results['unconstrained'].items()
        if not r.get('not_run')}
  baselines = ', '.join(f"{k} {r['accuracy_mean']:.3f}" for k, r in un.items())
  if {'head', 'full', 'scratch'} <= set(un):
    acc = {k: r['accuracy_mean'] for k, r in un.items()}
    baselines += (f"; pretraining is worth {acc['full'] - acc['scratch']:+.3f} "
                  f"(full vs scratch), training the backbone "
                  f"{acc['full'] - acc['head']:+.3f} (full vs head only)")
  log(f'baselines: {baselines}')
  out = {
      'backbone': args.backbone.name,
      'rounds': args.rounds, 'seeds': args.seeds, 'lrs': args.lrs,
      'extend': args.extend,
      'clients_per_round': args.clients_per_round,
      'arch': args.backbone.arch, 'pretrain_steps': args.pretrain_steps,
      'backbone_test_accuracy': pre and float(pre['test_accuracy']),
      'budgets': {b: dict(memory_bytes=budgets[b].memory_bytes)
                  for b in order},
      'mixed_tier_budgets': order,
      'costs': {
          **{f'last_{n}': c.as_dict() for n, c in last.items()},
          **{f'lora_r{r}': c.as_dict() for r, c in lora.items()},
          **{f'adapter_d{d}': c.as_dict() for d, c in adapter.items()}},
      'results': results, 'verdict': verdict, 'summary': summary,
      'baselines': baselines,
      'machine': machine, 'git_head': _git('rev-parse', '--short', 'HEAD'),
      'accounting_commit': _git('log', '-1', '--format=%h %s', '--',
                                'fedjax_eff/accounting')[:80] + (
                                    ', with uncommitted changes' if _git(
                                        'status', '--porcelain', '--',
                                        'fedjax_eff/accounting') else ''),
      'seconds': time.time() - t0, 'command': command,
      'train_seconds': float(sum(RUN_SECONDS.values())),
      'plot': os.path.relpath(os.path.splitext(args.out)[0] + '.png', ROOT)}
  out['headline'] = headline(out)
  print()
  for b, v in verdict.items():
    print(f'{b:8s} {v}')
  print(summary)
  write_outputs(out, args.out)
  print(json.dumps(out['headline']))

if __name__ == '__main__':
  main()
