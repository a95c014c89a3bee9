"""In-memory federated datasets: client id -> dict of numpy arrays.

Federated learning simulators need two things from a dataset: the list of
clients (with their sizes, which in cross-device data differ by orders of
magnitude) and random access to one client's examples. Everything else
(sampling, packing into static shapes) lives in `cohort.py`, so any source
that can produce per-client arrays plugs in here.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

ClientData = Mapping[str, np.ndarray]


class FederatedData:
  """Clients, each a dict of equally long numpy arrays (e.g. `x`, `y`).

  Client order is fixed (sorted ids unless given explicitly), so a client's
  *index* is a stable, reproducible handle used by samplers and checkpoints.
  """

  def __init__(self, clients: Mapping[str, ClientData],
               order: Iterable[str] | None = None):
    self._clients = {str(k): {f: np.asarray(a) for f, a in v.items()}
                     for k, v in clients.items()}
    if not self._clients:
      raise ValueError('FederatedData needs at least one client.')
    self._ids = list(order) if order is not None else sorted(self._clients)
    if sorted(self._ids) != sorted(self._clients):
      raise ValueError('`order` must list every client exactly once.')
    features = None
    for cid in self._ids:
      data = self._clients[cid]
      lengths = {f: len(a) for f, a in data.items()}
      if len(set(lengths.values())) > 1:
        raise ValueError(f'Client {cid!r} has features of unequal length: '
                         f'{lengths}.')
      if features is None:
        features = set(data)
      elif set(data) != features:
        raise ValueError(f'Client {cid!r} has features {sorted(data)}, '
                         f'others have {sorted(features)}.')
    self._sizes = np.array(
        [len(next(iter(self._clients[c].values()))) for c in self._ids],
        dtype=np.int64)

  @classmethod
  def from_partition(cls, arrays: Mapping[str, np.ndarray],
                     client_indices: Mapping[str, np.ndarray]
                     ) -> 'FederatedData':
    """Builds clients from a central dataset and a partition of its rows."""
    return cls({cid: {f: a[idx] for f, a in arrays.items()}
                for cid, idx in client_indices.items()},
               order=list(client_indices))

  @property
  def client_ids(self) -> list[str]:
    return list(self._ids)

  @property
  def num_clients(self) -> int:
    return len(self._ids)

  @property
  def client_sizes(self) -> np.ndarray:
    """Number of examples per client, in `client_ids` order."""
    return self._sizes.copy()

  @property
  def features(self) -> list[str]:
    return sorted(self._clients[self._ids[0]])

  def client(self, index_or_id: int | str) -> dict[str, np.ndarray]:
    cid = (self._ids[index_or_id] if isinstance(index_or_id, (int, np.integer))
           else index_or_id)
    return dict(self._clients[cid])

  def subset(self, ids: Iterable[str]) -> 'FederatedData':
    ids = list(ids)
    return FederatedData({c: self._clients[c] for c in ids}, order=ids)

  def concatenated(self) -> dict[str, np.ndarray]:
    """All examples of all clients as one central dataset."""
    return {f: np.concatenate([self._clients[c][f] for c in self._ids])
            for f in self.features}

  def __len__(self) -> int:
    return self.num_clients

  def __repr__(self) -> str:
    s = self._sizes
    return (f'FederatedData({self.num_clients} clients, {int(s.sum())} '
            f'examples, sizes min/median/max {s.min()}/{int(np.median(s))}/'
            f'{s.max()}, features {self.features})')
