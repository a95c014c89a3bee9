"""Federated dropout: what the device trains (a smaller dense sub-model),
what it sends (that sub-model's update), what the server does (coverage-
weighted scatter), held to numpy and to the per-client reference loop."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_eff import core
from fedjax_eff.core import round as round_lib
from fedjax_eff.core import technique as technique_lib
from fedjax_eff.experiment import train_and_evaluate
from fedjax_eff.experiment.defaults import base_config, load_config_module
from fedjax_eff.models import get_model
from fedjax_eff.techniques import build, TechniqueContext
from fedjax_eff.techniques import federated_dropout as fd
from tests.helpers import max_abs_diff, ragged_clients, round_vs_reference
from tests.helpers import tiny_cohort

pytestmark = pytest.mark.usefixtures('fast_compiles')


def mlp(hidden=(12, 8)):
  m = get_model('mlp', 5, hidden=hidden)
  p = m.init(jax.random.key(0), np.zeros((1, 6, 6, 1), np.float32))['params']
  return m, p


def cnn():
  m = get_model('cnn', 5, features=(4, 8), hidden=16)
  p = m.init(jax.random.key(0), np.zeros((1, 6, 6, 1), np.float32))['params']
  return m, p


def kw(model, technique, lr=0.1, server='fedavg'):
  return dict(model=model, task=core.classification(), technique=technique,
              client_optimizer=optax.sgd(lr),
              server_optimizer=core.make_optimizer(server, 1.0))


def masked_full(params, model, indices, scope='units'):
  """The full model with every dropped unit's weights zeroed."""
  groups = fd.width_groups(model, scope)
  ones = jax.tree.map(jnp.ones_like, fd.gather(params, groups, indices))
  keep = fd.scatter(ones, params, groups, indices)
  return jax.tree.map(jnp.multiply, params, keep)


def assert_same_outputs(out, ref, atol):
  """Equal outputs; a CTC model's `(logits, paddings)` at real frames."""
  if isinstance(out, tuple):
    (out, pad), (ref, ref_pad) = out, ref
    np.testing.assert_array_equal(pad, ref_pad)
    real = np.asarray(pad) < 0.5
    out, ref = np.asarray(out)[real], np.asarray(ref)[real]
  np.testing.assert_allclose(out, ref, atol=atol)


@pytest.mark.parametrize('make', [mlp, cnn])
def test_submodel_forward_equals_masked_full_model(make):
  model, params = make()
  t = fd.federated_dropout(model, params, rate=0.5)
  indices = t.plan(jax.random.key(3), 0, {})
  sub = t.view(params, indices)
  x = np.random.default_rng(0).normal(size=(4, 6, 6, 1)).astype(np.float32)
  out = model.apply({'params': sub}, x, **t.forward(indices))
  ref = model.apply({'params': masked_full(params, model, indices)}, x)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # The sub-model is physically smaller: half the units of every group.
  n_sub = sum(x.size for x in jax.tree.leaves(sub))
  assert n_sub < 0.6 * sum(x.size for x in jax.tree.leaves(params))


def test_gather_then_scatter_with_zero_update_is_identity():
  model, params = cnn()
  groups = fd.width_groups(model)
  t = fd.federated_dropout(model, params, rate=0.5)
  indices = t.plan(jax.random.key(1), 0, {})
  back = fd.scatter(fd.gather(params, groups, indices), params, groups,
                    indices)
  # Kept entries come back in place, dropped ones are zero.
  assert max_abs_diff(back, masked_full(params, model, indices)) == 0.0
  # A round of clients that do not move (lr 0) leaves the server as it was.
  cohort = tiny_cohort()
  fns = core.build_round(**kw(model, t, lr=0.0), chunk_size=3, donate=False)
  state, _ = fns.round_step(fns.init(params), cohort, jax.random.key(0))
  assert max_abs_diff(state.params, params) == 0.0


def test_kept_counts_follow_the_rates():
  model, params = mlp(hidden=(40, 20, 10))
  groups = fd.width_groups(model)
  assert [g.width for g in groups] == [40, 20, 10]
  for rate, schedule, expect in [
      (0.25, 'constant', (30, 15, 8)),          # round(0.75 * w)
      (0.5, 'size', (20, 15, 9)),               # p = 0.5 * w / 40
      (0.5, 'depth', (40, 15, 5)),              # p ramps 0 -> 0.5
      ((0.1, 0.2, 0.9), 'constant', (36, 16, 1))]:
    t = fd.federated_dropout(model, params, rate=rate, schedule=schedule)
    indices = t.plan(jax.random.key(0), 0, {})
    assert tuple(len(np.unique(i)) for i in indices) == expect, schedule
    assert dict(t.forward(indices)['widths']) == {
        g.name: n for g, n in zip(groups, expect)}
    assert all(np.all(np.diff(i) > 0) and i.max() < g.width
               for i, g in zip(indices, groups))
  with pytest.raises(ValueError, match='rates must be in'):
    fd.federated_dropout(model, params, rate=1.0)
  with pytest.raises(ValueError, match='3 width groups'):
    fd.federated_dropout(model, params, rate=(0.1, 0.2))
  with pytest.raises(ValueError, match='no width groups'):
    lr = get_model('logreg', 5)
    fd.federated_dropout(lr, lr.init(jax.random.key(0), np.zeros((1, 4)))[
        'params'])


def test_coverage_weighted_average_matches_numpy():
  """Server FedAvg (lr 1): each parameter moves by the weighted mean of
  the deltas of the clients that kept it; nobody's parameters stay."""
  model, params = mlp(hidden=(6, 4))
  t = fd.federated_dropout(model, params, rate=0.5)
  data = ragged_clients()
  cohort = tiny_cohort(data)
  rng = jax.random.key(7)
  fns = core.build_round(**kw(model, t), chunk_size=2, donate=False)
  state, metrics = fns.round_step(fns.init(params), cohort, rng)
  update = jax.jit(fns.client_update)
  tech = technique_lib.chain(t)
  acc_d = jax.tree.map(lambda p: np.zeros(p.shape), params)
  acc_c = jax.tree.map(lambda p: np.zeros(p.shape), params)
  sub_sizes = []
  for i in range(cohort.mask.shape[0]):
    key = jax.random.fold_in(rng, i)
    out = update(params, {k: v[i] for k, v in cohort.batches.items()},
                 cohort.mask[i], {k: v[i] for k, v in cohort.ctx.items()},
                 key, jnp.zeros((), jnp.int32))
    # The client's own draw: the plan key of its key (one technique).
    indices = tech.plan(round_lib.split_client_key(key)[0], 0, {})
    keep0 = np.zeros(6)
    keep0[np.asarray(indices[0])] = 1
    # Coverage is exactly the kept units' weights; the delta lives there.
    np.testing.assert_array_equal(np.asarray(out.coverage['dense0']['kernel']),
                                  np.broadcast_to(keep0, (36, 6)))
    assert np.all(np.asarray(out.delta['dense0']['kernel'])[:, keep0 == 0]
                  == 0)
    w = float(cohort.weight[i])
    acc_d = jax.tree.map(lambda a, d: a + w * np.asarray(d, np.float64),
                         acc_d, out.delta)
    acc_c = jax.tree.map(lambda a, c: a + w * np.asarray(c, np.float64),
                         acc_c, out.coverage)
    sub_sizes.append(float(out.upload_bits))
  expect = jax.tree.map(
      lambda p, d, c: np.where(c > 0, p - d / np.where(c > 0, c, 1), p),
      params, acc_d, acc_c)
  assert max_abs_diff(state.params, expect) < 1e-5
  # What travels up is the sub-model's update: 3 of 6, 2 of 4 units.
  sub = 32 * (36 * 3 + 3 + 3 * 2 + 2 + 2 * 5 + 5)
  np.testing.assert_array_equal(np.asarray(metrics.client_upload_bits),
                                np.full(len(sub_sizes), sub))
  assert float(metrics.download_bits) == sub


@pytest.mark.parametrize('chunk_size', [1, 3])
def test_round_matches_reference_loop(chunk_size):
  model, params = cnn()
  t = fd.federated_dropout(model, params, rate=(0.5, 0.25, 0.5),
                           schedule='constant')
  round_vs_reference(kw(model, t, server='fedadam'), params, tiny_cohort(),
                     jax.random.key(2), chunk_size=chunk_size)


def test_rate_zero_equals_fedavg_exactly():
  model, params = cnn()
  cohort = tiny_cohort()
  out = []
  for t in (core.identity(), fd.federated_dropout(model, params, rate=0.0)):
    fns = core.build_round(**kw(model, t), chunk_size=3, donate=False)
    out.append(fns.round_step(fns.init(params), cohort,
                              jax.random.key(0))[0].params)
  assert max_abs_diff(*out) == 0.0


def test_tiers_train_their_own_keep_ratio_in_one_round():
  model, params = mlp(hidden=(8, 8))
  t = build([dict(name='federated_dropout', tier_rates=[0.0, 0.5])],
            TechniqueContext(model, params))
  cohort = tiny_cohort()
  k = cohort.mask.shape[0]
  tiers = np.arange(k) % 2
  cohort = cohort._replace(ctx=dict(cohort.ctx, tier=tiers))
  fns, _, metrics, _, _ = round_vs_reference(
      kw(model, t), params, cohort, jax.random.key(4), chunk_size=2,
      num_tiers=2)
  full = 32 * (36 * 8 + 8 + 8 * 8 + 8 + 8 * 5 + 5)
  half = 32 * (36 * 4 + 4 + 4 * 4 + 4 + 4 * 5 + 5)
  np.testing.assert_array_equal(np.asarray(metrics.client_upload_bits),
                                np.where(tiers == 0, full, half))


def test_nested_submodel_extraction():
  model, params = mlp(hidden=(8, 4))
  sub, fwd = fd.submodel(model, params, 0.5)
  assert dict(fwd['widths']) == {'dense0': 4, 'dense1': 2}
  np.testing.assert_array_equal(sub['dense0']['kernel'],
                                params['dense0']['kernel'][:, :4])
  np.testing.assert_array_equal(sub['head']['kernel'],
                                params['head']['kernel'][:2])
  x = np.ones((2, 6, 6, 1), np.float32)
  assert model.apply({'params': sub}, x, **fwd).shape == (2, 5)
  full, fwd1 = fd.submodel(model, params, 1.0)
  np.testing.assert_array_equal(model.apply({'params': full}, x, **fwd1),
                                model.apply({'params': params}, x))


def test_experiment_reports_device_cost_and_nested_submodels(tmp_path):
  """End to end on digits: two device tiers keep 100% and 50% of the CNN;
  the 50% tier downloads, uploads and computes less, and the run reports
  the nested sub-models' accuracy."""
  c = base_config()
  c.model.name = 'cnn'
  c.model.kwargs = dict(features=(8, 16), hidden=32)
  c.data.num_clients, c.data.heldout_clients = 20, 2
  c.num_rounds, c.clients_per_round = 2, 8
  c.client.local_steps, c.client.batch_size = 2, 8
  c.devices.tier_fractions = [0.5, 0.5]
  # Tier 0 (the one central evaluation runs) drops units too: the server
  # model is still evaluated whole.
  c.techniques = [dict(name='federated_dropout', tier_rates=[0.25, 0.5])]
  c.eval_every = c.checkpoint_every = 2
  c.progress = c.tensorboard = False
  m = train_and_evaluate(c, str(tmp_path))['final_metrics']
  for what in ('upload_bits', 'download_bits', 'device_flops_per_round',
               'device_peak_bytes'):
    assert m[f'tier1/{what}'] < 0.9 * m[f'tier0/{what}'], what
  assert m['tier1/upload_bits'] < 0.6 * m['tier0/upload_bits']
  for keep in ('0.25', '0.5', '0.75', '1'):
    assert 0 <= m[f'keep{keep}/test_accuracy'] <= 1
  assert m['keep1/test_accuracy'] == pytest.approx(m['test_accuracy'])


def _stack_models():
  rng = np.random.default_rng(0)
  lm = get_model('transformer', 0, causal=True, tied_embeddings=True,
                 vocab_size=20, max_len=6, num_layers=2, d_model=16,
                 num_heads=4, mlp_dim=24)
  tokens = rng.integers(1, 20, (3, 6)).astype(np.int32)
  ctc = get_model('conformer_ctc', 29, preset='tiny', num_heads=4)
  frames = (rng.normal(size=(3, 40, 40)).astype(np.float32),
            np.array([40, 25, 12], np.int32))
  vit = get_model('vit', 5, preset='tiny', num_heads=2, patch_size=2)
  image = rng.normal(size=(3, 6, 6, 1)).astype(np.float32)
  lstm = get_model('lstm_lm', 0, vocab_size=20, embed_dim=8, lstm_dim=12,
                   num_lstm_layers=2, proj_dim=6)
  return {'transformer_lm': (lm, tokens), 'conformer_ctc': (ctc, frames),
          'vit': (vit, image), 'lstm_lm': (lstm, tokens)}


@pytest.mark.parametrize('name', ['transformer_lm', 'conformer_ctc', 'vit',
                                  'lstm_lm'])
def test_layer_stack_submodels_equal_masked_full_models(name):
  """Heads and MLP units (both conformer feed-forwards) drop; the narrower
  model computes what the full one does with those units zeroed."""
  model, x = _stack_models()[name]
  params = model.init(jax.random.key(0), x)['params']
  groups = fd.width_groups(model)
  kinds = {g.name.split('/')[-1] for g in groups}
  assert kinds == {'conformer_ctc': {'attn', 'ffn_in', 'ffn_out'},
                   'lstm_lm': {'lstm_0', 'lstm_1', 'proj'}}.get(
                       name, {'attn', 'mlp'})
  t = fd.federated_dropout(model, params, rate=0.5)
  indices = t.plan(jax.random.key(5), 0, {})
  sub = t.view(params, indices)
  out = model.apply({'params': sub}, x, **t.forward(indices))
  ref = model.apply({'params': masked_full(params, model, indices)}, x)
  assert_same_outputs(out, ref, 2e-5)
  if name == 'lstm_lm':
    assert sub['lstm_1']['hi']['kernel'].shape == (6, 6)
    assert sub['lstm_1']['ii']['kernel'].shape == (6, 6)
  else:
    assert sub['block_0']['attn']['query']['kernel'].shape[1] == (
        params['block_0']['attn']['query']['kernel'].shape[1] // 2)


@pytest.mark.skipif(shutil.which('espeak-ng') is None,
                    reason='espeak-ng builds the speech set')
def test_conformer_fd_config_end_to_end(tmp_path):
  """configs/conformer_fd.py as a user runs it, shrunk: the espeak-ng set,
  a Conformer CTC trained with per-layer federated dropout, CER/WER per
  evaluation and for the nested sub-models."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  c = load_config_module(os.path.join(root, 'configs', 'x.py'),
                         'conformer_fd').get_config()
  c.model.kwargs.preset = 'tiny'
  c.model.kwargs.num_heads = 4
  c.num_rounds, c.clients_per_round = 2, 3
  c.client.local_steps, c.client.batch_size = 1, 4
  c.eval_every = c.checkpoint_every = 2
  # Device accounting of each sub-model is tested on its own (above).
  c.progress = c.tensorboard = c.accounting = False
  s = train_and_evaluate(c, str(tmp_path))
  m = s['final_metrics']
  for key in ('test_cer', 'test_wer', 'keep0.25/test_cer', 'keep1/test_wer'):
    assert 0 <= m[key] <= 5, key  # rates: may exceed 1 with insertions
  assert m['keep1/test_cer'] == pytest.approx(m['test_cer'])
  # Keep 0.75 -> 0.5 by depth: well under the full model's upload.
  full_bits = 32 * s['num_params']
  assert 0.3 * full_bits < m['upload_bits'] < 0.9 * full_bits


# ------------------------------------------- scope 'all' and equal-size rates

def _n(tree) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('name', ['transformer_lm', 'conformer_ctc', 'vit',
                                  'lstm_lm'])
def test_scope_all_submodels_equal_masked_full_models(name):
  """Scope 'all' narrows the residual width (one group through the whole
  stack), the conformer's conv and front-end channels, the LSTM's
  embedding: the narrower model (LayerNorms with the full width's
  statistics) still computes the full model with those units zeroed, and
  its size is `kept_fraction`'s."""
  model, x = _stack_models()[name]
  params = model.init(jax.random.key(0), x)['params']
  # LayerNorm scales/biases away from 1/0, so the statistics matter.
  params = jax.tree.map(
      lambda a: a + 0.1 * jax.random.normal(jax.random.key(a.size), a.shape),
      params)
  groups = fd.width_groups(model, 'all')
  extra = {g.name for g in groups if g.scope == 'all'}
  assert extra == {
      'conformer_ctc': {'embed/conv_0', 'embed/conv_1', 'block_0/conv',
                        'block_1/conv', 'residual'},
      'lstm_lm': {'embed'}}.get(name, {'residual'})
  assert len(groups) == len(fd.width_groups(model)) + len(extra)
  t = fd.federated_dropout(model, params, rate=0.5, scope='all')
  indices = t.plan(jax.random.key(5), 0, {})
  sub = t.view(params, indices)
  out = model.apply({'params': sub}, x, **t.forward(indices))
  ref = model.apply({'params': masked_full(params, model, indices, 'all')},
                    x)
  assert_same_outputs(out, ref, 1e-5)
  counts = [int(i.shape[0]) for i in indices]
  assert _n(sub) / _n(params) == pytest.approx(
      fd.kept_fraction(groups, params, counts), rel=1e-12)
  # Now every width is halved, so most kernels keep a quarter.
  assert _n(sub) < 0.35 * _n(params)
  if name != 'lstm_lm':
    d = params['block_0']['attn']['query']['kernel'].shape[0]
    assert sub['block_0']['attn']['query']['kernel'].shape[0] == d // 2


def test_kept_fraction_formula():
  """F(keep) by hand: MLP 36 -> 12 -> 8 -> 5 keeping 3 of 12 and 2 of 8;
  and the 'cpu' Conformer CTC at keep 0.25, before (heads and feed-forward
  units only) and with every width (issue 15: 0.46 -> 0.066)."""
  model, params = mlp()
  groups = fd.width_groups(model)
  total = 36 * 12 + 12 + 12 * 8 + 8 + 8 * 5 + 5
  kept = 36 * 3 + 3 + 3 * 2 + 2 + 2 * 5 + 5
  assert fd.kept_fraction(groups, params, (3, 2)) == pytest.approx(
      kept / total)
  sub, _ = fd.submodel(model, params, 0.25)
  assert _n(sub) == kept
  ctc = get_model('conformer_ctc', 29, preset='cpu')
  shapes = jax.eval_shape(lambda: ctc.init(
      jax.random.key(0), (np.zeros((1, 64, 40), np.float32),
                          np.array([64], np.int32))))['params']
  frac = {}
  for scope in fd.SCOPES:
    g = fd.width_groups(ctc, scope)
    frac[scope] = fd.kept_fraction(g, shapes,
                                   fd.kept_counts(g, [0.75] * len(g)))
    sub = jax.eval_shape(lambda p, g=g: fd.submodel(ctc, p, 0.25,
                                                    scope=scope)[0], shapes)
    assert _n(sub) / _n(shapes) == pytest.approx(frac[scope])
  assert frac['units'] == pytest.approx(0.4628, abs=1e-4)
  assert frac['all'] == pytest.approx(0.0664, abs=1e-4)


def test_calibrated_schedules_keep_equal_fractions():
  """`target_fraction`: each schedule's base rate is bisected so its
  sub-model keeps the same fraction of the parameters (within a unit's
  share); the technique's sub-model has exactly `describe`'s size."""
  model = get_model('cnn', 10, features=(8, 16), hidden=32)
  params = model.init(jax.random.key(0),
                      np.zeros((1, 12, 12, 1), np.float32))['params']
  groups = fd.width_groups(model, 'all')
  got = {}
  for schedule in fd.SCHEDULES:
    info = fd.describe(model, params, schedule=schedule, scope='all',
                       target_fraction=0.5)
    got[schedule] = info
    assert info['fraction'] == pytest.approx(0.5, abs=0.02), schedule
    t = fd.federated_dropout(model, params, schedule=schedule, scope='all',
                             target_fraction=0.5)
    indices = t.plan(jax.random.key(0), 0, {})
    assert [int(i.shape[0]) for i in indices] == [
        v['kept'] for v in info['groups'].values()]
    assert _n(t.view(params, indices)) / _n(params) == pytest.approx(
        info['fraction'])
    # F is non-increasing in the base rate: the bisection's premise.
    f = [fd.schedule_fraction(groups, params, r, schedule)
         for r in np.linspace(0, 0.99, 23)]
    assert all(a >= b for a, b in zip(f, f[1:])), schedule
  rates = lambda s: [v['rate'] for v in got[s]['groups'].values()]
  # Constant: one rate; depth: 0 at the first group, rising; size and
  # params: the widest / largest group drops most.
  assert len(set(rates('constant'))) == 1
  assert rates('depth')[0] == 0 and rates('depth') == sorted(rates('depth'))
  assert rates('size')[-1] == max(rates('size'))
  sizes = fd.group_params(groups, params)
  assert np.allclose(np.array(rates('params')) / max(rates('params')),
                     np.array(sizes) / max(sizes))
  with pytest.raises(ValueError, match='out of its reach'):
    fd.calibrate_rate(groups, params, 0.01, 'depth')
  with pytest.raises(ValueError, match='tier_rates'):
    fd.federated_dropout(model, params, tier_rates=(0.1, 0.2),
                         target_fraction=0.5)


def test_scope_all_round_matches_reference_loop():
  """A ViT whose residual width, heads and MLP units drop per client: the
  vectorised round equals the per-client loop; the upload is the
  sub-model's."""
  model = get_model('vit', 5, preset='tiny', num_heads=2, patch_size=2)
  params = model.init(jax.random.key(0),
                      np.zeros((1, 6, 6, 1), np.float32))['params']
  t = fd.federated_dropout(model, params, schedule='depth', scope='all',
                           target_fraction=0.4)
  _, _, metrics, _, _ = round_vs_reference(
      kw(model, t, server='fedadam'), params, tiny_cohort(),
      jax.random.key(2), chunk_size=3)
  frac = fd.describe(model, params, schedule='depth', scope='all',
                     target_fraction=0.4)['fraction']
  np.testing.assert_array_equal(np.asarray(metrics.client_upload_bits),
                                round(32 * frac * _n(params)))


def test_scope_all_nested_submodels():
  model, x = _stack_models()['conformer_ctc']
  params = model.init(jax.random.key(0), x)['params']
  sub, fwd = fd.submodel(model, params, 0.5, scope='all')
  w = dict(fwd['widths'])
  assert w['residual'] == 16 and w['block_0/conv'] == 16
  assert w['embed/conv_0'] == 4  # 'tiny': 8 subsampling channels
  np.testing.assert_array_equal(sub['embed']['out']['kernel'],
                                params['embed']['out']['kernel'][
                                    :, :16].reshape(-1, 8, 16)[:, :4]
                                .reshape(-1, 16))
  logits, _ = model.apply({'params': sub}, x, **fwd)
  assert logits.shape[-1] == 29
  full, fwd1 = fd.submodel(model, params, 1.0, scope='all')
  np.testing.assert_array_equal(model.apply({'params': full}, x, **fwd1)[0],
                                model.apply({'params': params}, x)[0])
  report = fd.submodel_report(model, (0.5,), scope='all')
  seen = {}
  report(params, lambda p, **f: seen.update(dict(f['widths'])) or {'m': 0})
  assert seen == w
