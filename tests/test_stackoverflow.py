"""The Stack Overflow loader on a tiny fixture in TFF's real file format.

Expected values are computed here straight from the fixture's SQLite rows
(decompressed with `lzma`, read with `sqlite3`), not through the loader, so
the loader is checked against the format rather than against itself.
"""

from __future__ import annotations

import collections
import importlib.util
import lzma
import os
import shutil
import sqlite3
import struct
import sys
import tarfile

import numpy as np
import pytest

from fedjax_eff.data import registry
from fedjax_eff.data import stackoverflow as so

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'stackoverflow')
GENERATOR = os.path.join(os.path.dirname(__file__), 'fixtures',
                         'make_stackoverflow_fixture.py')


def _db_rows(lzma_path: str, tmp_path) -> list[tuple[str, str, bytes]]:
  db = os.path.join(tmp_path, 'raw.sqlite')
  with lzma.open(lzma_path) as src, open(db, 'wb') as dst:
    dst.write(src.read())
  con = sqlite3.connect(db)
  rows = con.execute('SELECT split_name, client_id, serialized_example_proto '
                     'FROM examples ORDER BY rowid').fetchall()
  con.close()
  os.remove(db)
  return rows


@pytest.fixture(scope='module')
def raw(tmp_path_factory):
  """{split: {client: [sentence, ...]}} in table order, from the fixture."""
  rows = _db_rows(os.path.join(FIXTURE, 'stackoverflow.sqlite.lzma'),
                  tmp_path_factory.mktemp('raw'))
  out = collections.defaultdict(lambda: collections.defaultdict(list))
  for split, cid, blob in rows:
    out[split][cid].append(so.decode_example(blob)['tokens'][0].decode())
  return {s: dict(c) for s, c in out.items()}


def _file_words(path=os.path.join(FIXTURE, 'stackoverflow.word_count')):
  with open(path) as f:
    return [l.split()[0] for l in f if l.strip()]


def _expected(sentences, vocab, seq_len, cap):
  ids = {w: 4 + i for i, w in enumerate(vocab)}
  seq = np.zeros((len(sentences[:cap]), seq_len + 1), np.int32)
  for i, s in enumerate(sentences[:cap]):
    row = [1] + [ids.get(w, 3) for w in s.split()] + [2]
    row = row[:seq_len + 1]
    seq[i, :len(row)] = row
  return seq[:, :-1], seq[:, 1:]


def _load(tmp_path, path=FIXTURE, **kw):
  return so.load_stackoverflow(path, cache_dir=str(tmp_path / 'cache'), **kw)


def _copy_without_word_counts(tmp_path):
  d = tmp_path / 'nowc'
  d.mkdir()
  shutil.copy(os.path.join(FIXTURE, 'stackoverflow.sqlite.lzma'), d)
  return str(d)


def _assert_same(a: so.StackOverflowCorpus, b: so.StackOverflowCorpus):
  assert a.vocab == b.vocab
  for split in ('train', 'heldout', 'test'):
    fa, fb = getattr(a, split), getattr(b, split)
    assert fa.client_ids == fb.client_ids
    for cid in fa.client_ids:
      for k in ('x', 'y'):
        np.testing.assert_array_equal(fa.client(cid)[k], fb.client(cid)[k])


# ------------------------------------------------------------------ codec --

def test_codec_roundtrip_and_robustness():
  feats = {'tokens': 'how do i sort a list ?', 'title': b'sorting',
           'score': [-3, 0, 7, 2**40], 'w': [0.5, -1.25], 'empty': [],
           'tags': [b'python', 'list']}
  blob = so.encode_example(feats)
  got = so.decode_example(blob)
  assert got == {'tokens': [b'how do i sort a list ?'], 'title': [b'sorting'],
                 'score': [-3, 0, 7, 2**40], 'w': [0.5, -1.25], 'empty': [],
                 'tags': [b'python', b'list']}
  # Unknown fields (a varint and a fixed64 before, a string after) are
  # skipped, and unpacked repeated values are read too.
  extra = b'\x38\x05' + b'\x11' + b'\0' * 8
  unpacked_int = b'\x1a\x04' + b'\x08\x01\x08\x02'  # int64_list [1, 2]
  entry = b'\x0a\x01k' + b'\x12' + bytes([len(unpacked_int)]) + unpacked_int
  features = b'\x0a' + bytes([len(entry)]) + entry
  blob2 = extra + b'\x0a' + bytes([len(features)]) + features + b'\x22\x01z'
  assert so.decode_example(blob2) == {'k': [1, 2]}
  f32 = struct.pack('<f', 1.5)
  fl = b'\x12\x05' + b'\x0d' + f32  # float_list, one unpacked float.
  entry = b'\x0a\x01f' + b'\x12' + bytes([len(fl)]) + fl
  features = b'\x0a' + bytes([len(entry)]) + entry
  assert so.decode_example(b'\x0a' + bytes([len(features)]) + features) == {
      'f': [1.5]}
  with pytest.raises(ValueError, match='Truncated'):
    so.decode_example(blob[:-3])


def _google_example_class():
  """`tf.train.Example` built from its schema with google.protobuf alone."""
  pb = pytest.importorskip('google.protobuf')
  del pb
  from google.protobuf import descriptor_pb2, descriptor_pool
  from google.protobuf import message_factory
  F = descriptor_pb2.FieldDescriptorProto
  fdp = descriptor_pb2.FileDescriptorProto(
      name='fedjax_eff_test_example.proto', package='fedjax_eff_test',
      syntax='proto3')

  def msg(name, *fields):
    m = fdp.message_type.add(name=name)
    for fname, num, ftype, label, type_name in fields:
      f = m.field.add(name=fname, number=num, type=ftype, label=label)
      if type_name:
        f.type_name = type_name
    return m

  rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
  msg('BytesList', ('value', 1, F.TYPE_BYTES, rep, ''))
  msg('FloatList', ('value', 1, F.TYPE_FLOAT, rep, ''))
  msg('Int64List', ('value', 1, F.TYPE_INT64, rep, ''))
  feature = msg(
      'Feature',
      ('bytes_list', 1, F.TYPE_MESSAGE, opt, '.fedjax_eff_test.BytesList'),
      ('float_list', 2, F.TYPE_MESSAGE, opt, '.fedjax_eff_test.FloatList'),
      ('int64_list', 3, F.TYPE_MESSAGE, opt, '.fedjax_eff_test.Int64List'))
  feature.oneof_decl.add(name='kind')
  for f in feature.field:
    f.oneof_index = 0
  features = msg('Features', ('feature', 1, F.TYPE_MESSAGE, rep,
                              '.fedjax_eff_test.Features.FeatureEntry'))
  entry = features.nested_type.add(name='FeatureEntry')
  entry.options.map_entry = True
  entry.field.add(name='key', number=1, type=F.TYPE_STRING, label=opt)
  entry.field.add(name='value', number=2, type=F.TYPE_MESSAGE, label=opt,
                  type_name='.fedjax_eff_test.Feature')
  msg('Example', ('features', 1, F.TYPE_MESSAGE, opt,
                  '.fedjax_eff_test.Features'))
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fdp)
  desc = pool.FindMessageTypeByName('fedjax_eff_test.Example')
  if hasattr(message_factory, 'GetMessageClass'):
    return message_factory.GetMessageClass(desc)
  return message_factory.MessageFactory(pool).GetPrototype(desc)


def test_codec_matches_google_protobuf():
  Example = _google_example_class()
  feats = {'tokens': 'edit :', 'score': [-1, 300], 'w': [0.25, 3.0],
           'tags': ['a|b', 'c']}
  ours = so.encode_example(feats)
  theirs = Example.FromString(ours)
  f = theirs.features.feature
  assert list(f['tokens'].bytes_list.value) == [b'edit :']
  assert list(f['score'].int64_list.value) == [-1, 300]
  assert list(f['w'].float_list.value) == [0.25, 3.0]
  assert list(f['tags'].bytes_list.value) == [b'a|b', b'c']
  # Same bytes as protobuf's deterministic serialization (sorted map keys,
  # packed scalars), and we read what protobuf writes.
  assert theirs.SerializeToString(deterministic=True) == ours
  ex = Example()
  ex.features.feature['tokens'].bytes_list.value.append(b'thanks .')
  ex.features.feature['score'].int64_list.value.extend([5, -2**63])
  assert so.decode_example(ex.SerializeToString()) == {
      'tokens': [b'thanks .'], 'score': [5, -2**63]}


# ----------------------------------------------------------------- fixture --

def test_fixture_is_small_and_regenerates_identically(tmp_path, raw):
  sizes = [os.path.getsize(os.path.join(FIXTURE, f))
           for f in os.listdir(FIXTURE)]
  assert sum(sizes) < 50_000
  assert {s: len(c) for s, c in raw.items()} == {'train': 6, 'heldout': 3,
                                                 'test': 3}
  spec = importlib.util.spec_from_file_location('make_so_fixture', GENERATOR)
  gen = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gen)
  gen.write(str(tmp_path / 'again'))
  assert (_db_rows(str(tmp_path / 'again' / 'stackoverflow.sqlite.lzma'),
                   tmp_path) ==
          _db_rows(os.path.join(FIXTURE, 'stackoverflow.sqlite.lzma'),
                   tmp_path))
  assert _file_words(str(tmp_path / 'again' / 'stackoverflow.word_count')) == (
      _file_words())


# ------------------------------------------------------------------ loader --

def test_load_matches_the_raw_rows(tmp_path, raw):
  seq_len, vocab_size, cap = 20, 30, 25
  c = _load(tmp_path, seq_len=seq_len, vocab_size=vocab_size,
            max_sequences=cap)
  assert c.vocab == _file_words()[:vocab_size]
  assert c.meta['layout'] == 'sqlite' and not c.meta['indexed']
  assert c.meta['vocab_source'] == 'stackoverflow.word_count'
  assert c.num_classes == vocab_size + 4
  for split in ('train', 'heldout', 'test'):
    data = getattr(c, split)
    assert data.client_ids == sorted(raw[split])  # String order: '7' last.
    for cid in data.client_ids:
      got = data.client(cid)
      x, y = _expected(raw[split][cid], c.vocab, seq_len, cap)
      assert got['x'].dtype == np.int32 and got['x'].shape == x.shape
      np.testing.assert_array_equal(got['x'], x)
      np.testing.assert_array_equal(got['y'], y)
  assert c.train.client_ids == ['101', '2043', '35', '4127', '58', '7']
  assert c.test.client_ids == ['2043', '35', '9999']


def test_sequence_layout_and_oov(tmp_path, raw):
  c = _load(tmp_path, seq_len=20, vocab_size=30, max_sequences=0)
  short = long_ = 0
  for split in ('train', 'heldout', 'test'):
    data = getattr(c, split)
    for cid in data.client_ids:
      x, y = data.client(cid)['x'], data.client(cid)['y']
      sentences = raw[split][cid]
      assert len(x) == len(sentences)  # max_sequences=0: all of them.
      np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # The shift.
      assert (x[:, 0] == so.BOS_ID).all()
      assert not (x[:, 1:] == so.BOS_ID).any() and not (y == so.BOS_ID).any()
      for row_x, row_y, s in zip(x, y, sentences):
        n = len(s.split())
        if n <= 18:  # bos + n words + eos fit in seq_len + 1 = 21.
          short += 1
          assert row_y[n] == so.EOS_ID and (row_y[n + 1:] == 0).all()
          assert (row_x[1:n + 1] >= so.OOV_ID).all()
          assert row_x[n + 1] == so.EOS_ID and (row_x[n + 2:] == 0).all()
        elif n >= 20:  # Cut: no eos, no padding.
          long_ += 1
          assert (row_y >= so.OOV_ID).all() and (row_x[1:] >= so.OOV_ID).all()
  assert short > 100 and long_ > 5  # The fixture exercises both.
  # Words that never occur in training are oov whatever the vocabulary.
  unseen = {'zygomorphic', 'quux', 'frobnicate', 'blorp'}
  assert not unseen & set(_file_words())
  held = [s for ss in raw['heldout'].values() for s in ss]
  assert any(unseen & set(s.split()) for s in held)
  for s in held:
    ids = c.encode(s)
    for w, i in zip(s.split(), ids):
      assert (i == so.OOV_ID) == (w not in c.vocab[:30])
  # Out of the top 30 words: oov too; and a small vocabulary has more oov.
  big = _load(tmp_path, vocab_size=10_000, max_sequences=0)
  assert big.vocab == _file_words()  # The file has fewer words than asked.
  oov = lambda corpus: int((corpus.train.concatenated()['x'] == 3).sum())
  assert oov(big) == 0 < oov(c)


def test_encode_decode_helpers(tmp_path):
  c = _load(tmp_path, vocab_size=30)
  s = ' '.join(c.vocab[:5])
  assert c.encode(s) == [4, 5, 6, 7, 8]
  assert c.decode([1, *c.encode(s), 2, 0, 0]) == s
  assert c.decode(c.encode('the quux')) == 'the <oov>'


def test_max_sequences_and_max_clients(tmp_path, raw):
  c = _load(tmp_path, max_sequences=5, max_clients=2, vocab_size=30)
  assert c.train.client_ids == ['101', '2043']
  assert c.heldout.client_ids == sorted(raw['heldout'])[:2]  # Same limit.
  assert c.test.client_ids == ['2043', '35']
  for data in (c.train, c.heldout, c.test):
    assert (data.client_sizes == 5).all()
  x, _ = _expected(raw['train']['2043'], c.vocab, 20, 5)
  np.testing.assert_array_equal(c.train.client('2043')['x'], x)
  d = _load(tmp_path, max_clients=1, max_eval_clients=0)
  assert d.train.client_ids == ['101'] and d.heldout.num_clients == 3
  assert (d.train.client_sizes == len(raw['train']['101'])).all()


def test_vocab_from_word_count_file_variants(tmp_path):
  words = _file_words()
  # Top-N by count, in the file's order.
  with open(os.path.join(FIXTURE, 'stackoverflow.word_count')) as f:
    counts = [int(l.split()[1]) for l in f]
  assert counts == sorted(counts, reverse=True)
  ref = _load(tmp_path, vocab_size=12)
  assert ref.vocab == words[:12]
  # The .lzma and TFF's .tar.bz2 forms give the same vocabulary.
  for name in ('stackoverflow.word_count.lzma',
               'stackoverflow.word_count.tar.bz2'):
    d = tmp_path / name.replace('.', '_')
    d.mkdir()
    shutil.copy(os.path.join(FIXTURE, 'stackoverflow.sqlite.lzma'), d)
    src = os.path.join(FIXTURE, 'stackoverflow.word_count')
    if name.endswith('.lzma'):
      with open(src, 'rb') as f:
        (d / name).write_bytes(lzma.compress(f.read()))
    else:
      with tarfile.open(d / name, 'w:bz2') as tar:
        tar.add(src, arcname='stackoverflow.word_count')
    got = _load(tmp_path, path=str(d), vocab_size=12)
    assert got.vocab == words[:12] and got.meta['vocab_source'] == name
  # The file is what decides: a reordered file gives its own top words.
  d = tmp_path / 'reversed'
  d.mkdir()
  shutil.copy(os.path.join(FIXTURE, 'stackoverflow.sqlite.lzma'), d)
  (d / 'stackoverflow.word_count').write_text(
      ''.join(f'{w} {i + 1}\n' for i, w in enumerate(reversed(words))))
  assert _load(tmp_path, path=str(d), vocab_size=7).vocab == (
      words[::-1][:7])


def test_vocab_counted_without_word_count_file(tmp_path, raw):
  path = _copy_without_word_counts(tmp_path)
  c = _load(tmp_path, path=path, vocab_size=20)
  assert c.meta['vocab_source'] == 'counted over 6 training clients'
  users, uses = collections.Counter(), collections.Counter()
  for sentences in raw['train'].values():
    words = [w for s in sentences for w in s.split()]
    users.update(set(words))
    uses.update(words)
  expected = sorted(users, key=lambda w: (-users[w], -uses[w], w))
  assert c.vocab == expected[:20]
  # The training users' counts equal the shipped file's (TFF's definition);
  # only the order among ties may differ.
  assert dict(so.count_words(raw['train'].values())) == dict(
      so.read_word_counts(os.path.join(FIXTURE, 'stackoverflow.word_count')))
  # Under max_clients, only the clients read are counted.
  two = _load(tmp_path, path=path, vocab_size=1000, max_clients=2,
              max_sequences=3)
  seen = {w for cid in ('101', '2043') for s in raw['train'][cid][:3]
          for w in s.split()}
  assert set(two.vocab) == seen
  assert two.meta['vocab_source'] == 'counted over 2 training clients'


def test_deterministic_cached_plain_and_indexed(tmp_path):
  a = _load(tmp_path, vocab_size=25, max_sequences=10)
  db = a.meta['database']
  mtime = os.stat(db).st_mtime_ns
  b = _load(tmp_path, vocab_size=25, max_sequences=10)
  _assert_same(a, b)
  assert b.meta['database'] == db and os.stat(db).st_mtime_ns == mtime
  assert not [f for f in os.listdir(os.path.dirname(db)) if 'tmp' in f]
  # A plain stackoverflow.sqlite is read in place (and never written).
  plain = tmp_path / 'plain'
  plain.mkdir()
  shutil.copy(db, plain / 'stackoverflow.sqlite')
  shutil.copy(os.path.join(FIXTURE, 'stackoverflow.word_count'), plain)
  before = sorted(os.listdir(plain))
  c = _load(tmp_path, path=str(plain), vocab_size=25, max_sequences=10)
  assert c.meta['database'] == str(plain / 'stackoverflow.sqlite')
  assert sorted(os.listdir(plain)) == before
  _assert_same(a, c)
  # With an index on client_id, rows are fetched per client: same result.
  con = sqlite3.connect(plain / 'stackoverflow.sqlite')
  con.execute('CREATE INDEX by_client ON examples (split_name, client_id)')
  con.commit()
  con.close()
  d = _load(tmp_path, path=str(plain), vocab_size=25, max_sequences=10)
  assert d.meta['indexed']
  _assert_same(a, d)
  e = _load(tmp_path, path=str(plain), vocab_size=25, max_sequences=10,
            max_clients=3)
  assert e.train.client_ids == a.train.client_ids[:3]


def test_split_heldout_test(tmp_path):
  c = _load(tmp_path, split_heldout='test')
  assert c.heldout is c.test and c.test.client_ids == ['2043', '35', '9999']
  with pytest.raises(ValueError, match='split_heldout'):
    _load(tmp_path, split_heldout='validation')


def test_missing_files_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    _load(tmp_path, path=str(tmp_path / 'nope'))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError,
                     match=r'stackoverflow\.sqlite\.lzma.*stackoverflow_'
                     r'held_out\.h5'):
    _load(tmp_path, path=str(empty))
  bad = tmp_path / 'bad'
  bad.mkdir()
  sqlite3.connect(bad / 'stackoverflow.sqlite').execute(
      'CREATE TABLE t (a)').connection.close()
  with pytest.raises(ValueError, match='client_metadata'):
    _load(tmp_path, path=str(bad))


def test_registry_source(tmp_path):
  cfg = registry.default_config()
  cfg.source = 'stackoverflow'
  cfg.data_dir = FIXTURE
  cfg.cache_dir = str(tmp_path / 'cache')
  cfg.num_clients, cfg.heldout_clients = 4, 2
  cfg.vocab_size, cfg.seq_len, cfg.max_sequences = 30, 16, 8
  assert 'stackoverflow' in registry.SOURCES
  b = registry.load(cfg)
  assert b.train.client_ids == ['101', '2043', '35', '4127']
  assert b.heldout.num_clients == 2
  assert b.test['x'].shape == (16, 16) and b.test['y'].dtype == np.int32
  assert b.num_classes == 34 and b.input_shape == (16,)
  assert b.train.concatenated()['x'].max() < b.num_classes
  cfg.heldout_clients = 0
  b = registry.load(cfg)
  # max_eval_clients falls back to num_clients (4): all 3 test users.
  assert b.heldout is None and b.test['x'].shape == (24, 16)
  cfg.data_dir = None
  with pytest.raises(ValueError, match='data.data_dir'):
    registry.load(cfg)


# ---------------------------------------------------------------------- h5 --

def test_h5_layout_needs_h5py(tmp_path, monkeypatch):
  for name in so.H5_NAMES.values():
    (tmp_path / name).write_bytes(b'')
  monkeypatch.setitem(sys.modules, 'h5py', None)
  with pytest.raises(ImportError, match='pip install h5py'):
    _load(tmp_path, path=str(tmp_path))


def test_h5_layout(tmp_path, raw):
  h5py = pytest.importorskip('h5py')
  d = tmp_path / 'h5'
  d.mkdir()
  shutil.copy(os.path.join(FIXTURE, 'stackoverflow.word_count'), d)
  text = h5py.string_dtype()
  for split, name in so.H5_NAMES.items():
    with h5py.File(d / name, 'w') as f:
      for cid, sentences in raw[split].items():
        g = f.create_group(f'examples/{cid}')
        g.create_dataset('tokens', data=np.array(sentences, dtype=object),
                         dtype=text)
        g.create_dataset('type', data=np.array(['answer'] * len(sentences),
                                               dtype=object), dtype=text)
  a = _load(tmp_path, vocab_size=30, max_sequences=7, max_clients=4)
  b = _load(tmp_path, path=str(d), vocab_size=30, max_sequences=7,
            max_clients=4)
  assert b.meta['layout'] == 'h5'
  _assert_same(a, b)
  nowc = _load(tmp_path, path=_copy_without_word_counts(tmp_path))
  os.remove(d / 'stackoverflow.word_count')
  _assert_same(nowc, _load(tmp_path, path=str(d)))
