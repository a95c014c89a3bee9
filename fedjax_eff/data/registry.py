"""One entry point from a data config to training, held-out and test data.

The experiment loop only calls `load(cfg.data)`; which source and partition
produced the clients is a config choice. Held-out clients are cut from the
same population as the training clients but never trained on, so they
measure how well the model serves clients it has not seen (personalisation
and generalisation gaps), while `test` is the usual central test set.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections
import numpy as np

from fedjax_eff.data import partitions, sources
from fedjax_eff.data.federated import FederatedData

SOURCES = ('digits', 'fashion_mnist', 'tfds', 'synthetic', 'stdlib', 'markov',
           'stackoverflow', 'speech', 'librispeech', 'npz', 'stdlib_docs')
PARTITIONS = ('iid', 'dirichlet', 'shards', 'natural')


class DataBundle(NamedTuple):
  """What the experiment loop trains and evaluates on.

  Attributes:
    train: the training clients.
    heldout: clients for evaluation only, never trained on (None if
      `heldout_clients=0`).
    test: central test set `{'x', 'y'}` (None if there is none).
    num_classes: label count for the model head.
    input_shape: one example's `x` shape.
  """
  train: FederatedData
  heldout: FederatedData | None
  test: dict[str, np.ndarray] | None
  num_classes: int
  input_shape: tuple
  # Multi-task data (`data.tasks`): one bundle per task, and each training
  # client's task. `train`/`heldout` are then the union of the tasks'
  # clients (ids 't<k>/<id>'), `test` is None (each task has its own).
  tasks: tuple['DataBundle', ...] = ()
  client_task: np.ndarray | None = None

  @property
  def task_classes(self) -> tuple[int, ...]:
    return tuple(t.num_classes for t in self.tasks)

  @property
  def model_kwargs(self) -> dict[str, Any]:
    """Model kwargs the data needs: with several tasks, one head (and
    module set) per task (`num_tasks`, `task_classes`); else none."""
    if not self.tasks:
      return {}
    return {'num_tasks': len(self.tasks), 'task_classes': self.task_classes}

  def client_tiers(self, fractions, seed: int) -> tuple[np.ndarray, int]:
    """`(tier [num training clients], number of tiers)`: the static
    program each training client runs. With several tasks a client's tier
    is its task (dispatched like a device tier, so device tiers cannot be
    added); otherwise its device tier, drawn once from `fractions`
    (`draw_tiers`; [] = one tier)."""
    if self.tasks:
      if len(fractions):
        raise ValueError('config.data.tasks and config.devices.'
                         'tier_fractions do not combine: a client\'s tier '
                         'is its task.')
      return self.client_task, len(self.tasks)
    return (draw_tiers(self.train.num_clients, fractions, seed),
            max(1, len(fractions)))

  def client_view(self, client: int) -> tuple['DataBundle', dict]:
    """What training client `client`'s own model is evaluated on, and the
    model kwargs that select its task: its task's bundle and `{'task': t}`
    with several tasks; else this bundle and `{}`."""
    if not self.tasks:
      return self, {}
    t = int(self.client_task[client])
    return self.tasks[t], {'task': t}


def draw_tiers(num_clients: int, fractions, seed: int) -> np.ndarray:
  """Each client's device tier, drawn once from `fractions` (seeded)."""
  if not len(fractions):
    return np.zeros(num_clients, np.int32)
  p = np.asarray(fractions, np.float64)
  if np.any(p < 0) or not np.isclose(p.sum(), 1.0):
    raise ValueError(f'config.devices.tier_fractions={list(fractions)} must '
                     'be non-negative and sum to 1.')
  rng = np.random.default_rng([seed, 0x7132])
  return rng.choice(len(p), size=num_clients, p=p).astype(np.int32)


def default_config() -> ml_collections.ConfigDict:
  """The data config contract with its defaults (`cfg.data` of experiments)."""
  return ml_collections.ConfigDict(dict(
      source='digits',        # 'digits' | 'fashion_mnist' | 'tfds' |
                              # 'synthetic' | 'stdlib' | 'markov' |
                              # 'stackoverflow' (the last three: next-token
                              # text) | 'speech' | 'librispeech' | 'npz'
                              # (your own arrays: sources.load_npz) |
                              # 'stdlib_docs' (docstring topic
                              # classification, BERT WordPiece ids)
      name='',                # tfds name: 'mnist', 'emnist/byclass', ...
      # tfds data_dir (None: TFDS default) and .npz cache of converted
      # arrays; typed so `--config.data.data_dir=DIR` can override None.
      # stackoverflow: the directory holding TFF's files (required; see
      # fedjax_eff.data.stackoverflow). fashion_mnist: the directory of its
      # four IDX files (None: /usr/share/datasets/fashion-mnist, Debian's
      # dataset-fashion-mnist package). npz: a directory of <client
      # id>.npz files or one .npz with a client_id array (required).
      # stdlib_docs: the Hugging Face model directory whose vocab.txt
      # tokenizes (None: the installed all-MiniLM-L6-v2, hf.minilm_dir()).
      data_dir=ml_collections.FieldReference(None, field_type=str),
      # (stdlib: the built corpus, default ~/.cache/fedjax_eff/stdlib;
      # stackoverflow: where stackoverflow.sqlite.lzma is decompressed)
      cache_dir=ml_collections.FieldReference(None, field_type=str),
      partition='dirichlet',  # 'iid' | 'dirichlet' | 'shards' | 'natural'
      num_clients=100,        # training clients
      heldout_clients=10,     # extra clients held out for evaluation
      dirichlet_alpha=0.5,
      shards_per_client=2,
      test_fraction=0.2,      # digits: central test split; synthetic,
                              # markov: per client test portion; stdlib:
                              # fraction of modules held out (unused by
                              # fashion_mnist and tfds: their own test split)
      synthetic_alpha=1.0,
      synthetic_beta=1.0,
      synthetic_dim=60,
      synthetic_classes=10,
      # Next-token text ('stdlib', 'markov', 'stackoverflow'): Stack
      # Overflow conventions, ids pad=0 bos=1 eos=2 oov=3, x/y int32
      # [n, seq_len]. stackoverflow: the first num_clients training users
      # and the first heldout_clients users of TFF's heldout and test splits
      # (by sorted id).
      seq_len=20,
      max_sequences=1000,     # per client
      # stdlib: SentencePiece vocabulary *including* the 4 special ids
      # (num_classes = vocab_size); stackoverflow: number of *words*, as in
      # TFF (ids 4.., num_classes = vocab_size + 4, i.e. 10,004).
      vocab_size=10_000,
      max_modules=0,          # stdlib: first N modules only (0 = all)
      markov_states=32,       # markov: chain states (vocab = 4 + states)
      markov_concentration=0.5,  # markov: shared prior's Dirichlet parameter
      markov_heterogeneity=0.1,  # markov: client spread around the prior
      # Speech ('speech': the espeak-ng set, 'librispeech'; see
      # fedjax_eff.data.speech): x float32 [n, frames, n_mels] log-mels with
      # x_len, y int32 character ids (0 = CTC blank/pad) with y_len;
      # max_sequences caps utterances per client; max_frames drops longer
      # utterances (0 = keep all).
      n_mels=40,
      max_frames=0,
      # Keep only these labels (relabelled 0..n-1 in this order); [] = all.
      # E.g. split digits: tasks of classes [0..4] and [5..9].
      classes=[],
      # Multi-task: one entry per task, each a dict of the keys above that
      # differ for that task (e.g. [dict(classes=[0, 1, 2, 3, 4]),
      # dict(classes=[5, 6, 7, 8, 9])]); [] = one task.
      tasks=[],
      # Central pretraining on a disjoint part of the corpus (Ro et al.):
      # a stable hash of the client id reserves this fraction of the
      # training clients for `launch/pretrain.py`; `part` picks which side
      # `train` holds: 'federated' (the rest) or 'pretrain' (the reserve).
      pretrain_fraction=0.0,
      part='federated',
      seed=0,
      # Fault injection (reliability tests, robustness studies): the first
      # N training clients (by index) get NaN in every float feature of
      # their first example. The round must drop exactly those clients
      # when they are sampled and train on the rest as if they were absent.
      nan_clients=0,
  ))


_DEFAULTS = default_config().to_dict(visit_map=None)


def _get(cfg: Any, key: str):
  return getattr(cfg, key, _DEFAULTS[key])


def _partition(cfg: Any, labels: np.ndarray, total: int, seed: int
               ) -> dict[str, np.ndarray]:
  kind = _get(cfg, 'partition')
  if kind == 'iid':
    return partitions.iid(len(labels), total, seed)
  if kind == 'dirichlet':
    return partitions.dirichlet(labels, total, _get(cfg, 'dirichlet_alpha'),
                                seed)
  if kind == 'shards':
    return partitions.shards(labels, total, _get(cfg, 'shards_per_client'),
                             seed)
  if kind == 'natural':
    raise ValueError(f'data.partition={kind!r} needs a source with its own '
                     f'clients (data.source=\'synthetic\'), not '
                     f'data.source={_get(cfg, "source")!r}.')
  raise ValueError(f'Unknown data.partition={kind!r}; expected one of '
                   f'{PARTITIONS}.')


def _split_heldout(data: FederatedData, num_heldout: int
                   ) -> tuple[FederatedData, FederatedData | None]:
  ids = data.client_ids
  if num_heldout == 0:
    return data, None
  return data.subset(ids[:-num_heldout]), data.subset(ids[-num_heldout:])


def _keep_classes(arrays, classes):
  """Rows whose label is in `classes`, relabelled to their index there."""
  if arrays is None:
    return None
  lut = np.full(int(max(classes)) + 1 if classes else 0, -1, np.int64)
  lut[list(classes)] = np.arange(len(classes))
  y = np.asarray(arrays['y'])
  keep = (y < len(lut)) & (lut[np.minimum(y, len(lut) - 1)] >= 0)
  out = {k: np.asarray(v)[keep] for k, v in arrays.items()}
  out['y'] = lut[y[keep]].astype(y.dtype)
  return out


def _union(parts: list[FederatedData | None]) -> FederatedData | None:
  parts_ = [(k, p) for k, p in enumerate(parts) if p is not None]
  if not parts_:
    return None
  ids = [f't{k}/{cid}' for k, p in parts_ for cid in p.client_ids]
  clients = {f't{k}/{cid}': p.client(cid) for k, p in parts_
             for cid in p.client_ids}
  return FederatedData(clients, order=ids)


def load_tasks(cfg: Any) -> DataBundle:
  """One bundle per `cfg.tasks` entry (each the parent config with that
  entry's keys overridden), and their union as the training clients."""
  base = dict(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg)
  base['tasks'] = []
  bundles = []
  for k, entry in enumerate(cfg.tasks):
    entry = dict(entry.to_dict() if hasattr(entry, 'to_dict') else entry)
    unknown = set(entry) - set(_DEFAULTS)
    if unknown or 'tasks' in entry:
      raise ValueError(f'data.tasks[{k}] has unknown keys '
                       f'{sorted(unknown | ({"tasks"} & set(entry)))}.')
    bundles.append(load(ml_collections.ConfigDict({**base, **entry})))
  shapes = {b.input_shape for b in bundles}
  if len(shapes) > 1:
    raise ValueError(f'data.tasks have different input shapes {shapes}; '
                     'one model serves every task.')
  client_task = np.concatenate([np.full(b.train.num_clients, k, np.int32)
                                for k, b in enumerate(bundles)])
  return DataBundle(_union([b.train for b in bundles]),
                    _union([b.heldout for b in bundles]), None,
                    max(b.num_classes for b in bundles),
                    bundles[0].input_shape, tuple(bundles), client_task)


def _load_text(cfg: Any, source: str, classes, num_clients: int,
               num_heldout: int, seed: int, test_fraction: float
               ) -> DataBundle:
  """Next-token text; `num_classes` is the vocabulary size."""
  if classes:
    raise ValueError(f'data.classes is not supported for '
                     f'data.source={source!r}.')
  seq_len = int(_get(cfg, 'seq_len'))
  max_sequences = int(_get(cfg, 'max_sequences'))
  if source == 'stdlib':
    from fedjax_eff.data import stdlib_corpus  # Deferred: sentencepiece.
    corpus = stdlib_corpus.load_stdlib(
        seq_len=seq_len, vocab_size=int(_get(cfg, 'vocab_size')),
        max_sequences=max_sequences, max_modules=int(_get(cfg, 'max_modules')),
        heldout_fraction=test_fraction, cache_dir=_get(cfg, 'cache_dir'))
    return DataBundle(corpus.train, corpus.heldout,
                      corpus.heldout.concatenated(),
                      corpus.tokenizer.vocab_size, (seq_len,))
  if source == 'stackoverflow':
    from fedjax_eff.data import stackoverflow
    data_dir = _get(cfg, 'data_dir')
    if not data_dir:
      raise ValueError("data.data_dir must be the directory of TFF's Stack "
                       "Overflow files when data.source='stackoverflow'.")
    corpus = stackoverflow.load_stackoverflow(
        data_dir, seq_len=seq_len, vocab_size=int(_get(cfg, 'vocab_size')),
        max_sequences=max_sequences, max_clients=num_clients,
        max_eval_clients=num_heldout or num_clients,
        cache_dir=_get(cfg, 'cache_dir'))
    return DataBundle(corpus.train, corpus.heldout if num_heldout else None,
                      corpus.test.concatenated(),
                      int(_get(cfg, 'vocab_size')) + stackoverflow.NUM_SPECIAL,
                      (seq_len,))
  from fedjax_eff.data import markov_corpus
  corpus = markov_corpus.markov_corpus(
      num_clients + num_heldout, seed=seed,
      num_states=int(_get(cfg, 'markov_states')), seq_len=seq_len,
      concentration=float(_get(cfg, 'markov_concentration')),
      heterogeneity=float(_get(cfg, 'markov_heterogeneity')),
      max_sequences=max_sequences)
  train, heldout = _split_heldout(corpus.data, num_heldout)
  test = None
  if test_fraction > 0:
    train, test = sources.split_clients(train, test_fraction)
    test = test.concatenated()
  return DataBundle(train, heldout, test, corpus.vocab_size, (seq_len,))


def _load_speech(cfg: Any, source: str, num_clients: int, num_heldout: int,
                 seed: int) -> DataBundle:
  """Character-CTC speech; `num_classes` is the 29-symbol vocabulary."""
  from fedjax_eff.data import speech  # Deferred: scipy, tqdm.
  n_mels, max_frames = int(_get(cfg, 'n_mels')), int(_get(cfg, 'max_frames'))
  max_utt = int(_get(cfg, 'max_sequences'))
  cache_dir = _get(cfg, 'cache_dir')
  if source == 'speech':
    corpus = speech.build_espeak_corpus(cache_dir=cache_dir, seed=seed,
                                        n_mels=n_mels, num_heldout=num_heldout)
    train = corpus.train.subset(corpus.train.client_ids[:num_clients])
    heldout = corpus.heldout
    test = None
  else:
    kw = dict(data_dir=_get(cfg, 'data_dir'), max_utterances=max_utt,
              n_mels=n_mels, max_frames=max_frames, cache_dir=cache_dir)
    train = speech.load_librispeech('train_clean100', max_clients=num_clients,
                                    **kw)
    heldout = (speech.load_librispeech('dev_clean', max_clients=num_heldout,
                                       **kw) if num_heldout else None)
    test = speech.load_librispeech('test_clean', **kw)
  parts = [p for p in (train, heldout, test) if p is not None]
  parts = [speech.limit(p, max_utt, max_frames) for p in parts]
  frames = max(p.client(0)['x'].shape[1] for p in parts)
  labels = max(p.client(0)['y'].shape[1] for p in parts)
  parts = [speech.repad(p, frames, labels) for p in parts]
  train, heldout = parts[0], parts[1] if heldout is not None else None
  test = parts[-1] if test is not None else heldout
  return DataBundle(train, heldout,
                    test.concatenated() if test is not None else None,
                    speech.VOCAB_SIZE, (frames, n_mels))


def _load_npz(path: str | None, num_clients: int, num_heldout: int
              ) -> DataBundle:
  """The `npz` source: held-out clients last in sorted id order."""
  clients, ids, test = sources.load_npz(path)
  if num_heldout >= len(ids):
    raise ValueError(f'data.heldout_clients={num_heldout} leaves no training '
                     f'clients among the {len(ids)} in data.data_dir={path}.')
  train_ids = ids[:len(ids) - num_heldout][:num_clients]
  heldout_ids = ids[len(ids) - num_heldout:] if num_heldout else []
  train = FederatedData({c: clients[c] for c in train_ids}, order=train_ids)
  heldout = (FederatedData({c: clients[c] for c in heldout_ids},
                           order=heldout_ids) if heldout_ids else None)
  labels = [clients[c]['y'] for c in train_ids + heldout_ids]
  if test is not None:
    labels.append(test['y'])
  top = max((int(y.max()) for y in labels if y.size), default=-1)
  low = min((int(y.min()) for y in labels if y.size), default=0)
  if top < 0 or low < 0:
    raise ValueError(f'data.data_dir={path}: labels y must be integers >= 0 '
                     f'(found {low}..{top}).')
  return DataBundle(train, heldout, test, top + 1,
                    tuple(clients[ids[0]]['x'].shape[1:]))


def load(cfg: Any) -> DataBundle:
  """Builds the `DataBundle` that `cfg` (see `default_config`) describes;
  with `pretrain_fraction` > 0, `train` keeps only the `part` named
  (`reserve_for_pretraining`)."""
  bundle = _load(cfg)
  poisoned = int(_get(cfg, 'nan_clients'))
  if poisoned:
    bundle = bundle._replace(train=with_nan_examples(bundle.train, poisoned))
  fraction = float(_get(cfg, 'pretrain_fraction'))
  part = _get(cfg, 'part')
  if part not in PARTS:
    raise ValueError(f'data.part={part!r} is not one of {PARTS}.')
  if fraction == 0.0:
    if part != 'federated':
      raise ValueError("data.part='pretrain' needs data.pretrain_fraction "
                       "> 0 (the reserved clients).")
    return bundle
  return bundle._replace(
      train=reserve_for_pretraining(bundle.train, fraction, part))


PARTS = ('federated', 'pretrain')


def with_nan_examples(train: FederatedData, num_clients: int
                      ) -> FederatedData:
  """`train` with NaN in every float feature of the first example of each
  of its first `num_clients` clients (`data.nan_clients`)."""
  if not 0 <= num_clients <= train.num_clients:
    raise ValueError(f'data.nan_clients={num_clients} must be in [0, '
                     f'{train.num_clients}].')
  clients = {}
  for i, cid in enumerate(train.client_ids):
    data = train.client(i)
    if i < num_clients:
      data = {f: a.copy() for f, a in data.items()}
      for a in data.values():
        if np.issubdtype(a.dtype, np.floating) and len(a):
          a[0] = np.nan
    clients[cid] = data
  return FederatedData(clients, order=train.client_ids)


def reserve_for_pretraining(train: FederatedData, fraction: float,
                            part: str) -> FederatedData:
  """The federated or the pretraining side of the training clients.

  A client is reserved for central pretraining iff a SHA-256 of its id
  falls below `fraction`: stable across runs, machines and corpus sizes,
  so the two sides never share a client and a pretrain run and its
  federated fine-tuning agree on the split without coordination.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f'data.pretrain_fraction={fraction} must be in [0, 1).')
  import hashlib  # pylint: disable=g-import-not-at-top

  def reserved(cid: str) -> bool:
    h = hashlib.sha256(b'pretrain:' + cid.encode()).digest()[:8]
    return int.from_bytes(h, 'big') < fraction * 2.0**64
  ids = [c for c in train.client_ids if reserved(c) == (part == 'pretrain')]
  if not ids:
    raise ValueError(f'data.pretrain_fraction={fraction} leaves no '
                     f'{part} clients among {train.num_clients}.')
  return train.subset(ids)


def _load(cfg: Any) -> DataBundle:
  """`load` before the pretraining reserve.

  * digits: a stratified central test split of `test_fraction`; the rest is
    partitioned over `num_clients + heldout_clients` clients.
  * fashion_mnist: the 60,000 training images of the IDX files in
    `data_dir` (default: Debian's dataset-fashion-mnist path) are
    partitioned likewise; the official 10,000 test images are the central
    test set (`test_fraction` does not apply).
  * stdlib_docs: docstring paragraphs of ten stdlib packages, labelled by
    package (`stdlib_docs`), tokenized by the vocab.txt in `data_dir`
    (default: the installed all-MiniLM-L6-v2) to `seq_len` ids;
    `test_fraction` of them (by a hash of the text) are the central test
    set, the rest is partitioned likewise.
  * tfds: the 'train' split is partitioned likewise; the 'test' split is
    the central test set.
  * synthetic: `num_clients + heldout_clients` synthetic(alpha, beta)
    clients (`partition='natural'`) or Synthetic-IID clients
    (`partition='iid'`). Each training client keeps `test_fraction` of its
    examples out of training, and `test` is their concatenation (an
    in-distribution test set for the training clients; None when
    `test_fraction=0`). Held-out clients keep all their examples.

  * stdlib: the Python standard library's modules as next-token clients
    (`stdlib_corpus.load_stdlib`); `test_fraction` of the modules (by a
    hash of the name) are the held-out clients, and `test` pools them.
    `num_clients`/`heldout_clients` do not apply (the modules are the
    clients).
  * markov: per-client Markov-chain text (`markov_corpus`), split like
    synthetic; its exact loss floor comes from `markov_corpus` directly.
  * stackoverflow: TFF's Stack Overflow files in `data_dir`
    (`stackoverflow.load_stackoverflow`): the first `num_clients` training
    users (sorted ids), the first `heldout_clients` users of TFF's heldout
    split as held-out clients (None if 0), and `test` pools the first
    `heldout_clients` (or, if 0, `num_clients`) users of TFF's test split.
    `vocab_size` counts words; `num_classes` adds the 4 special ids.
  * speech: the espeak-ng set (`speech.build_espeak_corpus`, one client per
    synthetic speaker): `heldout_clients` speakers by a stable hash are
    held out (and pooled as `test`), training takes at most `num_clients`
    of the rest.
  * npz: your own arrays in `data_dir` (`sources.load_npz`: a directory
    of `<client id>.npz` files, or one `.npz` with a `client_id` array).
    The last `heldout_clients` ids in sorted order (numerically when every
    id is an integer) are the held-out clients; the first `num_clients` of
    the rest train (fewer if there are fewer). `test` is `test.npz` in the
    directory or the file's `x_test`/`y_test` arrays (None without).
    `num_classes` is the largest label of any split + 1, `input_shape`
    x's shape after the first axis. `partition`, `test_fraction` and
    `seed` do not apply.
  * librispeech: TFDS LibriSpeech, one client per speaker: the first
    `num_clients` speakers of train_clean100, the first `heldout_clients`
    of dev_clean as held-out clients, all of test_clean as `test`.

  The held-out clients are the last `heldout_clients` of the partition.
  Synthetic clients are generated independently of each other, so there the
  training clients do not change with `heldout_clients`; partitions of a
  central set do change (they have more parts).
  """
  if _get(cfg, 'tasks'):
    return load_tasks(cfg)
  source = _get(cfg, 'source')
  classes = [int(c) for c in _get(cfg, 'classes')]
  num_clients = int(_get(cfg, 'num_clients'))
  num_heldout = int(_get(cfg, 'heldout_clients'))
  seed = int(_get(cfg, 'seed'))
  test_fraction = float(_get(cfg, 'test_fraction'))
  if num_clients < 1 or num_heldout < 0:
    raise ValueError(f'data.num_clients must be >= 1 and '
                     f'data.heldout_clients >= 0, got {num_clients}, '
                     f'{num_heldout}.')
  total = num_clients + num_heldout

  if source == 'synthetic':
    if classes:
      raise ValueError("data.classes is not supported for "
                       "data.source='synthetic' (use synthetic_classes).")
    kind = _get(cfg, 'partition')
    if kind not in ('natural', 'iid'):
      raise ValueError(
          f'data.partition={kind!r} is not supported for '
          "data.source='synthetic'; use 'natural' (its own heterogeneous "
          "clients) or 'iid' (FedProx Synthetic-IID).")
    kwargs = dict(alpha=_get(cfg, 'synthetic_alpha'),
                  beta=_get(cfg, 'synthetic_beta'), num_clients=total,
                  seed=seed, dim=int(_get(cfg, 'synthetic_dim')),
                  num_classes=int(_get(cfg, 'synthetic_classes')),
                  iid=kind == 'iid')
    everyone = sources.synthetic_leaf(**kwargs)
    train, heldout = _split_heldout(everyone, num_heldout)
    test = None
    if test_fraction > 0:
      train, test = sources.split_clients(train, test_fraction)
      test = test.concatenated()
    return DataBundle(train, heldout, test, kwargs['num_classes'],
                      tuple(train.client(0)['x'].shape[1:]))

  if source in ('speech', 'librispeech'):
    if classes:
      raise ValueError(f'data.classes is not supported for '
                       f'data.source={source!r}.')
    return _load_speech(cfg, source, num_clients, num_heldout, seed)

  if source == 'npz':
    if classes:
      raise ValueError("data.classes is not supported for data.source='npz' "
                       '(write the classes you want into the files).')
    return _load_npz(_get(cfg, 'data_dir'), num_clients, num_heldout)

  if source in ('stdlib', 'markov', 'stackoverflow'):
    return _load_text(cfg, source, classes, num_clients, num_heldout, seed,
                      test_fraction)

  if source == 'digits':
    central, test = sources.load_digits(test_fraction, seed)
    if not len(test['y']):
      test = None
    num_classes = 10
  elif source == 'fashion_mnist':
    central, test = sources.load_fashion_mnist(_get(cfg, 'data_dir'))
    num_classes = 10
  elif source == 'stdlib_docs':
    from fedjax_eff.data import stdlib_docs, wordpiece
    from fedjax_eff.models import hf
    tokenizer = wordpiece.WordPieceTokenizer.from_dir(
        _get(cfg, 'data_dir') or hf.minilm_dir())
    central, test = stdlib_docs.load_stdlib_docs(
        tokenizer, int(_get(cfg, 'seq_len')), test_fraction)
    num_classes = len(stdlib_docs.TOPICS)
  elif source == 'tfds':
    name = _get(cfg, 'name')
    if not name:
      raise ValueError("data.name must name a TFDS dataset (e.g. 'mnist') "
                       "when data.source='tfds'.")
    data_dir, cache_dir = _get(cfg, 'data_dir'), _get(cfg, 'cache_dir')
    central = sources.load_tfds(name, 'train', data_dir, cache_dir)
    test = sources.load_tfds(name, 'test', data_dir, cache_dir)
    num_classes = sources.tfds_num_classes(name, data_dir=data_dir)
  else:
    raise ValueError(f'Unknown data.source={source!r}; expected one of '
                     f'{SOURCES}.')
  if classes:
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or len(set(classes)) != len(classes):
      raise ValueError(f'data.classes={classes} must be distinct labels in '
                       f'[0, {num_classes}).')
    central, test = _keep_classes(central, classes), _keep_classes(test,
                                                                   classes)
    num_classes = len(classes)
  parts = _partition(cfg, central['y'], total, seed)
  train, heldout = _split_heldout(
      FederatedData.from_partition(central, parts), num_heldout)
  return DataBundle(train, heldout, test, num_classes,
                    tuple(central['x'].shape[1:]))
