"""Offline next-token corpora: the stdlib's modules as clients, and Markov
chains with a known entropy floor. Small builds (30 modules, vocab 300) in
temporary cache directories keep this fast."""

from __future__ import annotations

import json
import os
import sys

import ml_collections
import numpy as np
import pytest

pytest.importorskip('sentencepiece')

from fedjax_eff.data import markov_corpus, registry  # noqa: E402
from fedjax_eff.data import stdlib_corpus as sc  # noqa: E402

SMALL = dict(seq_len=24, vocab_size=300, max_sequences=200, max_modules=30,
             heldout_fraction=0.2, progress=False)


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  return sc.load_stdlib(cache_dir=str(tmp_path_factory.mktemp('a')), **SMALL)


# ----------------------------------------------------------------- stdlib --

def test_listing_is_many_modules_of_very_different_sizes():
  modules = sc.list_modules()
  assert len(modules) > 300
  assert 'json.decoder' in modules and 'json' in modules
  assert modules['json'].endswith(os.path.join('json', '__init__.py'))
  assert not any(set(n.split('.')) & sc.EXCLUDED_DIRS for n in modules)
  sizes = np.array([os.path.getsize(p) for p in modules.values()])
  nonempty = sizes[sizes > 0]
  # Orders of magnitude: smallest to biggest spans >1000x, and the biggest
  # is >50x the median module.
  assert nonempty.max() > 1000 * nonempty.min()
  assert nonempty.max() > 50 * np.median(nonempty)


def test_tokenizer_round_trips_real_lines(small):
  tok = small.tokenizer
  assert tok.vocab_size == 300
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
  for line in ['        return self._x  # two spaces, then a comment',
               'def f(a, b=1, *args, **kw):', '    x = [i ** 2 for i in y]   ']:
    assert tok.decode(tok.encode(line)) == line
  # Every line of a training module round-trips exactly: its characters
  # were all in the training text (character_coverage=1), so none is unk.
  lines = [l for cid in small.train.client_ids[:5]
           for l in sc.read_lines(sc.list_modules()[cid])]
  assert len(lines) > 100
  for line in lines:
    ids = tok.encode(line)
    assert sc.UNK_ID not in ids and tok.decode(ids) == line, line
  # A character never seen in training is oov, as Stack Overflow's words.
  assert sc.UNK_ID in tok.encode('\u2603')
  # Leading indentation is kept exactly (no whitespace normalisation).
  assert tok.decode(tok.encode('    pass')) == '    pass'
  # Special ids decode to nothing.
  ids = tok.encode('import os')
  assert tok.decode([1, *ids, 2, 0, 0]) == 'import os'


def test_sequences_follow_stack_overflow_conventions(small):
  seq_len = SMALL['seq_len']
  for data in (small.train, small.heldout):
    assert data.client_sizes.max() <= SMALL['max_sequences']
    for cid in data.client_ids[:5]:
      c = data.client(cid)
      x, y = c['x'], c['y']
      assert x.shape == y.shape == (len(x), seq_len)
      assert x.dtype == y.dtype == np.int32
      assert (x[:, 0] == sc.BOS_ID).all()
      np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # shifted by one
      for row in y:
        eos = np.flatnonzero(row == sc.EOS_ID)
        if len(eos):  # a line that fits: eos once, then only pad
          assert len(eos) == 1 and (row[eos[0] + 1:] == sc.PAD_ID).all()
          assert (row[:eos[0]] > sc.EOS_ID).all()
        else:  # a cut line fills every position
          assert (row > sc.EOS_ID).all()
  # The first examples are the module's first lines, in order.
  cid = small.train.client_ids[0]
  first = sc.read_lines(sc.list_modules()[cid])[0]
  row = small.train.client(cid)['y'][0]
  assert small.tokenizer.decode(row) == first[:len(
      small.tokenizer.decode(row))]


def test_split_disjoint_hash_stable_and_meta(small):
  train, held = set(small.train.client_ids), set(small.heldout.client_ids)
  assert train and held and not train & held
  assert all(sc.is_heldout(n, SMALL['heldout_fraction']) for n in held)
  assert not any(sc.is_heldout(n, SMALL['heldout_fraction']) for n in train)
  with open(os.path.join(small.path, 'meta.json')) as f:
    meta = json.load(f)
  assert meta == small.meta
  assert meta['python_version'] == '.'.join(map(str, sys.version_info[:3]))
  assert os.path.basename(small.path).startswith(meta['python_version'] + '-')
  assert meta['stdlib_dir'] == os.path.abspath(sc.stdlib_dir())
  assert meta['knobs']['vocab_size'] == 300 and meta['vocab_size'] == 300
  assert meta['num_train_clients'] == len(train)
  assert meta['num_heldout_clients'] == len(held)
  assert sorted(meta['heldout_modules']) == sorted(held)


def test_builder_deterministic_and_cached(small, tmp_path):
  before = sc.train_count
  again = sc.load_stdlib(cache_dir=str(tmp_path), **SMALL)  # fresh build
  assert sc.train_count == before + 1
  for a, b in ((small.train, again.train), (small.heldout, again.heldout)):
    assert a.client_ids == b.client_ids
    for cid in a.client_ids:
      for f in ('x', 'y'):
        np.testing.assert_array_equal(a.client(cid)[f], b.client(cid)[f])
  assert small.tokenizer.model_proto == again.tokenizer.model_proto
  meta = os.path.join(again.path, 'meta.json')
  mtime = os.stat(meta).st_mtime_ns
  hit = sc.load_stdlib(cache_dir=str(tmp_path), **SMALL)
  assert sc.train_count == before + 1  # no retraining
  assert os.stat(meta).st_mtime_ns == mtime and hit.path == again.path
  np.testing.assert_array_equal(hit.train.client(0)['x'],
                                again.train.client(0)['x'])
  # Another knob is another cache entry.
  other = sc.load_stdlib(cache_dir=str(tmp_path), **{**SMALL, 'seq_len': 20})
  assert other.path != again.path and sc.train_count == before + 2


# ----------------------------------------------------------------- markov --

def test_markov_shapes_and_sizes():
  c = markov_corpus.markov_corpus(40, seed=1, num_states=8, seq_len=12)
  assert c.vocab_size == 12 and c.data.num_clients == 40
  sizes = c.data.client_sizes
  assert sizes.min() >= 10 and sizes.max() > 5 * np.median(sizes)
  d = c.data.client(0)
  assert d['x'].shape == d['y'].shape == (sizes[0], 12)
  assert (d['x'][:, 0] == markov_corpus.BOS_ID).all()
  np.testing.assert_array_equal(d['x'][:, 1:], d['y'][:, :-1])
  y = c.data.concatenated()['y']
  assert y.min() >= 4 and y.max() < 12
  np.testing.assert_allclose(c.transitions.sum(-1), 1.0)
  np.testing.assert_allclose(
      np.einsum('ks,kst->kt', c.stationary, c.transitions), c.stationary,
      atol=1e-12)
  again = markov_corpus.markov_corpus(40, seed=1, num_states=8, seq_len=12)
  np.testing.assert_array_equal(again.data.client(7)['y'], c.data.client(7)['y'])
  # Heterogeneity knob: clients' rates spread more.
  lo = markov_corpus.markov_corpus(40, seed=1, heterogeneity=0.01)
  hi = markov_corpus.markov_corpus(40, seed=1, heterogeneity=1.0)
  assert lo.client_entropy_rate.std() < hi.client_entropy_rate.std()


def test_markov_entropy_rate_matches_samples():
  c = markov_corpus.markov_corpus(60, seed=0, num_states=16, seq_len=20)
  # The true model's mean loss on the data estimates the floor.
  logp, first = [], []
  for k, cid in enumerate(c.data.client_ids):
    d = c.data.client(cid)
    x, y = d['x'] - 4, d['y'] - 4
    logp.append(np.log(c.transitions[k][x[:, 1:], y[:, 1:]]).ravel())
    first.append(np.log(c.stationary[k][y[:, 0]]))
  logp, first = np.concatenate(logp), np.concatenate(first)
  assert abs(-logp.mean() / c.entropy_rate - 1) < 0.03
  total = -(logp.sum() + first.sum()) / (len(logp) + len(first))
  assert abs(total / c.loss_floor - 1) < 0.03
  # Plug-in conditional entropy of one long chain (no model needed).
  k = 0
  rng = np.random.default_rng(5)
  s = markov_corpus.sample_chains(c.transitions[k], c.stationary[k], 1,
                                  200_000, rng)[0]
  counts = np.zeros((16, 16))
  np.add.at(counts, (s[:-1], s[1:]), 1)
  p_hat = counts / counts.sum(1, keepdims=True).clip(1)
  w = counts.sum(1) / counts.sum()
  with np.errstate(divide='ignore', invalid='ignore'):
    h_rows = -np.nansum(np.where(p_hat > 0, p_hat * np.log(p_hat), 0), 1)
  assert abs(w @ h_rows / c.client_entropy_rate[k] - 1) < 0.02


# --------------------------------------------------------------- registry --

def test_registry_loads_stdlib(tmp_path):
  cfg = registry.default_config()
  cfg.source, cfg.cache_dir = 'stdlib', str(tmp_path)
  cfg.seq_len, cfg.vocab_size, cfg.max_modules = 16, 300, 30
  cfg.max_sequences = 100
  b = registry.load(cfg)
  assert b.num_classes == 300 and b.input_shape == (16,)
  assert b.heldout is not None and b.heldout.num_clients >= 1
  assert len(b.test['y']) == b.heldout.client_sizes.sum()
  assert b.train.client(0)['x'].shape[1:] == (16,)
  assert not set(b.train.client_ids) & set(b.heldout.client_ids)


def test_registry_loads_markov():
  cfg = ml_collections.ConfigDict(dict(
      registry.default_config(), source='markov', num_clients=12,
      heldout_clients=3, markov_states=10, seq_len=8))
  b = registry.load(cfg)
  assert b.num_classes == 14 and b.input_shape == (8,)
  assert b.train.num_clients == 12 and b.heldout.num_clients == 3
  assert b.test['x'].shape[1:] == (8,)
  with pytest.raises(ValueError, match='data.classes'):
    registry.load(ml_collections.ConfigDict(dict(cfg, classes=[1])))
