"""PEFT modules on a frozen pretrained backbone (FedYolo, Zhang et al. 2023,
arXiv 2307.04905), one module set and head per task.

Clients load the pretrained backbone once; afterwards only the modules of
their task (LoRA, adapters, prompt tokens; `models/transformer.py` creates
them) and that task's head are trained, uploaded, averaged and downloaded.
The mask is static: backbone leaves are constants of the client program, so
no gradient, no optimizer state and no upload exist for them; the download
hook counts only the module and head leaves (the one-time backbone download
is `summary.json`'s `initial_download_bits`).

Tasks are static programs, one per task, dispatched like device tiers: a
client's tier is its task (the experiment sets it from the data), and
`specialize(stage, task)` gives that task's program (its module pattern, its
head, `task=` for the model). The server averages each leaf over the clients
that trained it, so task A's modules and head move only with task A's
clients, and the backbone never moves: training task B cannot change what
task A computes.

Baselines in the same shape:
* `kinds=()` with `train_head`: head-only (no backward through the blocks);
* `full=True`: full fine-tuning of the shared backbone plus the task's own
  head and modules (what per-task modules are compared against: the shared
  backbone moves with every task).
"""

from __future__ import annotations

import re
from typing import Sequence

import jax

from fedjax_eff.core.technique import Technique, tree_bits
from fedjax_eff.models.structure import (ForwardPlan, check_forward,
                                         supported_forward)
from fedjax_eff.models.transformer import module_pattern
from fedjax_eff.techniques import structure as structure_lib

KINDS = ('lora', 'adapter', 'prompt')


def _task_heads(model) -> tuple[str, ...]:
  return tuple(structure_lib.structure_of(model).head)


def task_program(model, task: int, kinds: Sequence[str], train_head: bool,
                 full: bool) -> tuple[Technique, re.Pattern, str | None]:
  """The static program of one task: (technique, module regex, head)."""
  num_tasks = getattr(model, 'num_tasks', 1)
  heads = _task_heads(model)
  head = heads[task] if num_tasks > 1 else heads[0]
  mine = re.compile('|'.join(module_pattern(k, task) for k in kinds)
                    or r'(?!)')
  others = re.compile('|'.join(module_pattern(k, t) for k in KINDS
                               for t in range(num_tasks) if t != task)
                      or r'(?!)')
  other_heads = set(heads) - {head} if num_tasks > 1 else set()
  s = structure_lib.structure_of(model)

  def trains(top, path):
    if top == head:
      return train_head
    if mine.search(path):
      return True
    if full:
      return top not in other_heads and not others.search(path)
    return False

  fwd = ForwardPlan(task=task) if num_tasks > 1 else ForwardPlan()
  if not kinds and not full:  # head only: no backward through the blocks
    fwd = fwd | supported_forward(model, stop_below=s.num_layers)
  check_forward(model, fwd)

  def trainable(params, plan):
    del plan
    return structure_lib.static_mask(params, trains)

  def download(params, plan):
    # After the first download only what trains travels (the full model
    # for full fine-tuning).
    return tree_bits(params, trainable(params, plan))

  name = ('full' if full else '+'.join(kinds) or 'head') + f'_t{task}'
  return (Technique(name=name, trainable=trainable,
                    forward=lambda plan: fwd, download=download),
          mine, head)


def modules(model, init_params=None, kinds: Sequence[str] = ('lora',),
            train_head: bool = True, full: bool = False) -> Technique:
  """Trains each task's PEFT modules (`kinds`) and head on a frozen backbone.

  Args:
    model: a `Transformer`/`ViT` created with the modules (`lora_rank`,
      `adapter_dim`, `prompt_len`) and, for several tasks, `num_tasks`.
    init_params: the model's parameters, to check that the modules exist.
    kinds: any of 'lora', 'adapter', 'prompt'; () = head only.
    train_head: whether the task's head trains (and travels).
    full: full fine-tuning baseline (backbone too).
  """
  if isinstance(kinds, str):
    kinds = tuple(k for k in kinds.split(',') if k)
  kinds = tuple(kinds)
  bad = [k for k in kinds if k not in KINDS]
  if bad:
    raise ValueError(f'modules kinds {bad} are not in {KINDS}.')
  if not kinds and not train_head and not full:
    raise ValueError('modules trains nothing: give kinds, train_head or '
                     'full.')
  num_tasks = getattr(model, 'num_tasks', 1)
  programs = [task_program(model, t, kinds, train_head, full)
              for t in range(num_tasks)]
  if init_params is not None:
    paths = [structure_lib.path_name(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(init_params)[0]]
    for kind in kinds:
      if not any(re.search(module_pattern(kind, 0), p) for p in paths):
        knob = {'lora': 'lora_rank', 'adapter': 'adapter_dim',
                'prompt': 'prompt_len'}[kind]
        raise ValueError(f'the model has no {kind} modules: set '
                         f'model.kwargs.{knob} > 0.')
  if num_tasks == 1:
    return programs[0][0]._replace(name=programs[0][0].name[:-3])

  def specialize(stage, task):
    del stage
    if not 0 <= task < num_tasks:
      raise ValueError(f'task (tier) {task} is not in [0, {num_tasks}).')
    return programs[task][0]

  return Technique(name=programs[0][0].name[:-3] + f'_{num_tasks}tasks',
                   specialize=specialize)


def task_routing(model) -> Technique:
  """Routes each task's clients to their task's head and modules.

  Chained after any technique when the data has several tasks (the
  experiment does it): a client of task t runs the model with `task=t`, and
  other tasks' heads and modules are frozen statically for it (so they are
  neither uploaded nor diluted by its zero updates in the average). What
  else trains, and what travels down, the other techniques decide.
  """
  num_tasks = getattr(model, 'num_tasks', 1)
  programs = [task_program(model, t, (), True, True)[0]._replace(
      name='task_routing', download=None) for t in range(num_tasks)]

  def specialize(stage, task):
    del stage
    if not 0 <= task < num_tasks:
      raise ValueError(f'task (tier) {task} is not in [0, {num_tasks}).')
    return programs[task]

  return Technique(name='task_routing', specialize=specialize)
