"""Seeds as a replica axis: R replicas in one program equal R single runs."""

import jax
import numpy as np
import pytest

from fedjax_eff.experiment.replicas import train_replicas
from fedjax_eff.experiment.train import Experiment
from test_experiment import tiny_config

# Unoptimized compiles (each replica program and each run alike): compile
# time dominates these few-round runs, and what they compare is compiled
# the same way.
pytestmark = pytest.mark.usefixtures('fast_compiles')


def single_run(config, rounds):
  exp = Experiment(config)
  state = exp.init_state()
  losses = []
  for r in range(rounds):
    state, m = exp.round_fns.round_step(
        state, exp.cohort(r).cohort, exp.round_key(r), round_num=r,
        examples=exp.examples)
    losses.append(float(m.train_loss))
  return jax.device_get(state.params), losses


@pytest.mark.parametrize('placement', ['device', 'host'])
def test_two_replicas_equal_two_single_runs(placement):
  config = tiny_config(num_rounds=2, data_placement=placement,
                       **{'client.local_steps': 1, 'clients_per_round': 4})
  states, history = train_replicas(config, seeds=(0, 1))
  assert len(states) == 2
  for seed, state, h in zip((0, 1), states, history):
    config.seed = seed
    params, losses = single_run(config, 2)
    assert int(state.round) == 2
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-6, atol=1e-6), state.params, params)
    np.testing.assert_allclose([m['train_loss'] for m in h], losses,
                               rtol=1e-6)
  # The seeds differ: so do the replicas.
  a, b = (jax.tree.leaves(s.params)[0] for s in states)
  assert not np.allclose(a, b)


def test_vmapped_and_mapped_replicas_agree():
  """Replicas as a vmap (the accelerator default) and as a lax.map (the
  CPU default) compute the same rounds."""
  from fedjax_eff import core
  exp = Experiment(tiny_config(num_rounds=1, data_placement='device',
                               **{'client.local_steps': 1,
                                  'clients_per_round': 4}))
  out = []
  for vmap in (True, False):
    fns = core.build_round(exp.model, exp.task, exp.technique,
                           exp.client_optimizer, exp.server_optimizer,
                           chunk_size=1, donate=False, vmap_replicas=vmap)
    states = core.round.stack_replicas([fns.init(exp.init_params)] * 2)
    cohorts = core.round.stack_replicas([exp.cohort(0).cohort,
                                         exp.cohort(1).cohort])
    keys = core.round.stack_replicas([exp.round_key(0), exp.round_key(1)])
    new, _ = fns.replica_step(states, cohorts, keys, round_num=0,
                              examples=exp.examples)
    out.append(jax.device_get(new.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7), *out)


def _cells(**over):
  """Three runs that differ in seed, client and server learning rate and
  FedProx mu: replicas of one program."""
  import copy  # pylint: disable=g-import-not-at-top
  kw = {'num_rounds': 4, 'client.local_steps': 1, 'clients_per_round': 4,
        'checkpoint_every': 2, 'tensorboard': False, 'accounting': False}
  base = tiny_config(**dict(kw, **over))
  out = []
  for seed, lr, slr, mu in ((0, 0.1, 1.0, 0.0), (0, 0.03, 0.5, 0.1),
                            (1, 0.2, 1.5, 0.0)):
    c = copy.deepcopy(base)
    c.seed, c.client.learning_rate = seed, lr
    c.server.learning_rate, c.client.prox_mu = slr, mu
    out.append(c)
  return out


def test_hyperparameter_replicas_equal_their_runs_and_resume(tmp_path):
  """Each replica (its own seed, learning rates, mu in its state) ends
  where its own run ends; stopped after 2 rounds and resumed, the same;
  each writes a run's workdir."""
  from fedjax_eff.experiment import replicas  # pylint: disable=g-import-not-at-top
  from fedjax_eff.experiment import train as train_lib  # pylint: disable=g-import-not-at-top
  from fedjax_eff.experiment.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  cfgs = _cells()
  assert replicas.can_replicate(cfgs)
  dirs = [str(tmp_path / f'r{i}') for i in range(3)]
  together = replicas.run_replicas(cfgs, dirs)
  for c, d, s in zip(cfgs, dirs, together):
    alone = train_lib.train_and_evaluate(c, str(tmp_path / f'alone{c.seed}'
                                                f'_{c.client.learning_rate}'))
    assert s['final_metrics']['test_accuracy'] == pytest.approx(
        alone['final_metrics']['test_accuracy'], abs=1e-6)
    mine = [r['train_loss'] for r in read_metrics(d)]
    theirs = [r['train_loss'] for r in read_metrics(
        str(tmp_path / f'alone{c.seed}_{c.client.learning_rate}'))]
    np.testing.assert_allclose(mine, theirs, rtol=1e-5)
    assert s['replicas'] == 3 and s['replica_state_bytes'] > 0
    # The program holds at least the three states it updates.
    assert s['replica_program_peak_bytes'] >= 3 * s['replica_state_bytes']
    assert s['peak_bytes_per_replica'] == pytest.approx(
        s['replica_program_peak_bytes'] / 3)
  half = _cells(num_rounds=2)
  rdirs = [str(tmp_path / f'h{i}') for i in range(3)]
  replicas.run_replicas(half, rdirs)
  resumed = replicas.run_replicas(cfgs, rdirs)
  assert [s['resumed_from_round'] for s in resumed] == [2, 2, 2]
  assert ([s['params_sha256'] for s in resumed]
          == [s['params_sha256'] for s in together])
  # Another model size is another program: not replicas.
  other = _cells()
  other[1].model.name = 'logreg'
  assert not replicas.can_replicate(other)


def test_replicas_on_their_own_mesh_axis(tmp_path):
  """config.mesh_replicas: four replicas sharded over four (fake) devices,
  one each, and over a 2 x 4 ('replicas', 'clients') mesh, give what one
  device gives."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  script = os.path.join(os.path.dirname(__file__), 'scripts',
                        'replicas_on_a_mesh.py')
  r = subprocess.run([sys.executable, script, str(tmp_path)],
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out['spec'] in ("P('replicas',)", "PartitionSpec('replicas',)")
  assert out['devices'] == 4
  np.testing.assert_allclose(out['loss2x4'], out['loss0'], rtol=1e-5)
  np.testing.assert_allclose(out['acc2x4'], out['acc0'], atol=1e-6)


def test_server_optimizer_constants_are_replica_values(tmp_path):
  """FedAdam replicas with their own b1 and eps (values of the injected
  server optimizer state) end where their own runs end."""
  from fedjax_eff.experiment import replicas  # pylint: disable=g-import-not-at-top
  from fedjax_eff.experiment import train as train_lib  # pylint: disable=g-import-not-at-top
  cfgs = _cells(num_rounds=2)[:2]
  for c, (b1, eps) in zip(cfgs, ((0.9, 1e-3), (0.5, 1e-2))):
    c.server.optimizer, c.server.learning_rate = 'fedadam', 0.03
    c.server.optimizer_kwargs.b1, c.server.optimizer_kwargs.eps = b1, eps
  assert replicas.can_replicate(cfgs)
  together = replicas.run_replicas(cfgs, [str(tmp_path / f'r{i}')
                                          for i in range(2)])
  for i, (c, s) in enumerate(zip(cfgs, together)):
    alone = train_lib.train_and_evaluate(c, str(tmp_path / f'a{i}'))
    assert s['final_metrics']['test_accuracy'] == pytest.approx(
        alone['final_metrics']['test_accuracy'], abs=1e-6)
  # Momentum decides the optimizer state's structure: not a replica value.
  other = _cells()[:2]
  other[1].server.optimizer_kwargs.momentum = 0.9
  assert not replicas.can_replicate(other)


def _alone_and_together(tmp_path, cfgs, name):
  """Runs `cfgs` as replicas of one program and each alone; returns
  [(replica's metrics lines, its run's metrics lines, summaries)]."""
  from fedjax_eff.experiment import replicas  # pylint: disable=g-import-not-at-top
  from fedjax_eff.experiment import train as train_lib  # pylint: disable=g-import-not-at-top
  from fedjax_eff.experiment.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  assert replicas.can_replicate(cfgs)
  dirs = [str(tmp_path / f'{name}_r{i}') for i in range(len(cfgs))]
  together = replicas.run_replicas(cfgs, dirs)
  out = []
  for i, (c, d, s) in enumerate(zip(cfgs, dirs, together)):
    a = str(tmp_path / f'{name}_a{i}')
    alone = train_lib.train_and_evaluate(c, a)
    out.append((read_metrics(d), read_metrics(a), s, alone))
  return out


def _with_techniques(base, *entries):
  import copy  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = copy.deepcopy(base)
  c.techniques = [ml_collections.ConfigDict(e) for e in entries]
  return c


def test_quantization_bits_and_scaffold_are_replica_values(tmp_path):
  """Quantization bits of one code dtype, and SCAFFOLD under the replica's
  own client learning rate: each replica trains, uploads and ends as its
  own run; bits of another code dtype are another program."""
  from fedjax_eff.experiment import replicas  # pylint: disable=g-import-not-at-top
  with_techniques = _with_techniques
  base = _cells(num_rounds=2)[0]
  # 4- and 8-bit uploads (uint8 codes) beside SCAFFOLD with two client
  # learning rates: SCAFFOLD's correction divides by the replica's own.
  q = [with_techniques(base, dict(name='scaffold'),
                       dict(name='quantize', bits=k)) for k in (4, 8)]
  q[1].client.learning_rate = 0.03
  runs = _alone_and_together(tmp_path, q, 'q')
  for mine, theirs, s, alone in runs:
    np.testing.assert_allclose([r['train_loss'] for r in mine],
                               [r['train_loss'] for r in theirs], rtol=1e-5)
    # The bits counted on the replica's own message: its run's (exact).
    np.testing.assert_allclose([r['upload_bits'] for r in mine],
                               [r['upload_bits'] for r in theirs], rtol=1e-6)
    assert s['final_metrics']['test_accuracy'] == pytest.approx(
        alone['final_metrics']['test_accuracy'], abs=1e-6)
  assert runs[0][0][-1]['upload_bits'] < runs[1][0][-1]['upload_bits']
  # 12 bits travel as uint16: another program.
  assert not replicas.can_replicate([q[0], with_techniques(
      base, dict(name='scaffold'), dict(name='quantize', bits=12))])



def test_depth_dropout_rates_are_replica_values(tmp_path):
  """Depth-dropout rates 0.25 and 0.6 ('client' mode) over a layer-wise
  schedule's two stages: each replica ends as its own run; p = 0 (no
  depth dropout) is another program."""
  import copy  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from fedjax_eff.experiment import replicas  # pylint: disable=g-import-not-at-top
  with_techniques = _with_techniques
  base = _cells(num_rounds=2)[0]
  d = []
  for p in (0.25, 0.6):  # a 2-block ViT, stages: layer 0, layer 1
    c = with_techniques(base, dict(name='layerwise', rounds_per_layer=1,
                                   depth_dropout=p))
    c.model.name = 'vit'
    c.model.kwargs = ml_collections.ConfigDict(dict(
        preset='tiny', num_layers=2, d_model=8, num_heads=2, mlp_dim=16,
        patch_size=4))
    d.append(c)
  for mine, theirs, _, alone in _alone_and_together(tmp_path, d, 'd'):
    np.testing.assert_allclose([r['train_loss'] for r in mine],
                               [r['train_loss'] for r in theirs], rtol=1e-5)
    assert mine[-1]['test_accuracy'] == pytest.approx(
        alone['final_metrics']['test_accuracy'], abs=1e-6)
  # p = 0 builds no depth dropout: another program.
  none = copy.deepcopy(d[0])
  none.techniques[0].depth_dropout = 0.0
  assert not replicas.can_replicate([d[0], none])
