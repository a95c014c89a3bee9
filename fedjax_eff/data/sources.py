"""Where examples come from: offline real data, TFDS, and synthetic clients.

Central sources return `{'x': float32 [N, ...], 'y': int32 [N]}`, to be cut
into clients by `partitions`; federated sources return `FederatedData`.

* `load_digits`: scikit-learn's 1,797 real 8x8 handwritten digits, bundled
  with the package, so experiments and tests run with no network.
* `load_fashion_mnist`: Fashion-MNIST's 60,000 + 10,000 real 28x28 images
  from IDX files (`read_idx`), by default where Debian's
  `dataset-fashion-mnist` package puts them, so no network is needed.
* `load_tfds`: TFDS image classification sets (MNIST, EMNIST, CIFAR-10/100)
  through `tfds.data_source`, the random-access ArrayRecord path that needs
  no TensorFlow. Converted arrays are cached as `.npz`, since decoding
  hundreds of thousands of PNGs one by one takes minutes.
* `synthetic_leaf`: the synthetic(alpha, beta) clients of FedProx / LEAF,
  whose heterogeneity is set by two numbers and whose labels are a
  deterministic function of the features, so the best reachable accuracy is
  known to be 100% for each client's own model.
* `load_npz`: your own arrays, a directory of `<client id>.npz` files or
  one `.npz` with a `client_id` array (`data.source='npz'`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys

import numpy as np

from fedjax_eff.data import partitions
from fedjax_eff.data.federated import FederatedData

Arrays = dict[str, np.ndarray]

DEFAULT_CACHE_DIR = os.path.join('~', '.cache', 'fedjax_eff', 'tfds')
# Below this many examples a progress bar is noise.
_PROGRESS_MIN = 10_000
_READ_CHUNK = 1024


class DatasetNotPreparedError(FileNotFoundError):
  """A dataset (TFDS, Fashion-MNIST) is not on disk and may not be
  downloaded here."""


# ----------------------------------------------------------------- digits --

def load_digits(test_fraction: float = 0.2, seed: int = 0
                ) -> tuple[Arrays, Arrays]:
  """scikit-learn's handwritten digits as (train, test) arrays.

  `x` is float32 [N, 8, 8, 1] in [0, 1] (pixel counts 0..16 divided by 16),
  `y` int32 [N] in 0..9. The split is stratified by label and a pure
  function of `seed`; `test_fraction=0` gives an empty test set.
  """
  from sklearn import datasets  # Deferred: sklearn import is slow.
  if not 0 <= test_fraction < 1:
    raise ValueError(f'test_fraction must be in [0, 1), got {test_fraction}.')
  bunch = datasets.load_digits()
  x = (bunch.images / 16.0).astype(np.float32)[..., None]
  y = bunch.target.astype(np.int32)
  rng = np.random.default_rng([seed, 0xD161])
  test = []
  for c in np.unique(y):
    rows = rng.permutation(np.flatnonzero(y == c))
    test.append(rows[:int(round(test_fraction * len(rows)))])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(y)), test)
  return {'x': x[train], 'y': y[train]}, {'x': x[test], 'y': y[test]}


# ------------------------------------------------------------ IDX files --

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4',
               0x0D: '>f4', 0x0E: '>f8'}


def read_idx(path: str, ndim: int | None = None) -> np.ndarray:
  """One IDX file (LeCun's MNIST format), gzipped or plain, as an array.

  Format: two zero bytes, a type code (0x08 unsigned byte, 0x09 signed
  byte, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of
  dimensions d, then d big-endian uint32 sizes, then the values in C order,
  big-endian. MNIST-style files are `...-idx3-ubyte` (images
  [n, rows, cols] uint8) and `...-idx1-ubyte` (labels [n] uint8).

  Gzip is recognised by its magic bytes, not the file name. Raises
  ValueError if the header is not IDX, `ndim` is given and differs, or the
  data is shorter or longer than the sizes say. Returns the array in native
  byte order.
  """
  with open(path, 'rb') as f:
    raw = f.read()
  if raw[:2] == b'\x1f\x8b':
    raw = gzip.decompress(raw)
  if len(raw) < 4 or raw[:2] != b'\0\0' or raw[2] not in _IDX_DTYPES:
    raise ValueError(f'{path} is not an IDX file (magic {raw[:4].hex()}).')
  dtype, dims = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
  if ndim is not None and dims != ndim:
    raise ValueError(f'{path} has {dims} dimensions, expected {ndim}.')
  header = 4 + 4 * dims
  if len(raw) < header:
    raise ValueError(f'{path}: IDX header cut short ({len(raw)} bytes).')
  shape = tuple(int(d) for d in np.frombuffer(raw, '>u4', dims, 4))
  expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(raw) != expected:
    raise ValueError(f'{path}: shape {shape} needs {expected} bytes, the '
                     f'file holds {len(raw)}.')
  data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
  return data.astype(dtype.newbyteorder('='))


# ---------------------------------------------------------- fashion-mnist --

# Where Debian's dataset-fashion-mnist package installs the four files.
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
_FASHION_FILES = {'train': ('train-images-idx3-ubyte',
                            'train-labels-idx1-ubyte'),
                  'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}


def _idx_path(data_dir: str, stem: str) -> str | None:
  for name in (stem, stem + '.gz'):
    path = os.path.join(data_dir, name)
    if os.path.isfile(path):
      return path
  return None


def load_fashion_mnist(data_dir: str | None = None) -> tuple[Arrays, Arrays]:
  """Fashion-MNIST (Xiao et al. 2017) as (train, test) arrays.

  Reads the four IDX files named in `_FASHION_FILES` (`train-images-idx3-
  ubyte` and so on, each plain or with `.gz`) from `data_dir`, by default `FASHION_MNIST_DIR`, where
  `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) puts them. `x` is
  float32 [N, 28, 28, 1] in [0, 1] (bytes / 255), `y` int32 [N] in 0..9;
  the official split is 60,000 train and 10,000 test images. Raises
  `DatasetNotPreparedError` if a file is missing.
  """
  data_dir = os.path.expanduser(data_dir or FASHION_MNIST_DIR)
  out = []
  for split, stems in _FASHION_FILES.items():
    paths = [_idx_path(data_dir, s) for s in stems]
    if None in paths:
      missing = stems[paths.index(None)]
      raise DatasetNotPreparedError(
          f'Fashion-MNIST file {missing}[.gz] is not in {data_dir}: run '
          f'`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, as root) '
          f'or pass --config.data.data_dir=DIR holding the four IDX files.')
    images, labels = read_idx(paths[0], ndim=3), read_idx(paths[1], ndim=1)
    if len(images) != len(labels):
      raise ValueError(f'Fashion-MNIST {split}: {len(images)} images but '
                       f'{len(labels)} labels in {data_dir}.')
    if labels.size and labels.max() > 9:
      raise ValueError(f'Fashion-MNIST {split}: label {labels.max()} > 9 '
                       f'in {paths[1]}.')
    out.append({'x': (images.astype(np.float32) / np.float32(255.0))[..., None],
                'y': labels.astype(np.int32)})
  return out[0], out[1]


# ------------------------------------------------------------------- tfds --

def _tfds():
  import tensorflow_datasets as tfds  # Deferred: optional and slow import.
  return tfds


def _not_prepared(tfds, name: str, data_dir: str | None) -> str | None:
  """Why `name` cannot be read from `data_dir`, or None if it looks fine."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception:  # pylint: disable=broad-except
    return None
  if builder.is_prepared():
    return None
  root = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  return (f'TFDS dataset {name!r} is not prepared in data_dir={root!r} '
          f'(looked in {builder.data_dir}), and this loader never downloads. '
          f'On a machine with network (and TensorFlow, which building may '
          f'need) run\n'
          f'  tfds build {name} --data_dir=DIR --file_format=array_record\n'
          f'then copy DIR here and pass it as data_dir '
          f'(--config.data.data_dir=DIR).')


def _open_source(name: str, split: str, data_dir: str | None):
  tfds = _tfds()
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False)
  except tfds.core.DatasetNotFoundError:
    raise  # Unknown name: TFDS's own message lists the known ones.
  except Exception as e:  # pylint: disable=broad-except
    # Without a prepared copy TFDS assumes the TFRECORD format and fails with
    # a NotImplementedError about random access, which hides the real cause.
    reason = _not_prepared(tfds, name, data_dir)
    if reason:
      raise DatasetNotPreparedError(reason) from e
    if isinstance(e, NotImplementedError):
      raise ValueError(
          f'TFDS dataset {name!r} in data_dir={data_dir!r} is prepared in a '
          'format without random access (TFRECORD); rebuild it with '
          f'`tfds build {name} --file_format=array_record`.') from e
    raise


def _read_examples(source, keys: tuple[str, ...], desc: str) -> Arrays:
  """Reads `keys` of every example into stacked numpy arrays."""
  from tqdm.auto import tqdm
  n = len(source)
  if n == 0:
    raise ValueError(f'TFDS {desc} has no examples.')
  out = {}
  batched = True
  with tqdm(total=n, desc=desc, unit='ex', disable=n < _PROGRESS_MIN or not sys.stderr.isatty(),
            leave=False) as bar:
    start = 0
    while start < n:
      stop = min(start + _READ_CHUNK, n)
      examples = None
      if batched:
        try:
          examples = source.__getitems__(list(range(start, stop)))
        except (TypeError, NotImplementedError, AttributeError):
          # TFDS's mock data cannot batch; read one example at a time.
          batched = False
      if examples is None:
        examples = [source[i] for i in range(start, stop)]
      for k in keys:
        if k not in out:
          first = np.asarray(examples[0][k])
          out[k] = np.empty((n,) + first.shape, first.dtype)
        out[k][start:stop] = np.stack([np.asarray(e[k]) for e in examples])
      bar.update(stop - start)
      start = stop
  return out


def _cache_path(cache_dir: str, source, name: str, split: str,
                image_key: str, label_key: str, transpose: bool) -> str:
  info = source.dataset_info
  # The underlying reader's type tells TFDS mock data from real data, which
  # otherwise share name, version and (under mock) even length.
  fingerprint = '|'.join(str(v) for v in (
      info.full_name, split, info.data_dir, len(source),
      type(source.data_source).__module__, image_key, label_key, transpose))
  digest = hashlib.sha1(fingerprint.encode()).hexdigest()[:12]
  stem = f'{name}-{split}'.replace('/', '_').replace(':', '_')
  stem = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in stem)
  return os.path.join(os.path.expanduser(cache_dir), f'{stem}-{digest}.npz')


def load_tfds(name: str, split: str, data_dir: str | None = None,
              cache_dir: str | None = None, *, label_key: str = 'label',
              image_key: str = 'image', transpose: bool | None = None
              ) -> Arrays:
  """One split of a TFDS image classification set as float arrays.

  Reads with `tfds.data_source(..., download=False)` (no TensorFlow needed)
  and returns `x` float32 [N, H, W, C] in [0, 1] and `y` int32 [N] (from
  `label_key`; e.g. `'coarse_label'` for CIFAR-100's 20 superclasses).
  Tested names: 'mnist', 'emnist/<config>' (byclass, digits, ...),
  'cifar10', 'cifar100'.

  EMNIST images in TFDS are stored as in the original EMNIST files,
  transposed (the builder's description: "inverted horizontally and rotated
  90 anti-clockwise"); `transpose=None` transposes H and W for 'emnist/...'
  names only, so digits look upright like MNIST. Pass True/False to force.

  The converted uint8 images and labels are cached in `cache_dir` (default
  `~/.cache/fedjax_eff/tfds`) keyed by dataset, version, split and options,
  so the second load skips decoding. Raises `DatasetNotPreparedError` with
  preparation instructions if the dataset is not in `data_dir`.
  """
  if transpose is None:
    transpose = name.startswith('emnist')
  source = _open_source(name, split, data_dir)
  path = _cache_path(cache_dir or DEFAULT_CACHE_DIR, source, name, split,
                     image_key, label_key, transpose)
  if os.path.exists(path):
    with np.load(path) as cached:
      images, labels = cached['image'], cached['label']
  else:
    arrays = _read_examples(source, (image_key, label_key),
                            desc=f'{name}:{split}')
    images, labels = arrays[image_key], arrays[label_key].astype(np.int32)
    if images.ndim == 3:
      images = images[..., None]
    if transpose:
      images = np.ascontiguousarray(np.swapaxes(images, 1, 2))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp.npz'
    np.savez(tmp, image=images, label=labels)
    os.replace(tmp, path)  # Atomic: readers never see half a file.
  scale = 255.0 if images.dtype == np.uint8 else 1.0
  return {'x': images.astype(np.float32) / np.float32(scale),
          'y': labels.astype(np.int32)}


def tfds_num_classes(name: str, label_key: str = 'label',
                     data_dir: str | None = None) -> int:
  """Number of classes of `label_key`, from the TFDS builder's metadata."""
  builder = _tfds().builder(name, data_dir=data_dir)
  return int(builder.info.features[label_key].num_classes)


# -------------------------------------------------------------- synthetic --

def _synthetic_client(rng: np.random.Generator, num: int, alpha: float,
                      beta: float, dim: int, num_classes: int,
                      shared: tuple[np.ndarray, np.ndarray] | None
                      ) -> tuple[np.ndarray, np.ndarray]:
  if shared is None:
    u = rng.normal(0.0, alpha)
    w = rng.normal(u, 1.0, (dim, num_classes))
    b = rng.normal(u, 1.0, num_classes)
    mean_x = rng.normal(rng.normal(0.0, beta), 1.0, dim)
  else:
    w, b = shared
    mean_x = np.zeros(dim)
  std_x = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # Var = j^-1.2.
  x = mean_x + rng.standard_normal((num, dim)) * std_x
  # argmax of softmax(xW + b) is the argmax of the logits.
  y = np.argmax(x @ w + b, axis=1)
  return x.astype(np.float32), y.astype(np.int32)


def _synthetic_clients(alpha, beta, num_clients, seed, dim, num_classes,
                       iid, max_examples):
  if num_clients < 1:
    raise ValueError(f'num_clients must be >= 1, got {num_clients}.')
  if alpha < 0 or beta < 0:
    raise ValueError(f'alpha and beta must be >= 0, got {alpha}, {beta}.')
  shared = None
  if iid:
    g = np.random.default_rng([seed, 0x5F7, 0])
    shared = (g.normal(0.0, 1.0, (dim, num_classes)),
              g.normal(0.0, 1.0, num_classes))
  out = {}
  for k, cid in enumerate(partitions.client_ids(num_clients)):
    # One stream per client: client k's data does not depend on how many
    # clients are generated, so adding held-out clients changes nothing else.
    rng = np.random.default_rng([seed, 0x5F7, 1, k])
    num = int(rng.lognormal(4.0, 2.0)) + 50
    if max_examples is not None:
      num = min(num, max_examples)
    out[cid] = _synthetic_client(rng, num, alpha, beta, dim, num_classes,
                                 shared)
  return out


def synthetic_leaf(alpha: float, beta: float, num_clients: int, seed: int,
                   dim: int = 60, num_classes: int = 10, iid: bool = False,
                   max_examples: int | None = 1000) -> FederatedData:
  """Synthetic(alpha, beta) federated data of FedProx (Li et al. 2020).

  From "Federated Optimization in Heterogeneous Networks" (after Shamir et
  al. 2014), as in the FedProx/LEAF generator: for client k,
  u_k ~ N(0, alpha), W_k ~ N(u_k, 1) [dim x classes], b_k ~ N(u_k, 1);
  B_k ~ N(0, beta), v_k ~ N(B_k, 1) [dim]; x ~ N(v_k, Sigma) with
  Sigma = diag(j^-1.2); y = argmax(softmax(W_k^T x + b_k)). alpha sets how
  much the clients' models differ, beta how much their inputs differ. As in
  the reference code, alpha and beta are standard deviations. `iid=True` is
  FedProx's Synthetic-IID: one shared W, b ~ N(0, 1) and v_k = 0.

  Client sizes are int(LogNormal(4, 2)) + 50 (median ~105, heavy tail) as in
  the reference code, capped at `max_examples` (None: no cap), because the
  uncapped tail reaches tens of thousands and would dominate memory and
  cohort padding.

  Returns `FederatedData` with `x` float32 [n, dim] and `y` int32 [n].
  """
  clients = _synthetic_clients(alpha, beta, num_clients, seed, dim,
                               num_classes, iid, max_examples)
  return FederatedData({c: {'x': x, 'y': y} for c, (x, y) in clients.items()},
                       order=list(clients))


def split_clients(data: FederatedData, test_fraction: float
                  ) -> tuple[FederatedData, FederatedData]:
  """Splits every client's examples into (train, test), same client ids.

  The first `test_fraction` of each client's rows become its test rows
  (the caller shuffles first if rows are ordered); each client keeps at
  least one example on each side, so every client needs two or more.
  """
  if not 0 < test_fraction < 1:
    raise ValueError(f'test_fraction must be in (0, 1), got {test_fraction}.')
  train, test = {}, {}
  for cid, n in zip(data.client_ids, data.client_sizes):
    if n < 2:
      raise ValueError(f'Client {cid!r} has {n} example(s); a train/test '
                       'split needs at least 2.')
    n_test = min(max(1, int(round(test_fraction * n))), int(n) - 1)
    client = data.client(cid)
    train[cid] = {f: a[n_test:] for f, a in client.items()}
    test[cid] = {f: a[:n_test] for f, a in client.items()}
  order = data.client_ids
  return FederatedData(train, order=order), FederatedData(test, order=order)


def synthetic_leaf_split(alpha: float, beta: float, num_clients: int,
                         seed: int, test_fraction: float = 0.2, dim: int = 60,
                         num_classes: int = 10, iid: bool = False,
                         max_examples: int | None = 1000
                         ) -> tuple[FederatedData, FederatedData]:
  """`synthetic_leaf` with each client's examples split into (train, test).

  Examples are i.i.d. within a client, so the split needs no shuffle.
  FedProx uses a 90/10 per-client split (`test_fraction=0.1`).
  """
  return split_clients(
      synthetic_leaf(alpha, beta, num_clients, seed, dim, num_classes, iid,
                     max_examples), test_fraction)


# -------------------------------------------------------------------- npz --

NPZ_TEST_FILE = 'test.npz'
_KEY = 'data.data_dir'


def _npz_arrays(path: str) -> Arrays:
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{_KEY}: cannot read {path} as .npz ({type(e).__name__}'
                     f': {str(e).splitlines()[0] if str(e) else ""}).'
                     ) from e


def _npz_client(arrays: Arrays, where: str) -> Arrays:
  """`arrays` checked (x and y present, equal length, integer y) with
  float64 -> float32 and int64 -> int32 (JAX's default precision)."""
  for need in ('x', 'y'):
    if need not in arrays:
      raise ValueError(f'{_KEY}: {where} has no {need!r} array (it has '
                       f'{sorted(arrays)}); every client needs x and y.')
  lengths = {k: len(a) if np.ndim(a) else None for k, a in arrays.items()}
  if len(set(lengths.values())) > 1 or None in lengths.values():
    raise ValueError(f'{_KEY}: {where} has arrays of unequal length '
                     f'{lengths}; x, y and every other feature need one row '
                     'per example.')
  if not np.issubdtype(arrays['y'].dtype, np.integer):
    raise ValueError(f'{_KEY}: {where} has y of dtype {arrays["y"].dtype}; '
                     'labels must be integers 0..num_classes-1.')
  out = {}
  for k, a in arrays.items():
    if a.dtype == np.float64:
      a = a.astype(np.float32)
    elif a.dtype == np.int64 or a.dtype == np.uint64:
      a = a.astype(np.int32)
    out[k] = a
  return out


def _npz_sorted(ids) -> list[str]:
  """Client ids in order: numerically when every id is an integer."""
  ids = [str(c) for c in ids]
  if all(c.lstrip('-').isdigit() for c in ids):
    return sorted(ids, key=int)
  return sorted(ids)


def load_npz(path: str) -> tuple[dict[str, Arrays], list[str], Arrays | None]:
  """A user's federated arrays: `(clients, sorted ids, test or None)`.

  Two layouts, told apart by whether `path` is a directory or a file:

  * a directory with one `<client id>.npz` per client (the file stem is the
    id), each holding `x`, `y` and any other per-example features of equal
    length; `test.npz` in it, if present, is the central test set (same
    features);
  * one `.npz` with a `client_id` array (ints or strings, one per row) and
    `x`, `y`, ... of the same length; `x_test`, `y_test` (and `<f>_test`
    for each other feature `f`), if present, are the central test set.

  Ids are sorted numerically when every id is an integer, else as
  strings. `y` must be integers; float64 arrays become float32 and int64
  become int32. Example (100 clients of 20 examples, 8 features, 3 classes):

    import os, numpy as np
    rng = np.random.default_rng(0)
    os.makedirs('mydata', exist_ok=True)
    for c in range(100):
      np.savez(f'mydata/{c}.npz', x=rng.normal(size=(20, 8)).astype('f4'),
               y=rng.integers(0, 3, 20))
    np.savez('mydata/test.npz', x=rng.normal(size=(200, 8)).astype('f4'),
             y=rng.integers(0, 3, 200))

  Raises ValueError naming `data.data_dir` for a missing path, a missing
  `x`/`y`/`client_id`, arrays of unequal length or a `client_id` of
  another length, and clients whose features differ.
  """
  if not path:
    raise ValueError(f"{_KEY} must name a directory of per-client .npz files "
                     "or one .npz file with a client_id array when "
                     "data.source='npz'.")
  path = os.path.expanduser(path)
  test = None
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path)
                   if n.endswith('.npz') and n != NPZ_TEST_FILE)
    if not names:
      raise ValueError(f'{_KEY}={path} holds no <client id>.npz files.')
    clients = {}
    for n in names:
      f = os.path.join(path, n)
      clients[n[:-len('.npz')]] = _npz_client(_npz_arrays(f), f)
    test_path = os.path.join(path, NPZ_TEST_FILE)
    if os.path.isfile(test_path):
      test = _npz_client(_npz_arrays(test_path), test_path)
  elif os.path.isfile(path):
    arrays = _npz_arrays(path)
    if 'client_id' not in arrays:
      raise ValueError(f'{_KEY}: {path} has no client_id array (it has '
                       f'{sorted(arrays)}); one .npz needs one id per row, '
                       'or pass a directory of <client id>.npz files.')
    ids = arrays.pop('client_id')
    test = {k[:-len('_test')]: arrays.pop(k) for k in list(arrays)
            if k.endswith('_test')}
    everything = _npz_client(arrays, path)
    rows = len(everything['x'])
    if np.ndim(ids) != 1 or len(ids) != rows:
      raise ValueError(f'{_KEY}: {path} has client_id of shape '
                       f'{np.shape(ids)} but {rows} rows in x, y, ...; '
                       'client_id needs one entry per row.')
    ids = np.asarray(ids).astype(str)
    order = np.argsort(ids, kind='stable')
    uniq, starts = np.unique(ids[order], return_index=True)
    bounds = list(starts[1:]) + [len(ids)]
    clients = {str(c): {k: a[order[s:e]] for k, a in everything.items()}
               for c, s, e in zip(uniq, starts, bounds)}
    test = _npz_client(test, f'{path} (its *_test arrays)') if test else None
  else:
    raise ValueError(f'{_KEY}={path} does not exist (a directory of '
                     '<client id>.npz files, or one .npz file).')
  ids = _npz_sorted(clients)
  first = clients[ids[0]]
  spec = {k: (a.shape[1:], a.dtype) for k, a in first.items()}
  for cid in ids:
    have = {k: (a.shape[1:], a.dtype) for k, a in clients[cid].items()}
    if have != spec:
      raise ValueError(f'{_KEY}: client {cid!r} has features {have}, client '
                       f'{ids[0]!r} has {spec}; every client needs the same '
                       'features, shapes and dtypes.')
  if test is not None:
    have = {k: (a.shape[1:], a.dtype) for k, a in test.items()}
    if have != spec:
      raise ValueError(f'{_KEY}: the test set has features {have}, the '
                       f'clients have {spec}.')
  return clients, ids, test
