"""Synthetic federated text whose best possible perplexity is known exactly.

On real text one cannot tell whether a language model's perplexity of 40 is
good. Here every client writes with its own first-order Markov chain over a
small vocabulary, so the lowest achievable next-token loss is the chain's
entropy rate, computed in closed form; tests and experiments compare the
model's loss with that floor.

Generation (all from `seed`, one random stream per client, so client k's
data does not depend on how many clients are generated):

* shared prior: for each state s a base row B[s] ~ Dirichlet(concentration
  * 1) (small `concentration`: peaked rows, low entropy);
* client k: P_k[s] ~ Dirichlet(B[s] / heterogeneity), then mixed with
  `smoothing` of the uniform distribution so every transition has positive
  probability (finite log-loss, a unique stationary distribution).
  `heterogeneity` -> 0 gives identical clients; larger values give clients
  whose rows scatter further from B[s];
* client k has n_k = min(int(LogNormal(3, 1.5)) + 10, max_sequences)
  sequences (median ~30, heavy tail), each `seq_len` chain tokens started
  in the client's stationary distribution pi_k, so every position is
  distributed alike.

Token ids follow the Stack Overflow conventions: pad=0, bos=1, eos=2,
oov=3, chain state s is id 4 + s; `x = [bos, t_1 .. t_{L-1}]`,
`y = [t_1 .. t_L]` (int32 [n, seq_len]). Sequences have fixed length, so
there is no pad and no eos: every target in `y` is a chain token, and bos
is never a target.

The floor. Client k's entropy rate is
H_k = sum_s pi_k(s) * H(P_k[s])   (nats per token),
the expected loss of a token that follows a chain token under the model
that knows client k's chain. `entropy_rate` is the per-client rate averaged
over tokens, i.e. clients weighted by their number of such targets (n_k *
(L - 1)): it is the floor of the mean loss over targets y[:, 1:]. The first
target y[:, 0] follows bos and costs H(pi_k) at best; `loss_floor` is the
floor over all targets of `y`, counting those too. A model that is not told
the client (one global model) can only do worse than these personalised
floors; it approaches them as the prefix identifies the client. The
perplexity floor is exp(entropy_rate) (or exp(loss_floor)).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fedjax_eff.data import partitions
from fedjax_eff.data.federated import FederatedData

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
NUM_SPECIAL = 4
_TAG = 0x3A7C  # Separates these random streams from other sources'.


class MarkovCorpus(NamedTuple):
  """The clients and their exact entropies (nats per token).

  Attributes:
    data: clients with `x`, `y` int32 [n_k, seq_len].
    entropy_rate: per-client entropy rate averaged over the targets
      y[:, 1:] of all clients (the floor of their mean loss).
    loss_floor: the same over all targets of `y` (y[:, 0] costs H(pi_k)).
    client_entropy_rate: H_k per client, in `data.client_ids` order.
    client_first_entropy: H(pi_k) per client.
    transitions: P_k, float64 [clients, states, states].
    stationary: pi_k, float64 [clients, states].
    vocab_size: number of token ids (4 special + states).
  """
  data: FederatedData
  entropy_rate: float
  loss_floor: float
  client_entropy_rate: np.ndarray
  client_first_entropy: np.ndarray
  transitions: np.ndarray
  stationary: np.ndarray
  vocab_size: int


def _entropy(p: np.ndarray) -> np.ndarray:
  """Entropy in nats along the last axis (0 log 0 = 0)."""
  with np.errstate(divide='ignore', invalid='ignore'):
    return -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)


def stationary_distribution(p: np.ndarray) -> np.ndarray:
  """pi with pi P = pi, sum(pi) = 1, for an ergodic transition matrix."""
  n = len(p)
  # Solve (P^T - I) pi = 0 with one equation replaced by sum(pi) = 1.
  a = p.T - np.eye(n)
  a[-1] = 1.0
  b = np.zeros(n)
  b[-1] = 1.0
  pi = np.linalg.solve(a, b)
  pi = np.clip(pi, 0.0, None)
  return pi / pi.sum()


def entropy_rate(p: np.ndarray, pi: np.ndarray | None = None) -> float:
  """sum_s pi(s) H(P[s]) in nats: the chain's entropy rate."""
  pi = stationary_distribution(p) if pi is None else pi
  return float(pi @ _entropy(p))


def sample_chains(p: np.ndarray, pi: np.ndarray, num: int, length: int,
                  rng: np.random.Generator) -> np.ndarray:
  """`num` chains of `length` states (int64), each started from `pi`."""
  cum = np.cumsum(p, axis=1)
  states = np.empty((num, length), np.int64)
  states[:, 0] = np.minimum(
      np.searchsorted(np.cumsum(pi), rng.random(num), side='right'),
      len(pi) - 1)
  for t in range(1, length):
    u = rng.random(num)
    nxt = (cum[states[:, t - 1]] <= u[:, None]).sum(axis=1)
    states[:, t] = np.minimum(nxt, len(pi) - 1)
  return states


def markov_corpus(num_clients: int, seed: int = 0, num_states: int = 32,
                  seq_len: int = 20, concentration: float = 0.5,
                  heterogeneity: float = 0.1, smoothing: float = 1e-3,
                  max_sequences: int = 1000) -> MarkovCorpus:
  """Per-client Markov-chain text; see the module docstring."""
  if num_clients < 1 or num_states < 2 or seq_len < 1:
    raise ValueError(f'need num_clients >= 1, num_states >= 2, seq_len >= 1; '
                     f'got {num_clients}, {num_states}, {seq_len}.')
  if concentration <= 0 or heterogeneity <= 0 or not 0 < smoothing <= 1:
    raise ValueError('concentration and heterogeneity must be > 0 and '
                     f'smoothing in (0, 1]; got {concentration}, '
                     f'{heterogeneity}, {smoothing}.')
  v = int(num_states)
  base = np.random.default_rng([seed, _TAG, 0]).dirichlet(
      np.full(v, concentration), size=v)
  # Dirichlet parameters must be positive; peaked base rows underflow.
  base = np.maximum(base, 1e-12)
  ids = partitions.client_ids(num_clients)
  clients, trans, stat = {}, [], []
  sizes = []
  for k, cid in enumerate(ids):
    rng = np.random.default_rng([seed, _TAG, 1, k])
    p = np.stack([rng.dirichlet(row / heterogeneity) for row in base])
    p = (1 - smoothing) * p + smoothing / v
    p /= p.sum(axis=1, keepdims=True)
    pi = stationary_distribution(p)
    n = min(int(rng.lognormal(3.0, 1.5)) + 10, max_sequences)
    tokens = sample_chains(p, pi, n, seq_len, rng) + NUM_SPECIAL
    x = np.concatenate([np.full((n, 1), BOS_ID), tokens[:, :-1]], axis=1)
    clients[cid] = {'x': x.astype(np.int32), 'y': tokens.astype(np.int32)}
    trans.append(p)
    stat.append(pi)
    sizes.append(n)
  trans, stat = np.stack(trans), np.stack(stat)
  rates = np.einsum('ks,ks->k', stat, _entropy(trans))
  first = _entropy(stat)
  sizes = np.asarray(sizes, np.float64)
  rate = float(np.sum(sizes * rates) / np.sum(sizes)) if seq_len > 1 else (
      float('nan'))
  floor = float(np.sum(sizes * ((seq_len - 1) * rates + first))
                / np.sum(sizes * seq_len))
  return MarkovCorpus(FederatedData(clients, order=ids), rate, floor, rates,
                      first, trans, stat, v + NUM_SPECIAL)
