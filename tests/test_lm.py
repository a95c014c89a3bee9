"""Language modelling: the next-token task's two denominators, the round on
text against its reference, the pretraining reserve, and a federated model
reaching the Markov corpus's entropy floor."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax
import pytest

from fedjax_eff import core
from fedjax_eff.data import FederatedData, markov_corpus, pack, registry
from fedjax_eff.experiment import pretrain as pretrain_lib
from fedjax_eff.experiment import train as train_lib
from fedjax_eff.experiment import train_and_evaluate
from fedjax_eff.experiment.defaults import base_config, load_config_module
from fedjax_eff.experiment.validation import find_unknown_overrides
from fedjax_eff.models import get_model
from fedjax_eff.techniques import partial, quantization
from tests.helpers import round_vs_reference

pytestmark = pytest.mark.usefixtures('fast_compiles')

PAD, BOS, EOS, OOV = 0, 1, 2, 3


def padded_text(num_clients=5, seq_len=8, vocab=12, seed=0):
  """Sentences of random length (eos, then pad), some oov tokens."""
  rng = np.random.default_rng(seed)
  clients = {}
  for k in range(num_clients):
    n = int(rng.integers(3, 12))
    seq = np.zeros((n, seq_len + 1), np.int32)
    for i in range(n):
      length = int(rng.integers(1, seq_len))
      words = rng.integers(OOV, vocab, length)  # includes oov (3)
      seq[i, :length + 2] = np.concatenate([[BOS], words, [EOS]])[
          :seq_len + 1]
    clients[f'c{k}'] = {'x': seq[:, :-1], 'y': seq[:, 1:]}
  return FederatedData(clients)


def test_loss_masks_pad_and_accuracy_skips_pad_eos_oov():
  task = core.next_token(PAD, EOS, OOV)
  y = np.array([[5, 6, OOV, EOS, PAD, PAD], [7, EOS, PAD, PAD, PAD, PAD]],
               np.int32)
  batch = {'x': np.zeros_like(y), 'y': y}
  logits = jax.random.normal(jax.random.key(0), y.shape + (10,))
  mask = jnp.ones(2)
  sums = core.batch_sums(task, logits, batch, mask)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  real = y != PAD
  np.testing.assert_allclose(sums.loss, np.sum(np.where(real, ce, 0.0)),
                             rtol=1e-6)
  assert float(sums.loss_units) == real.sum() == 6
  assert float(sums.scored_units) == 3  # 5, 6, 7: not oov, eos or pad
  # Whatever the model says at pad positions changes nothing.
  noisy = jnp.where(real[..., None], logits, 100.0 * logits)
  assert float(core.batch_sums(task, noisy, batch, mask).loss) == pytest.approx(
      float(sums.loss), rel=1e-6)
  # A perfect predictor scores 3 of 3; hitting eos and oov earns nothing.
  perfect = jax.nn.one_hot(y, 10) * 50.0
  assert float(core.batch_sums(task, perfect, batch, mask).correct) == 3
  # The example mask drops whole examples from both denominators.
  half = core.batch_sums(task, logits, batch, jnp.array([0.0, 1.0]))
  assert (float(half.loss_units), float(half.scored_units)) == (2, 1)


@pytest.mark.parametrize('technique', ['identity', 'partial_q4'])
def test_lm_round_matches_reference(technique):
  data = padded_text()
  model = get_model('transformer', 0, causal=True, tied_embeddings=True,
                    vocab_size=12, max_len=8, num_layers=2, d_model=16,
                    num_heads=2, mlp_dim=32)
  params = model.init(jax.random.key(0), np.zeros((1, 8), np.int32))['params']
  tech = core.identity()
  if technique == 'partial_q4':
    tech = core.chain(partial.partial_training(model, layers=[1]),
                      quantization.quantize(bits=4))
  kw = dict(model=model, task=core.next_token(), technique=tech,
            client_optimizer=optax.sgd(0.5),
            server_optimizer=core.make_optimizer('fedadam', 0.01))
  cohort = pack(data, np.arange(data.num_clients), steps=3, batch_size=4,
                seed=0, round_num=0)
  _, state, metrics, _, ref = round_vs_reference(
      kw, params, cohort, jax.random.key(1), chunk_size=2)
  # Token-level means: loss over non-pad targets, accuracy over scored.
  np.testing.assert_allclose(metrics.train_loss, ref['train_loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics.train_accuracy, ref['train_accuracy'],
                             rtol=1e-5, atol=1e-7)
  moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(params))]
  assert max(moved) > 0
  if technique == 'partial_q4':
    # Only block 1 and the head train; 4-bit codes travel.
    assert float(jnp.max(jnp.abs(state.params['block_0']['mlp_in']['kernel']
                                 - params['block_0']['mlp_in']['kernel']))) == 0
    assert float(metrics.upload_bits) < 0.25 * 32 * sum(
        x.size for x in jax.tree.leaves(params))


def test_partial_training_of_a_tied_lm_trains_its_output_layer():
  """Ro et al.'s partial training with the head trainable: in a tied LM the
  output layer is the token embedding E (logits = LN(h) E^T). It trains,
  through its output role only (its gradient is that of CE(h E^T) with the
  features h held fixed; nothing flows below the lowest trained block),
  and it is uploaded; blocks below stay frozen."""
  model = get_model('transformer', 0, causal=True, tied_embeddings=True,
                    vocab_size=12, max_len=8, num_layers=2, d_model=16,
                    num_heads=2, mlp_dim=32)
  x = jax.random.randint(jax.random.key(1), (3, 8), 1, 12)
  y = jnp.roll(x, -1, axis=1)
  params = model.init(jax.random.key(0), x)['params']
  tech = partial.partial_training(model, layers=[1])
  mask = tech.trainable(params, None)
  assert mask['embed']['tok']['embedding'] is True
  assert mask['embed']['pos'] is False and not any(
      jax.tree.leaves(mask['block_0']))
  fwd = tech.forward(None)
  assert dict(fwd) == {'stop_below': 1, 'train_output': True}

  def ce(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  grads = jax.grad(lambda p: ce(model.apply({'params': p}, x, **fwd)))(params)
  h = model.apply({'params': params}, x, features=True)
  g_out = jax.grad(lambda e: ce(h @ e.T))(params['embed']['tok']['embedding'])
  np.testing.assert_allclose(grads['embed']['tok']['embedding'], g_out,
                             rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(g_out).max()) > 0
  assert all(float(jnp.abs(g).max()) == 0
             for g in jax.tree.leaves(grads['block_0']))
  # Without it (the old behaviour) the output layer would be frozen.
  frozen = jax.grad(lambda p: ce(model.apply(
      {'params': p}, x, stop_below=1)))(params)
  assert float(jnp.abs(frozen['embed']['tok']['embedding']).max()) == 0
  # What the device sends: block 1, the head's norm and E.
  found = core.technique.trace_plan(core.chain(tech), params,
                                    {'client_index': np.int32(0)})
  sent = sum(v.size for k, v in params.items() if k in ('block_1', 'head')
             for v in jax.tree.leaves(v))
  sent += params['embed']['tok']['embedding'].size
  assert found['upload_bits'] == 32 * sent


def test_pretraining_reserve_is_disjoint_and_stable():
  cfg = registry.default_config()
  cfg.source, cfg.num_clients, cfg.heldout_clients = 'markov', 40, 4
  cfg.markov_states, cfg.max_sequences = 4, 20
  everyone = set(registry.load(cfg).train.client_ids)
  cfg.pretrain_fraction = 0.25
  fed = set(registry.load(cfg).train.client_ids)
  cfg.part = 'pretrain'
  pre = set(registry.load(cfg).train.client_ids)
  assert fed and pre and not fed & pre and fed | pre == everyone
  assert 4 <= len(pre) <= 18  # ~10 of 40
  assert pre == set(registry.load(cfg).train.client_ids)
  cfg.part = 'bogus'
  with pytest.raises(ValueError, match='data.part'):
    registry.load(cfg)
  cfg.part, cfg.pretrain_fraction = 'pretrain', 0.0
  with pytest.raises(ValueError, match='pretrain_fraction'):
    registry.load(cfg)


def test_markov_reaches_its_entropy_floor(tmp_path, optimized_compiles):
  """A one-block Transformer, trained federated, ends within 10% of the
  corpus's perplexity floor on the training clients' test split (and not
  below it: a floor is a floor). Optimized compiles: its 25 rounds run
  longer than they compile (35 s instead of 60)."""
  del optimized_compiles
  c = base_config()
  d = c.data
  d.source, d.num_clients, d.heldout_clients = 'markov', 20, 4
  d.markov_states, d.markov_heterogeneity, d.seq_len = 8, 0.02, 16
  d.test_fraction = 0.2
  c.model.name = 'transformer'
  c.model.kwargs = dict(causal=True, num_layers=1, d_model=32, num_heads=2,
                        mlp_dim=64, max_len=16)
  c.task.name = 'lm'
  c.num_rounds, c.clients_per_round = 25, 10
  c.client.optimizer, c.client.learning_rate = 'adam', 0.03
  c.client.local_steps, c.client.batch_size = 5, 16
  c.eval_every = c.checkpoint_every = c.num_rounds
  c.accounting = c.progress = c.tensorboard = False
  m = train_and_evaluate(c, str(tmp_path))['final_metrics']
  corpus = markov_corpus.markov_corpus(24, seed=0, num_states=8, seq_len=16,
                                       heterogeneity=0.02)
  # The floor of the 20 training clients (clients weighted by targets).
  n = corpus.data.client_sizes[:20].astype(np.float64)
  floor = np.exp(np.sum(n * (15 * corpus.client_entropy_rate[:20]
                             + corpus.client_first_entropy[:20]))
                 / np.sum(n * 16))
  assert m['test_perplexity'] == pytest.approx(np.exp(m['test_loss']))
  assert 0.97 * floor < m['test_perplexity'] < 1.10 * floor, (
      m['test_perplexity'], floor)


# ---------------------------------------------------------------- configs --

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM_CONFIGS = load_config_module(os.path.join(ROOT, 'configs', 'lm', 'x.py'),
                                'stdlib')


def test_lm_config_grid_cells():
  c = LM_CONFIGS.get_config('lstm,fedyogi,partial,q8')
  assert (c.model.name, c.server.optimizer) == ('lstm_lm', 'fedyogi')
  assert c.server.learning_rate == 1e-2 and c.server.optimizer_kwargs.eps == 1e-5
  assert [t.name for t in c.techniques] == ['partial_training', 'quantize']
  assert c.techniques[0].top_fraction == 0.5
  exp_model = get_model('lstm_lm', 0, preset='stackoverflow')
  tech = partial.partial_training(exp_model, top_fraction=0.5)
  p = jax.eval_shape(lambda: exp_model.init(jax.random.key(0),
                                            np.zeros((1, 4), np.int32)))
  mask = tech.trainable(p['params'], None)
  # The top half of (lstm_0, proj) and the head train; below, nothing.
  assert {k: all(jax.tree.leaves(v)) for k, v in mask.items()} == {
      'embed': False, 'lstm_0': False, 'proj': True, 'head': True}
  assert c.techniques[1].bits == 8 and c.data.pretrain_fraction == 0.0
  c = LM_CONFIGS.get_config('conformer,pretrain')
  assert c.model.name == 'conformer_lm' and c.server.optimizer == 'fedadam'
  assert c.techniques == [] and c.data.pretrain_fraction == 0.2
  for bad in ('lstm,transformer', 'q4,q8', 'gru'):
    with pytest.raises(ValueError, match='config spec'):
      LM_CONFIGS.get_config(bad)
  so = load_config_module(os.path.join(ROOT, 'configs', 'lm', 'x.py'),
                          'stackoverflow').get_config('transformer_21m,fedavg')
  assert (so.data.source, so.data.vocab_size) == ('stackoverflow', 10_000)
  assert so.model.kwargs.vocab_size == 10_004


def test_cli_override_check_reads_config_arguments():
  path = os.path.join(ROOT, 'configs', 'lm', 'stdlib.py')
  assert find_unknown_overrides(
      ['train', f'--config={path}:lstm,q4', '--config.techniques']) == []
  assert find_unknown_overrides(
      ['train', f'--config={path}:lstm,q4', '--config.model.kwargs.preset=x',
       '--config.bogus=1']) == ['bogus']


def test_pretrain_then_federated_finetune_on_stdlib(tmp_path):
  """The grid's pretrain cell end to end on a small stdlib slice: central
  pretraining reads only the reserved modules; the federated run starts
  from its params, trains half the blocks, and uploads 4-bit codes."""
  def small(c):
    c.model.kwargs = dict(causal=True, tied_embeddings=True, max_len=12,
                          vocab_size=300, num_layers=2, d_model=16,
                          num_heads=2, mlp_dim=32)
    c.data.vocab_size, c.data.max_modules, c.data.seq_len = 300, 40, 12
    c.data.max_sequences, c.data.cache_dir = 50, str(tmp_path / 'cache')
    c.num_rounds, c.clients_per_round = 2, 4
    c.client.local_steps, c.client.batch_size = 2, 8
    c.eval_every = c.checkpoint_every = 2
    c.accounting = c.progress = c.tensorboard = False
    c.pretrain.steps, c.pretrain.batch_size = 6, 16
    c.pretrain.log_every = c.pretrain.checkpoint_every = 3
    return c
  c = small(LM_CONFIGS.get_config('transformer,fedadam,partial,q4,pretrain'))
  pre = pretrain_lib.pretrain(c, str(tmp_path / 'pre'))
  assert np.isfinite(pre['test_loss'])
  exp = train_lib.Experiment(c)
  reserved = registry.load(ml_collections.ConfigDict(dict(
      c.data.to_dict(), part='pretrain'))).train.client_ids
  assert reserved and not set(reserved) & set(exp.data.train.client_ids)
  c.init_checkpoint = str(tmp_path / 'pre')
  s = train_and_evaluate(c, str(tmp_path / 'ft'))
  m = s['final_metrics']
  assert m['test_perplexity'] == pytest.approx(np.exp(m['test_loss']))
  assert 'heldout_perplexity' in m and m['test_accuracy'] > 0
  # 4-bit codes (+ a scale and offset per block of 256) of half the blocks,
  # the head's norm and the tied output layer (the token embedding).
  p = exp.init_params
  n = sum(x.size for x in jax.tree.leaves((p['block_1'], p['head']))) + (
      p['embed']['tok']['embedding'].size)
  assert 4 * n < m['upload_bits'] < 4.6 * n < 32 * s['num_params'] / 6


def test_cli_bad_config_spec_is_one_line(tmp_path):
  r = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'train.py'),
       f"--config={os.path.join(ROOT, 'configs', 'lm', 'stdlib.py')}:lstm,gru",
       f'--workdir={tmp_path}'], capture_output=True, text=True, timeout=300)
  assert r.returncode == 2
  assert r.stderr.count('\n') == 1 and "unknown: ['gru']" in r.stderr
