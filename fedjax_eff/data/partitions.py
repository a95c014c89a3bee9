"""Partitions of a central dataset into simulated clients.

Most public datasets have no client structure, so federated benchmarks cut a
central dataset into clients with a controlled kind of heterogeneity:

* `iid`: uniform random split, the homogeneous baseline (optionally with
  skewed client sizes from `lognormal_sizes`);
* `dirichlet`: label skew whose strength is one number, `alpha`
  (Hsu et al. 2019), the standard non-IID benchmark knob;
* `shards`: the pathological split of McMahan et al. 2017, where each client
  sees only a couple of labels;
* `natural`: the real client structure when the data has one (writer, user,
  source file).

Each function is a pure function of its arguments and a seed, and returns
`{client_id: sorted row indices}` in insertion order, ready for
`FederatedData.from_partition`. Every row goes to at most one client (to
exactly one, except where noted), so partitions never duplicate examples.
"""

from __future__ import annotations

import numpy as np

Partition = dict[str, np.ndarray]

_DIRICHLET_MAX_TRIES = 1000


def client_ids(num_clients: int) -> list[str]:
  """Zero-padded ids ('client_00007') that sort in client order."""
  width = max(5, len(str(max(num_clients - 1, 0))))
  return [f'client_{i:0{width}d}' for i in range(num_clients)]


def _check_clients(num_clients: int, num_examples: int):
  if num_clients < 1:
    raise ValueError(f'num_clients must be >= 1, got {num_clients}.')
  if num_clients > num_examples:
    raise ValueError(f'num_clients={num_clients} is more than the '
                     f'{num_examples} examples to split; every client needs '
                     'at least one example.')


def _as_labels(labels) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be 1-D, got shape {labels.shape}.')
  return labels


def _to_partition(groups: list[np.ndarray]) -> Partition:
  return {cid: np.sort(np.asarray(g, np.int64))
          for cid, g in zip(client_ids(len(groups)), groups)}


def lognormal_sizes(num_examples: int, num_clients: int, sigma: float,
                    seed: int, min_size: int = 1) -> np.ndarray:
  """Client sizes that sum to `num_examples`, in LogNormal(0, sigma) ratio.

  Cross-device data sets have client sizes spanning orders of magnitude;
  a lognormal with `sigma` around 1-2 mimics that (FedProx's synthetic data
  draws sizes from LogNormal(4, 2)). `sigma=0` gives equal sizes. Each client
  gets at least `min_size` examples.
  """
  _check_clients(num_clients, num_examples)
  if sigma < 0:
    raise ValueError(f'sigma must be >= 0, got {sigma}.')
  if min_size < 0 or min_size * num_clients > num_examples:
    raise ValueError(f'min_size={min_size} for {num_clients} clients needs '
                     f'more than the {num_examples} examples.')
  rng = np.random.default_rng([seed, 0x1065])
  weights = rng.lognormal(0.0, sigma, num_clients)
  spare = num_examples - min_size * num_clients
  raw = weights / weights.sum() * spare
  sizes = np.floor(raw).astype(np.int64)
  # Hand out the rounding remainder to the largest fractional parts.
  remainder = spare - int(sizes.sum())
  sizes[np.argsort(-(raw - sizes), kind='stable')[:remainder]] += 1
  return sizes + min_size


def iid(num_examples: int, num_clients: int, seed: int,
        sizes: np.ndarray | None = None) -> Partition:
  """Uniformly random split of `num_examples` rows into `num_clients` clients.

  Client sizes differ by at most one, or follow `sizes` (e.g. from
  `lognormal_sizes`) to add size skew without label skew.
  """
  _check_clients(num_clients, num_examples)
  rng = np.random.default_rng([seed, 0x11D])
  perm = rng.permutation(num_examples)
  if sizes is None:
    return _to_partition(np.array_split(perm, num_clients))
  sizes = np.asarray(sizes, np.int64)
  if sizes.shape != (num_clients,) or sizes.min() < 0:
    raise ValueError(f'sizes must be {num_clients} non-negative integers, '
                     f'got shape {sizes.shape}.')
  if sizes.sum() > num_examples:
    raise ValueError(f'sizes sum to {sizes.sum()}, more than the '
                     f'{num_examples} examples.')
  return _to_partition(np.split(perm[:sizes.sum()], np.cumsum(sizes)[:-1]))


def dirichlet(labels, num_clients: int, alpha: float, seed: int,
              min_examples: int = 1) -> Partition:
  """Label-skewed split: each class is spread over clients by Dir(alpha).

  The Dirichlet label skew of Hsu, Qi & Brown 2019 ("Measuring the effects
  of non-identical data distribution for federated visual classification"),
  in the per-class form popularised by Yurochkin et al. 2019 and Wang et al.
  2020 (FedMA) and used by NIID-Bench (Li et al. 2022): for every class c,
  draw p_c ~ Dir(alpha * 1_K) over the K clients and give client k a
  fraction p_c[k] of class c's (shuffled) rows. Small alpha (0.05) gives
  each client a few labels, large alpha (1000) approaches `iid` label
  proportions. Client sizes vary as a side effect.

  Small alpha leaves some clients empty; the whole draw is repeated (with
  the next deterministic random state) until every client has at least
  `min_examples` rows, as in the FedMA reference code.
  """
  labels = _as_labels(labels)
  n = len(labels)
  _check_clients(num_clients, n)
  if not alpha > 0:
    raise ValueError(f'dirichlet alpha must be > 0, got {alpha}.')
  if min_examples < 0 or min_examples * num_clients > n:
    raise ValueError(f'min_examples={min_examples} for {num_clients} clients '
                     f'needs more than the {n} examples.')
  classes = np.unique(labels)
  rng = np.random.default_rng([seed, 0xD1C])
  for _ in range(_DIRICHLET_MAX_TRIES):
    groups = [[] for _ in range(num_clients)]
    for c in classes:
      rows = rng.permutation(np.flatnonzero(labels == c))
      p = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(p)[:-1] * len(rows)).astype(np.int64)
      for k, part in enumerate(np.split(rows, cuts)):
        groups[k].append(part)
    groups = [np.concatenate(g) for g in groups]
    if min(len(g) for g in groups) >= min_examples:
      return _to_partition(groups)
  raise ValueError(
      f'dirichlet(alpha={alpha}) left some of the {num_clients} clients with '
      f'fewer than {min_examples} examples in {_DIRICHLET_MAX_TRIES} draws; '
      'use a larger alpha, fewer clients or a smaller min_examples.')


def shards(labels, num_clients: int, shards_per_client: int,
           seed: int) -> Partition:
  """Pathological label split of McMahan et al. 2017 (FedAvg paper).

  Rows are sorted by label (ties in random order), cut into
  `num_clients * shards_per_client` equal shards, and each client gets
  `shards_per_client` random shards, so it sees at most that many labels
  when shards do not straddle label boundaries (MNIST: 100 clients x 2
  shards of 300).
  """
  labels = _as_labels(labels)
  n = len(labels)
  _check_clients(num_clients, n)
  if shards_per_client < 1:
    raise ValueError(f'shards_per_client must be >= 1, got '
                     f'{shards_per_client}.')
  num_shards = num_clients * shards_per_client
  if num_shards > n:
    raise ValueError(f'{num_clients} clients x {shards_per_client} shards '
                     f'= {num_shards} shards, more than the {n} examples.')
  rng = np.random.default_rng([seed, 0x5A4D])
  perm = rng.permutation(n)
  by_label = perm[np.argsort(labels[perm], kind='stable')]
  pieces = np.array_split(by_label, num_shards)
  owner = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
  return _to_partition([np.concatenate([pieces[s] for s in row])
                        for row in owner])


def natural(keys) -> Partition:
  """One client per distinct key (writer, user, file), in sorted key order.

  The client id is `str(key)`; this is the partition to prefer whenever the
  data has a real owner, since it carries the real feature, label and size
  skew together.
  """
  keys = np.asarray(keys)
  if keys.ndim != 1 or len(keys) == 0:
    raise ValueError(f'keys must be a non-empty 1-D array, got shape '
                     f'{keys.shape}.')
  uniq, inverse = np.unique(keys, return_inverse=True)
  order = np.argsort(inverse, kind='stable')
  bounds = np.cumsum(np.bincount(inverse, minlength=len(uniq)))[:-1]
  out = {}
  for key, rows in zip(uniq, np.split(order, bounds)):
    cid = str(key)
    if cid in out:
      raise ValueError(f'keys {key!r} collide as client id {cid!r}.')
    out[cid] = rows.astype(np.int64)
  return out
