"""TFF's Stack Overflow dataset, read from its own files, without TensorFlow.

Stack Overflow is the standard cross-device next-word benchmark (Reddi et
al., "Adaptive Federated Optimization"; TFF; FedJAX): one client per user,
one example per sentence of their questions and answers. TFF and FedJAX
read it through TensorFlow; this module reads the same files with numpy and
the standard library (sqlite3, lzma, tarfile), so the project keeps no
TensorFlow dependency. The output follows `stdlib_corpus` (which follows
TFF/FedJAX): ids pad=0, bos=1, eos=2, oov=3 and words from 4; each example
is one sentence as bos + words + eos cut or padded to `seq_len + 1`,
`x = seq[:-1]`, `y = seq[1:]` (int32 [n, seq_len]); at most
`max_sequences` per client, the first in the file's order.

Getting the files (we never download; put them in one directory):

* Current TFF layout (`tff.simulation.datasets.stackoverflow.load_data`):
  https://storage.googleapis.com/tff-datasets-public/stackoverflow.sqlite.lzma
  Keep it compressed (it is then decompressed once into `cache_dir`, tens
  of GB) or decompress it yourself (`unlzma stackoverflow.sqlite.lzma`, from
  xz-utils) to `stackoverflow.sqlite`, which is then read in place and never
  written.
* Word counts (`load_word_counts`):
  https://storage.googleapis.com/tff-datasets-public/stackoverflow.word_count.tar.bz2
  holding `stackoverflow.word_count`; the archive, the extracted file or an
  lzma-compressed `stackoverflow.word_count.lzma` are all read.
* Older TFF layout: https://storage.googleapis.com/tff-datasets-public/stackoverflow.tar.bz2
  extracted to `stackoverflow_train.h5`, `stackoverflow_held_out.h5`,
  `stackoverflow_test.h5`; reading it needs `h5py` (`pip install h5py`),
  which is not a dependency of this project.

The SQLite database has a table `examples(split_name, client_id,
serialized_example_proto)`, splits 'train', 'heldout' and 'test', and a
table `client_metadata(client_id, split_name, num_examples)`. Each blob is
a serialized `tf.train.Example` whose `tokens` feature holds one sentence,
space-separated, already lowercased and tokenised by TFF; `decode_example`
below is a small decoder of the protobuf wire format for that message.
Splits (TFF's docs): train = users' examples before 2018 except held-out
users (342,477 users); heldout = every example of users with id % 10 == 0
(38,758 users, never in train); test = examples from 2018 on of the
non-held-out users (204,088 users, mostly the same ids as train).

Vocabulary: as in TFF, the first `vocab_size` words (10,000) of the word
count file, which is sorted by count (the number of training users using
the word). Without that file the vocabulary is counted the same way over
the training clients that were read (ties: more occurrences first, then
alphabetical), which is exact for a full read and an approximation under
`max_clients`.

Reading streams: the client lists come from `client_metadata` (small), the
first `max_clients` ids of each split in sorted order; then rows are
fetched per client if `examples` has an index on `client_id` (one indexed
query per client), else by one sequential scan of `examples` for all
splits together that keeps only the wanted clients' first `max_sequences`
rows and stops as soon as every wanted client is complete. Either way
nothing beyond the wanted clients' sentences is kept in memory.
"""

from __future__ import annotations

import collections
import hashlib
import lzma
import os
import pathlib
import shutil
import sqlite3
import struct
import tarfile
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from fedjax_eff.data.federated import FederatedData

PAD_ID, BOS_ID, EOS_ID, OOV_ID = 0, 1, 2, 3
NUM_SPECIAL = 4
SPLITS = ('train', 'heldout', 'test')
DB_NAME = 'stackoverflow.sqlite'
H5_NAMES = {'train': 'stackoverflow_train.h5',
            'heldout': 'stackoverflow_held_out.h5',
            'test': 'stackoverflow_test.h5'}
WORD_COUNT_NAMES = ('stackoverflow.word_count', 'stackoverflow.word_count.lzma',
                    'stackoverflow.word_count.tar.bz2')
DEFAULT_CACHE_DIR = os.path.join('~', '.cache', 'fedjax_eff', 'stackoverflow')


# ------------------------------------------------- tf.train.Example codec --
# Example{features=1: Features{feature=1: map<string, Feature>}};
# Feature{oneof bytes_list=1, float_list=2, int64_list=3}, each list a
# message with `repeated value = 1` (floats and ints packed).

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise ValueError('Truncated varint in protobuf message.')
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if b < 0x80:
      return result, pos
    shift += 7
    if shift >= 70:
      raise ValueError('Varint longer than 10 bytes in protobuf message.')


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
  """(field number, wire type, value) of each field of one message; the
  value is an int for varints, bytes otherwise. Unknown fields are thereby
  skippable, as protobuf requires."""
  pos, end = 0, len(buf)
  while pos < end:
    key, pos = _varint(buf, pos)
    num, wire = key >> 3, key & 7
    if wire == 0:
      val, pos = _varint(buf, pos)
    elif wire in (1, 2, 5):
      if wire == 2:
        n, pos = _varint(buf, pos)
      else:
        n = 8 if wire == 1 else 4
      val = buf[pos:pos + n]
      pos += n
      if pos > end:
        raise ValueError('Truncated field in protobuf message.')
    else:
      raise ValueError(f'Unsupported protobuf wire type {wire} (field '
                       f'{num}).')
    yield num, wire, val


def _int64(v: int) -> int:
  return v - (1 << 64) if v >= 1 << 63 else v


def _decode_feature(buf: bytes) -> list:
  out: list = []
  for num, wire, val in _fields(buf):  # A oneof: the last one set wins.
    if wire != 2 or num not in (1, 2, 3):
      continue
    out = []
    for n, w, v in _fields(val):
      if n != 1:
        continue
      if num == 1 and w == 2:
        out.append(bytes(v))
      elif num == 2 and w == 2:  # Packed floats.
        out.extend(struct.unpack(f'<{len(v) // 4}f', v))
      elif num == 2 and w == 5:
        out.append(struct.unpack('<f', v)[0])
      elif num == 3 and w == 2:  # Packed varints.
        pos = 0
        while pos < len(v):
          x, pos = _varint(v, pos)
          out.append(_int64(x))
      elif num == 3 and w == 0:
        out.append(_int64(v))
  return out


def decode_example(blob: bytes) -> dict[str, list]:
  """A serialized `tf.train.Example` as {name: list of bytes|float|int}."""
  features: dict[str, list] = {}
  for num, wire, val in _fields(bytes(blob)):
    if num != 1 or wire != 2:
      continue
    for n, w, entry in _fields(val):
      if n != 1 or w != 2:
        continue
      key, value = b'', []
      for n2, w2, v2 in _fields(entry):
        if n2 == 1 and w2 == 2:
          key = v2
        elif n2 == 2 and w2 == 2:
          value = _decode_feature(v2)
      features[key.decode('utf-8')] = value
  return features


def _put_varint(v: int) -> bytes:
  v &= (1 << 64) - 1
  out = bytearray()
  while v >= 0x80:
    out.append((v & 0x7F) | 0x80)
    v >>= 7
  out.append(v)
  return bytes(out)


def _put_len(num: int, payload: bytes) -> bytes:
  return _put_varint(num << 3 | 2) + _put_varint(len(payload)) + payload


def encode_example(features: Mapping[str, object]) -> bytes:
  """Serializes {name: value or list} as a `tf.train.Example` (str/bytes ->
  bytes_list, float -> float_list, int -> int64_list; an empty list is an
  empty bytes_list). Keys are written sorted, like protobuf's deterministic
  serialization. Used to build test fixtures."""
  entries = b''
  for key in sorted(features):
    values = features[key]
    if isinstance(values, (str, bytes, int, float, np.generic)):
      values = [values]
    values = list(values)
    if values and isinstance(values[0], (float, np.floating)):
      inner = _put_len(1, struct.pack(f'<{len(values)}f', *values))
      feature = _put_len(2, inner)
    elif values and isinstance(values[0], (int, np.integer)):
      inner = _put_len(1, b''.join(_put_varint(int(v)) for v in values))
      feature = _put_len(3, inner)
    else:
      inner = b''.join(_put_len(1, v.encode('utf-8') if isinstance(v, str)
                                else bytes(v)) for v in values)
      feature = _put_len(1, inner)
    entry = _put_len(1, key.encode('utf-8')) + _put_len(2, feature)
    entries += _put_len(1, entry)
  return _put_len(1, entries)


# -------------------------------------------------------------- vocabulary --

def read_word_counts(path: str, limit: int = 0) -> list[tuple[str, int]]:
  """(word, count) of a `stackoverflow.word_count` file in its order (the
  first `limit` lines; 0 = all). Reads the plain file, `.lzma` or TFF's
  `.tar.bz2` archive. Lines are "word<whitespace>count"."""
  out = []

  def take(lines: Iterable[bytes]) -> None:
    for line in lines:
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2:
        raise ValueError(f'{path}: expected "word count" lines, got '
                         f'{line[:80]!r}.')
      out.append((parts[0].decode('utf-8'), int(parts[1])))
      if limit and len(out) >= limit:
        return

  if path.endswith('.tar.bz2'):
    with tarfile.open(path, 'r:bz2') as tar:
      member = next((m for m in tar.getmembers() if m.isfile() and
                     os.path.basename(m.name) == WORD_COUNT_NAMES[0]), None)
      if member is None:
        raise FileNotFoundError(f'{path} holds no {WORD_COUNT_NAMES[0]}.')
      take(tar.extractfile(member))
  else:
    opener = lzma.open if path.endswith('.lzma') else open
    with opener(path, 'rb') as f:
      take(f)
  return out


def count_words(clients: Iterable[Sequence[str]]) -> list[tuple[str, int]]:
  """Words by the number of clients using them (TFF's word count), then by
  occurrences, then alphabetically; each client a list of sentences."""
  users, uses = collections.Counter(), collections.Counter()
  for sentences in clients:
    seen = collections.Counter(w for s in sentences for w in s.split())
    users.update(seen.keys())
    uses.update(seen)
  return sorted(users.items(), key=lambda kv: (-kv[1], -uses[kv[0]], kv[0]))


# ---------------------------------------------------------------- readers --

def _find_word_counts(path: str) -> str | None:
  for name in WORD_COUNT_NAMES:
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  return None


def _decompressed(lzma_path: str, cache_dir: str | None) -> str:
  """`stackoverflow.sqlite.lzma` decompressed once into the cache, keyed by
  the archive's path, size and mtime (so a new download decompresses anew);
  written to a temporary name and renamed, so a partial file is never
  read."""
  st = os.stat(lzma_path)
  key = hashlib.sha256(f'{os.path.abspath(lzma_path)}|{st.st_size}|'
                       f'{st.st_mtime_ns}'.encode()).hexdigest()[:12]
  out_dir = os.path.join(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR),
                         key)
  out = os.path.join(out_dir, DB_NAME)
  if not os.path.exists(out):
    os.makedirs(out_dir, exist_ok=True)
    tmp = f'{out}.{os.getpid()}.tmp'
    try:
      with lzma.open(lzma_path, 'rb') as src, open(tmp, 'wb') as dst:
        shutil.copyfileobj(src, dst, length=1 << 22)
      os.replace(tmp, out)
    finally:
      if os.path.exists(tmp):  # Interrupted or corrupt: leave no debris.
        os.remove(tmp)
  return out


def _connect(db_path: str) -> sqlite3.Connection:
  """Read-only, so that reading never writes a journal next to the data."""
  con = sqlite3.connect(pathlib.Path(os.path.abspath(db_path)).as_uri() +
                        '?mode=ro', uri=True)
  tables = {r[0] for r in con.execute(
      "SELECT name FROM sqlite_master WHERE type = 'table'")}
  missing = {'examples', 'client_metadata'} - tables
  if missing:
    con.close()
    raise ValueError(f'{db_path} is not a TFF SqlClientData database: no '
                     f'table(s) {sorted(missing)}.')
  return con


def _client_index(con: sqlite3.Connection) -> bool:
  """Whether an index on `examples` leads with client_id (optionally after
  split_name), so that per-client queries avoid full scans."""
  for row in con.execute('PRAGMA index_list(examples)'):
    cols = [r[2] for r in con.execute(f'PRAGMA index_info("{row[1]}")')]
    if cols[:1] == ['client_id'] or cols[:2] == ['split_name', 'client_id']:
      return True
  return False


def _sqlite_clients(con: sqlite3.Connection, split: str, limit: int
                    ) -> dict[str, int]:
  """The first `limit` (0 = all) client ids of `split`, sorted, with their
  example counts."""
  q = ('SELECT client_id, SUM(num_examples) FROM client_metadata '
       'WHERE split_name = ? GROUP BY client_id ORDER BY client_id')
  rows = con.execute(q + (' LIMIT ?' if limit else ''),
                     (split, limit) if limit else (split,))
  return {str(c): int(n) for c, n in rows}


def _tokens(blob: bytes) -> str:
  got = decode_example(blob).get('tokens')
  if not got:
    raise ValueError('A Stack Overflow example has no `tokens` feature.')
  return got[0].decode('utf-8')


def _read_sqlite(con: sqlite3.Connection, wanted: dict[str, dict[str, int]],
                 cap: int | None, indexed: bool
                 ) -> Iterator[tuple[str, str, list[str]]]:
  """(split, client, first `cap` sentences) for every wanted client."""
  if indexed:
    q = ('SELECT serialized_example_proto FROM examples WHERE split_name = ? '
         'AND client_id = ? ORDER BY rowid LIMIT ?')
    for split, clients in wanted.items():
      for cid in clients:
        rows = con.execute(q, (split, cid, -1 if cap is None else cap))
        yield split, cid, [_tokens(b) for (b,) in rows]
    return
  got = {s: {c: [] for c in clients} for s, clients in wanted.items()}
  need = {(s, c): n if cap is None else min(n, cap)
          for s, clients in wanted.items() for c, n in clients.items()}
  left = sum(1 for n in need.values() if n > 0)
  if left:
    rows = con.execute('SELECT split_name, client_id, serialized_example_proto '
                       'FROM examples ORDER BY rowid')
    for split, cid, blob in rows:
      lst = got.get(split, {}).get(cid)
      if lst is None or (cap is not None and len(lst) >= cap):
        continue
      lst.append(_tokens(blob))
      if len(lst) == need[split, cid]:
        left -= 1
        if not left:  # Every wanted client complete: skip the rest.
          break
  for split, clients in got.items():
    for cid, sentences in clients.items():
      yield split, cid, sentences


def _read_h5(path: str, limits: dict[str, int], cap: int | None
             ) -> Iterator[tuple[str, str, list[str]]]:
  try:
    import h5py  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'Reading the h5 Stack Overflow files in {path} needs h5py, which is '
        'not a dependency of fedjax_eff: `pip install h5py` (or use TFF\'s '
        'current stackoverflow.sqlite.lzma).') from e
  for split, limit in limits.items():
    with h5py.File(os.path.join(path, H5_NAMES[split]), 'r') as f:
      ids = sorted(f['examples'].keys())
      for cid in ids[:limit or None]:
        tokens = f['examples'][cid]['tokens']
        vals = tokens[:cap] if cap is not None else tokens[()]
        yield split, cid, [v.decode('utf-8') if isinstance(v, bytes) else
                           str(v) for v in np.asarray(vals).reshape(-1)]


# ------------------------------------------------------------------ corpus --

class StackOverflowCorpus(NamedTuple):
  """Splits as FederatedData ({'x', 'y'} int32 [n, seq_len] per client,
  clients in sorted id order), the vocabulary (word `vocab[i]` has id
  `4 + i`) and a record of what was read."""
  train: FederatedData
  heldout: FederatedData
  test: FederatedData
  vocab: list[str]
  meta: dict

  @property
  def num_classes(self) -> int:
    """Output ids: the 4 specials plus the words (TFF: 10,000 + 4)."""
    return NUM_SPECIAL + len(self.vocab)

  def encode(self, sentence: str) -> list[int]:
    """Word ids of a space-separated sentence, without bos/eos."""
    return _encoder(self.vocab)(sentence)

  def decode(self, ids: Iterable[int]) -> str:
    """The sentence of `ids`; pad, bos and eos vanish, oov is '<oov>'."""
    words = []
    for i in ids:
      i = int(i)
      if i == OOV_ID:
        words.append('<oov>')
      elif i >= NUM_SPECIAL:
        words.append(self.vocab[i - NUM_SPECIAL])
    return ' '.join(words)


# The last vocabulary's word -> id map, so that `encode` in a loop does not
# rebuild a 10,000-entry dict per call (a list cannot key an lru_cache).
_LAST_ENCODER: list = [None, None]


def _encoder(vocab: list[str]):
  """sentence -> word ids (oov = 3) for `vocab`."""
  if _LAST_ENCODER[0] is not vocab:
    ids = {w: NUM_SPECIAL + i for i, w in enumerate(vocab)}
    _LAST_ENCODER[:] = [vocab,
                        lambda s: [ids.get(w, OOV_ID) for w in s.split()]]
  return _LAST_ENCODER[1]


def to_sequences(sentences: Sequence[Sequence[int]], seq_len: int
                 ) -> dict[str, np.ndarray]:
  """bos + ids + eos cut or padded with 0 to `seq_len + 1`; x = seq[:-1],
  y = seq[1:]. A sentence of more than `seq_len - 1` words loses its eos
  (and its tail), as in TFF/FedJAX's preprocessing."""
  seq = np.zeros((len(sentences), seq_len + 1), np.int32)
  for i, ids in enumerate(sentences):
    row = [BOS_ID, *ids, EOS_ID][:seq_len + 1]
    seq[i, :len(row)] = row
  return {'x': seq[:, :-1], 'y': seq[:, 1:]}


def load_stackoverflow(path: str, seq_len: int = 20, vocab_size: int = 10_000,
                       max_sequences: int = 1000, max_clients: int = 0,
                       split_heldout: str = 'heldout',
                       cache_dir: str | None = None,
                       max_eval_clients: int | None = None
                       ) -> StackOverflowCorpus:
  """Stack Overflow's splits as next-word clients (see the module docstring).

  Args:
    path: directory holding `stackoverflow.sqlite` or
      `stackoverflow.sqlite.lzma` (current TFF layout, preferred) or the
      three `stackoverflow_{train,held_out,test}.h5` files (older layout,
      needs h5py), and optionally a word count file.
    seq_len: words per example, bos/eos included (TFF: 20).
    vocab_size: number of words (ids 4 .. 4 + vocab_size - 1); everything
      else is oov (3).
    max_sequences: at most this many sentences per client, the first ones
      (0 = all; TFF/FedJAX: 1,000 for training).
    max_clients: the first this many training clients by sorted id (0 = all).
    split_heldout: the split returned as `heldout`: 'heldout' (users never
      in train; default) or 'test' (then `heldout` is `test`).
    cache_dir: where `stackoverflow.sqlite.lzma` is decompressed (default
      `~/.cache/fedjax_eff/stackoverflow`).
    max_eval_clients: the first this many clients of the heldout and test
      splits (None = `max_clients`, 0 = all).

  Raises:
    FileNotFoundError: no directory, or no data file in it.
    ValueError: bad arguments, a malformed database, or an empty split.
  """
  if seq_len < 2 or vocab_size < 1 or max_sequences < 0 or max_clients < 0:
    raise ValueError(f'Need seq_len >= 2, vocab_size >= 1, max_sequences >= '
                     f'0, max_clients >= 0; got {seq_len}, {vocab_size}, '
                     f'{max_sequences}, {max_clients}.')
  if split_heldout not in ('heldout', 'test'):
    raise ValueError(f"split_heldout must be 'heldout' or 'test', got "
                     f'{split_heldout!r}.')
  path = os.path.expanduser(str(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'Stack Overflow directory {path!r} does not '
                            f'exist; see fedjax_eff.data.stackoverflow for '
                            'how to obtain the files.')
  eval_clients = max_clients if max_eval_clients is None else max_eval_clients
  splits = ['train', split_heldout] + (['test'] if split_heldout != 'test'
                                       else [])
  limits = {s: max_clients if s == 'train' else eval_clients for s in splits}
  cap = max_sequences or None
  meta = dict(path=os.path.abspath(path), seq_len=seq_len,
              vocab_size=vocab_size, max_sequences=max_sequences,
              max_clients=max_clients, max_eval_clients=eval_clients,
              split_heldout=split_heldout)

  db = os.path.join(path, DB_NAME)
  con = None
  if os.path.isfile(db) or os.path.isfile(db + '.lzma'):
    if not os.path.isfile(db):
      db = _decompressed(db + '.lzma', cache_dir)
    con = _connect(db)
    wanted = {s: _sqlite_clients(con, s, limits[s]) for s in splits}
    indexed = _client_index(con)
    meta.update(layout='sqlite', database=db, indexed=indexed)
    rows = _read_sqlite(con, wanted, cap, indexed)
  elif all(os.path.isfile(os.path.join(path, H5_NAMES[s])) for s in SPLITS):
    meta.update(layout='h5', files=[H5_NAMES[s] for s in SPLITS])
    rows = _read_h5(path, limits, cap)
  else:
    raise FileNotFoundError(
        f'No Stack Overflow data in {path!r}: looked for {DB_NAME}, '
        f'{DB_NAME}.lzma, or all of {sorted(H5_NAMES.values())}; see '
        'fedjax_eff.data.stackoverflow for how to obtain them.')

  wc_path = _find_word_counts(path)
  vocab = None
  if wc_path:
    vocab = [w for w, _ in read_word_counts(wc_path, vocab_size)]
    meta['vocab_source'] = os.path.basename(wc_path)
  # Sentences are encoded as each client arrives when the vocabulary is
  # known; otherwise kept as text until the training clients are counted.
  out: dict[str, dict[str, object]] = {s: {} for s in splits}
  try:
    for split, cid, sentences in rows:
      if not sentences:
        continue
      out[split][cid] = (to_sequences([_encoder(vocab)(s) for s in sentences],
                                      seq_len) if vocab is not None
                         else sentences)
  finally:
    if con is not None:
      con.close()
  if vocab is None:
    vocab = [w for w, _ in count_words(out['train'].values())][:vocab_size]
    meta['vocab_source'] = (f'counted over {len(out["train"])} training '
                            'clients')
    enc = _encoder(vocab)
    out = {s: {c: to_sequences([enc(x) for x in v], seq_len)
               for c, v in clients.items()} for s, clients in out.items()}

  data = {}
  for split in splits:
    if not out[split]:
      raise ValueError(f'Stack Overflow split {split!r} in {path!r} has no '
                       'client with examples.')
    ids = sorted(out[split])
    data[split] = FederatedData(out[split], order=ids)
    meta[f'{split}_clients'] = len(ids)
    meta[f'{split}_examples'] = int(data[split].client_sizes.sum())
  meta['vocab_words'] = len(vocab)
  return StackOverflowCorpus(data['train'], data[split_heldout], data['test'],
                             vocab, meta)
