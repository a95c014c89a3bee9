"""FedYolo modules on a frozen backbone, proved with numbers.

* Each module kind (LoRA, adapters, prompts) and head-only: the vectorised
  round equals the reference loop; the backbone stays bit-identical on the
  server; the kind's module leaves and the head move, other kinds' modules
  do not; every client uploads and downloads exactly 32 bits per module and
  head value; fresh modules leave the pretrained function unchanged.
* Full fine-tuning (the baseline): the backbone moves, the upload is every
  value.
* Two tasks in one round: clients of task t move only task t's modules and
  head (tier dispatch), matching the reference.
* Forgetting (split digits, task A = digits 0-4, then task B = 5-9): after
  training task B, task A's accuracy is exactly unchanged with per-task
  modules, and drops with shared full fine-tuning.
* Accounting: head-only and LoRA devices hold no gradient / optimizer state
  for the backbone; head-only runs no backward through the blocks.
"""

from __future__ import annotations

import re

import jax
import ml_collections
import numpy as np
import optax
import pytest

from fedjax_eff import accounting, core, techniques
from fedjax_eff.data import cohort as cohort_lib
from fedjax_eff.experiment import train as train_lib
from fedjax_eff.models import get_model
from fedjax_eff.models.transformer import module_pattern
from fedjax_eff.techniques import task_modules as modules_lib
from fedjax_eff.techniques.structure import path_name
from tests import helpers
from tests.test_experiment import tiny_config

pytestmark = pytest.mark.usefixtures('fast_compiles')

VIT = dict(preset='tiny', patch_size=2, lora_rank=2, adapter_dim=4,
           prompt_len=2)


def _vit(**kwargs):
  m = get_model('vit', 5, **dict(VIT, **kwargs))
  params = jax.jit(m.init)(jax.random.key(0),
                           np.zeros((1, 6, 6, 1), np.float32))['params']
  return m, params


def _paths(params):
  return {path_name(p): x for p, x in
          jax.tree_util.tree_flatten_with_path(params)[0]}


def _is_module(path):
  return any(re.search(module_pattern(k, t), path)
             for k in modules_lib.KINDS for t in range(2))


def _is_head(path):
  return path.split('/')[0].startswith('head')


@pytest.mark.parametrize('kinds', [('lora',), ('adapter',), ('prompt',), ()])
def test_modules_train_send_and_server_update(kinds):
  m, params = _vit()
  tech = techniques.modules(m, params, kinds)
  cohort = helpers.tiny_cohort(steps=3, batch=4)
  _, state, metrics, _, ref = helpers.round_vs_reference(
      helpers.round_kw(m, tech), params, cohort, jax.random.key(1))
  before, after = _paths(params), _paths(state.params)
  mine = lambda p: any(re.search(module_pattern(k, 0), p) for k in kinds)
  sent = 0
  for p, x in before.items():
    moved = not np.array_equal(np.asarray(x), np.asarray(after[p]))
    if mine(p) or _is_head(p):
      sent += x.size
      if not p.endswith('/a'):  # LoRA's a moves only once b is nonzero
        assert moved, p
    else:
      assert not moved, p  # backbone and other modules: bit-identical
  up = np.asarray(metrics.client_upload_bits)
  np.testing.assert_array_equal(up, 32 * sent)
  np.testing.assert_array_equal(np.asarray(metrics.client_download_bits),
                                32 * sent)
  assert sent < 0.2 * sum(x.size for x in before.values())
  np.testing.assert_array_equal(ref['client_upload_bits'], up)


def test_fresh_modules_leave_the_backbone_function_unchanged():
  plain, p0 = _vit(lora_rank=0, adapter_dim=0, prompt_len=0)
  m, p = _vit(prompt_len=0)
  x = np.random.default_rng(0).normal(size=(3, 6, 6, 1)).astype(np.float32)
  # The same backbone values in both trees (init names them alike).
  for path, v in _paths(p0).items():
    np.testing.assert_array_equal(np.asarray(_paths(p)[path]), np.asarray(v))
  np.testing.assert_allclose(m.apply({'params': p}, x),
                             plain.apply({'params': p0}, x), atol=1e-6)


def test_full_finetuning_moves_and_sends_everything():
  m, params = _vit(lora_rank=0, adapter_dim=0, prompt_len=0)
  tech = techniques.modules(m, params, (), full=True)
  cohort = helpers.tiny_cohort(steps=2, batch=4)
  _, state, metrics, _, _ = helpers.round_vs_reference(
      helpers.round_kw(m, tech), params, cohort, jax.random.key(1))
  before, after = _paths(params), _paths(state.params)
  assert all(not np.array_equal(np.asarray(v), np.asarray(after[p]))
             for p, v in before.items() if p.endswith('kernel'))
  total = sum(x.size for x in before.values())
  np.testing.assert_array_equal(np.asarray(metrics.client_upload_bits),
                                32 * total)


def test_two_tasks_in_one_round_move_only_their_modules():
  m, params = _vit(num_tasks=2, task_classes=(5, 3))
  tech = techniques.modules(m, params, ('lora', 'prompt'))
  data = helpers.ragged_clients(classes=3)
  cohort = helpers.tiny_cohort(data, steps=2, batch=4)
  tasks = np.array([0, 1, 1, 0, 1, 0, 0], np.int32)
  for only in (0, 1):
    # Clients of the other task get weight 0: what task `only` moves.
    c = cohort._replace(ctx=dict(cohort.ctx, tier=tasks),
                        weight=cohort.weight * (tasks == only))
    _, state, metrics, _, _ = helpers.round_vs_reference(
        helpers.round_kw(m, tech), params, c, jax.random.key(1),
        num_tiers=2)
    before, after = _paths(params), _paths(state.params)
    for p, v in before.items():
      moved = not np.array_equal(np.asarray(v), np.asarray(after[p]))
      ours = (re.search(module_pattern('lora', only), p)
              or re.search(module_pattern('prompt', only), p)
              or p.startswith(f'head_t{only}/'))
      if ours and not p.endswith('/a'):
        assert moved, p
      if not ours:
        assert not moved, p
    # Every client sends its own task's modules and head (head sizes
    # differ: 5 and 3 classes).
    head_vals = [sum(x.size for x in jax.tree.leaves(params[f'head_t{t}']))
                 for t in (0, 1)]
    mods = sum(x.size for p, x in before.items()
               if re.search(module_pattern('lora', 0), p)
               or re.search(module_pattern('prompt', 0), p))
    np.testing.assert_array_equal(
        np.asarray(metrics.client_upload_bits),
        32 * (mods + np.asarray(head_vals)[tasks]))


def test_module_errors_name_the_knob():
  m, params = _vit(lora_rank=0)
  with pytest.raises(ValueError, match='lora_rank'):
    techniques.modules(m, params, ('lora',))
  with pytest.raises(ValueError, match='not in'):
    techniques.modules(m, params, ('bitfit',))
  with pytest.raises(ValueError, match='modules'):
    techniques.build([ml_collections.ConfigDict(dict(
        name='modules', kinds=['lora']))],
                     techniques.TechniqueContext(m, params))
  with pytest.raises(ValueError, match='lora_targets'):
    get_model('vit', 5, lora_rank=2, lora_targets='attn/nothing')


def test_device_cost_of_modules():
  m, params = _vit(preset='tiny', d_model=64, num_heads=4, mlp_dim=128,
                   num_layers=3)
  batch = {'x': np.zeros((16, 6, 6, 1), np.float32),
           'y': np.zeros((16,), np.int32)}
  cost = {name: accounting.client_cost(
      m, core.classification(), tech, optax.adam(1e-3), params, batch,
      local_steps=2)
          for name, tech in (
              ('full', techniques.modules(m, params, (), full=True)),
              ('lora', techniques.modules(m, params, ('lora',))),
              ('head', techniques.modules(m, params, ())))}
  for name in ('lora', 'head'):
    c, f = cost[name], cost['full']
    assert c.upload_bits * 20 < f.upload_bits
    assert c.analytic.gradient_bytes * 20 < f.analytic.gradient_bytes
    assert (c.analytic.optimizer_state_bytes * 20
            < f.analytic.optimizer_state_bytes)
  # Head-only never runs backward through the blocks; LoRA must.
  assert cost['head'].flops_per_round < 0.6 * cost['full'].flops_per_round
  assert cost['lora'].flops_per_round > cost['head'].flops_per_round


# Forgetting on split digits.

def _split_digits_config(technique):
  c = tiny_config()
  c.model.name = 'vit'
  c.model.kwargs = ml_collections.ConfigDict(dict(
      preset='tiny', patch_size=2, lora_rank=4, lora_targets='attn/.*|mlp_.*',
      adapter_dim=0))
  c.data.num_clients, c.data.heldout_clients = 20, 0
  c.data.tasks = [dict(classes=[0, 1, 2, 3, 4]),
                  dict(classes=[5, 6, 7, 8, 9])]
  c.client.optimizer, c.client.learning_rate = 'adam', 0.01
  c.client.local_steps = 4
  c.client.batch_size = 16
  c.techniques = [technique]
  c.accounting = False
  return c


def _train_task(exp, state, task, rounds, offset):
  ids = np.flatnonzero(exp.data.client_task == task)
  for r in range(rounds):
    chosen = np.random.default_rng(r + offset).choice(ids, 5, replace=False)
    cohort = _pack(exp, chosen, r + offset)
    state, _ = exp.round_fns.round_step(state, cohort,
                                        exp.round_key(r + offset),
                                        round_num=r + offset)
  return state


def _pack(exp, ids, round_num):
  c = exp.config.client
  cohort = cohort_lib.pack(exp.data.train, ids, steps=c.local_steps,
                           batch_size=c.batch_size, seed=0,
                           round_num=round_num)
  return cohort._replace(ctx=dict(cohort.ctx, tier=exp.tier_of[ids]))


@pytest.mark.parametrize('technique, forgets', [
    (dict(name='modules', kinds=['lora']), False),
    (dict(name='modules', kinds=[], full=True), True)])
def test_per_task_modules_do_not_forget(technique, forgets):
  exp = train_lib.Experiment(_split_digits_config(
      ml_collections.ConfigDict(technique)))
  before = {p: np.array(v) for p, v in _paths(exp.init_params).items()}
  state = _train_task(exp, exp.init_state(), 0, 15, 0)
  mid = {p: np.array(v) for p, v in _paths(state.params).items()}  # donated
  after_a = exp.eval_metrics(state.params, 15)
  state = _train_task(exp, state, 1, 15, 100)
  after_b = exp.eval_metrics(state.params, 30)
  print(technique, after_a, after_b)
  assert after_a['task0/test_accuracy'] > 0.6      # A was learnt
  assert after_b['task1/test_accuracy'] > 0.4      # then B (chance 0.2)
  drop = after_a['task0/test_accuracy'] - after_b['task0/test_accuracy']
  if forgets:
    assert drop > 0.1
  else:
    assert drop == 0.0
    # Not just the same accuracy: task A's program computes the same
    # function (its modules, its head and the backbone are untouched).
    end = _paths(state.params)
    for p, v in end.items():
      if 'head_t1' in p or re.search(module_pattern('lora', 1), p):
        continue
      np.testing.assert_array_equal(np.asarray(v), np.asarray(mid[p]))
      if not (_is_head(p) or _is_module(p)):
        np.testing.assert_array_equal(np.asarray(v), np.asarray(before[p]))


def test_fedyolo_configs_pretrain_then_multitask_and_local(tmp_path):
  """The configs as a user runs them (shrunk): pretrain the backbone on
  digits 0-4, fine-tune per-task LoRA on split digits from it (the
  backbone's head is skipped; the modules and task heads start fresh), then
  the fully-local baseline on the same tasks."""
  from fedjax_eff.experiment import pretrain as pretrain_lib  # pylint: disable=g-import-not-at-top
  from tests.test_experiment import load_config  # pylint: disable=g-import-not-at-top
  small = dict(d_model=32, num_heads=2, mlp_dim=64, num_layers=2)
  pre = load_config('fedyolo_backbone')
  pre.model.kwargs.update(small)
  pre.pretrain.steps, pre.pretrain.checkpoint_every = 30, 30
  pre.data.num_clients, pre.progress = 20, False
  pretrain_lib.pretrain(pre, str(tmp_path / 'backbone'))

  c = load_config('fedyolo_multitask')
  c.model.kwargs.update(small)
  c.num_rounds, c.eval_every, c.checkpoint_every = 2, 2, 2
  c.data.num_clients, c.data.heldout_clients = 10, 2
  c.progress, c.tensorboard = False, False
  c.init_checkpoint = str(tmp_path / 'backbone')
  exp = train_lib.Experiment(c)
  loaded = _paths(exp.init_params)
  with pytest.raises(ValueError, match='leaf head has no place'):
    pretrain_lib.load_params(str(tmp_path / 'backbone'), exp.init_params)
  # Every backbone leaf is the pretrained one (restored into the backbone
  # config's own model, an exact tree), not the multi-task model's fresh
  # init; modules and task heads are the fresh init.
  saved = _paths(pretrain_lib.load_params(
      str(tmp_path / 'backbone'), train_lib.Experiment(pre).init_params))
  fresh = _paths(train_lib.Experiment(ml_collections.ConfigDict(
      dict(c.to_dict(), init_checkpoint=''))).init_params)
  for p, x in loaded.items():
    if p.startswith('head') or _is_module(p):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(fresh[p]))
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(saved[p]))
      if p.endswith('kernel'):
        assert not np.array_equal(np.asarray(x), np.asarray(fresh[p])), p
  summary = train_lib.train_and_evaluate(c, str(tmp_path / 'fedyolo'))
  m = summary['final_metrics']
  lora_and_head = sum(
      x.size for p, x in loaded.items()
      if re.search(module_pattern('lora', 0), p) or p.startswith('head_t0'))
  assert m['tier0/upload_bits'] == 32 * lora_and_head
  assert m['download_bits'] == m['upload_bits']
  assert summary['initial_download_bits'] == 32 * sum(
      x.size for x in loaded.values())
  for t in (0, 1):
    assert 0.0 <= m[f'task{t}/test_accuracy'] <= 1.0
    assert f'task{t}/heldout_accuracy' in m

  c.mode = 'local'
  local = train_lib.train_and_evaluate(c, str(tmp_path / 'local'))
  assert local['final_metrics']['upload_bits'] == 0.0
  assert 0.0 <= local['final_metrics']['test_accuracy'] <= 1.0
