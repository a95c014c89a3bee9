"""Seeds as a replica axis: R runs of one config in one program.

`train_replicas(config, seeds, num_rounds)` trains `len(seeds)` runs that
differ only in `config.seed` with `RoundFns.replica_step`: the jitted
round vmapped over a leading replica axis of (server state, cohort, round
key). Each replica keeps its own `Experiment` for what the seed decides
on the host (the initial parameters, `CohortSampler`'s draws, the round
keys), so replica i follows the run `train_and_evaluate` would make with
`config.seed = seeds[i]`, up to float summation order. One device, no
device tiers; no checkpoints, metrics files or evaluation (the caller
evaluates the returned parameters).
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import jax
import numpy as np

from fedjax_eff.core.round import stack_replicas
from fedjax_eff.core.round import unstack_replicas
from fedjax_eff.experiment.build import Experiment


def _same(a, b) -> bool:
  if a is None or b is None:
    return a is b
  return a.keys() == b.keys() and all(
      np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def train_replicas(config, seeds: Sequence[int], num_rounds: int | None = None
                   ) -> tuple[list[Any], list[list[dict[str, float]]]]:
  """Trains one replica per seed for `num_rounds` (default
  `config.num_rounds`) rounds; returns (each replica's final
  `ServerState`, each replica's per-round metrics)."""
  exps = []
  for seed in seeds:
    c = copy.deepcopy(config)
    c.seed = int(seed)
    exps.append(Experiment(c))
  first = exps[0]
  if any(not _same(e.examples, first.examples) for e in exps[1:]):
    raise ValueError('The replicas\' device-resident data differ (a '
                     'partition that depends on config.seed): pass '
                     'config.data_placement=host.')
  num_rounds = config.num_rounds if num_rounds is None else num_rounds
  states = stack_replicas([e.init_state() for e in exps])
  history: list[list[dict[str, float]]] = [[] for _ in exps]
  for r in range(num_rounds):
    cohorts = stack_replicas([e.cohort(r).cohort for e in exps])
    keys = stack_replicas([e.round_key(r) for e in exps])
    states, m = first.round_fns.replica_step(
        states, cohorts, keys, round_num=r, examples=first.examples)
    for i, h in enumerate(history):
      h.append({k: float(np.asarray(v)[i]) for k, v in m._asdict().items()
                if not k.startswith('client_')})
  return unstack_replicas(jax.device_get(states), len(exps)), history
