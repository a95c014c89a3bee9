"""Chunk width C per model, backend and cohort shape, by timing it.

How wide a vmap over clients should be depends on what no formula knows
well: the backend (on a 2-core CPU a scan over single clients wins, on a
GPU wide chunks do), the model's arithmetic intensity and the cohort shape.
So the answer is measured: `autotune_chunk_size` times a few rounds at each
candidate width on the real cohort and keeps the fastest, and caches the
answer in a JSON file keyed by everything that decides it (the model, the
technique, the backend and device kind, the mesh size, the cohort's shapes
and dtypes), so a second run of the same experiment skips the timing.

Timing never touches the run's state: each candidate trains a copy, and the
result is thrown away. Which C is chosen never changes results beyond float
summation order (tests hold the round to that for every C).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import numpy as np


def default_cache_path() -> str:
  root = os.environ.get('FEDJAX_EFF_CACHE', os.path.join(
      os.path.expanduser('~'), '.cache', 'fedjax_eff'))
  return os.path.join(root, 'chunk_autotune.json')


def default_candidates(num_clients: int, backend: str | None = None
                       ) -> list[int]:
  """Powers of two up to K (to 16 on CPU, where wide vmaps lose; to 1024
  elsewhere), plus K itself where it is small enough."""
  backend = backend or jax.default_backend()
  top = 16 if backend == 'cpu' else 1024
  out = [c for c in (2 ** i for i in range(11)) if c <= min(num_clients, top)]
  if num_clients <= top and num_clients not in out:
    out.append(num_clients)
  return out


def cache_key(model: Any, technique_name: str, cohort: Any,
              mesh_size: int = 1, extra: str = '') -> str:
  """What decides the best C: model, technique, backend, device, shapes."""
  shapes = sorted(
      (jax.tree_util.keystr(p), tuple(np.shape(x)),
       str(getattr(x, 'dtype', None) or np.asarray(x).dtype))
      for p, x in jax.tree_util.tree_flatten_with_path(cohort)[0])
  dev = jax.devices()[0]
  text = repr((repr(model), technique_name, jax.default_backend(),
               dev.device_kind, jax.device_count(), mesh_size, shapes, extra,
               jax.__version__))
  return hashlib.sha256(text.encode()).hexdigest()[:24]


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def autotune_chunk_size(build: Callable[[int], Any], state: Any, cohort: Any,
                        rng: jax.Array, *, key: str,
                        candidates: Sequence[int] | None = None,
                        rounds: int = 2, examples: Any = None,
                        cache_path: str | None = None,
                        log: Callable[[str], None] = logging.info
                        ) -> tuple[int, dict[int, float]]:
  """The fastest chunk width for this round, and seconds/round per width.

  Args:
    build: `C -> RoundFns` (e.g. `functools.partial(core.build_round, ...,
      donate=False)` with `chunk_size=C`).
    state: the server state to time from (copied, never changed).
    cohort: a real cohort of the run (`Cohort` or `IndexedCohort`).
    rng: the round key to time with.
    key: the cache key (`cache_key(...)`).
    candidates: widths to try (default `default_candidates(K)`).
    rounds: timed rounds per width, after one compiling round; the minimum
      is kept (the least disturbed by other work on the machine).
    examples: resident examples, for an `IndexedCohort`.
    cache_path: JSON cache (default `~/.cache/fedjax_eff/...`; '' = none).

  Returns:
    `(best C, {C: seconds per round})`; from the cache, the timings are
    the ones measured when it was written.
  """
  path = default_cache_path() if cache_path is None else cache_path
  cache = _read(path) if path else {}
  k = cohort.mask.shape[0]
  if key in cache:
    hit = cache[key]
    log(f'chunk autotune: C={hit["best"]} from the cache {path}')
    return int(hit['best']), {int(c): s for c, s in hit['seconds'].items()}
  candidates = sorted({min(int(c), k) for c in (
      candidates or default_candidates(k)) if int(c) >= 1})
  seconds = {}
  for c in candidates:
    fns = build(c)
    s = jax.tree.map(lambda x: x.copy() if hasattr(x, 'copy') else x, state)
    kw = {} if examples is None else {'examples': examples}
    out, _ = fns.round_step(s, cohort, rng, **kw)  # compiles
    jax.block_until_ready(out)
    times = []
    for _ in range(rounds):
      t = time.perf_counter()
      out, _ = fns.round_step(s, cohort, rng, **kw)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t)
    seconds[c] = min(times)
    log(f'chunk autotune: C={c}: {seconds[c]:.4f} s/round')
  best = min(seconds, key=seconds.get)
  if path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cache = _read(path)  # another run may have written meanwhile
    cache[key] = {'best': best, 'seconds': {str(c): v
                                            for c, v in seconds.items()},
                  'backend': jax.default_backend(),
                  'device_kind': jax.devices()[0].device_kind,
                  'clients_per_round': k, 'time': time.time()}
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      json.dump(cache, f, indent=1)
    os.replace(tmp, path)  # atomic: a crash never leaves half a cache
  return best, seconds
