"""Host packing of a round's row indices: the bulk path vs the per-client loop.

On an accelerator the host's `data.pack_index` was most of a small model's
round (the H200 runs in benchmarks/RESULTS.md: 0.064 s of the MLP's 0.072 s
at K = 2,048). `pack_index` now builds the rows of the common case
(`policy_small='pad'`, no epochs) in bulk; the per-client loop still serves
epochs and 'repeat'. Here, in one process and interleaved, both paths on
the accelerator suite's workload (20 examples per client, S = 1, B = 20,
`scaling.py`): the loop is reached with `policy_small='repeat'`, which
packs exactly the same rows when no client is smaller than S x B (checked).
Median of `--repeats` after a warm-up.

  python benchmarks/pack_index.py
  python benchmarks/pack_index.py --cohorts 100,1000 --repeats 3   # quick

Last line (also benchmarks/results/pack_index.json): per K the seconds of
each path and `speedup` (loop / bulk).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from fedjax_eff.data import cohort as cohort_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def resident_data(num_clients: int, per_client: int):
  """`num_clients` clients of `per_client` rows each (one float feature:
  only the indices are built here)."""
  sizes = np.full(num_clients, per_client, np.int64)
  offsets = np.arange(num_clients, dtype=np.int64) * per_client
  rows = {'x': np.zeros((num_clients * per_client + 1, 1), np.float32)}
  return cohort_lib.ResidentData(rows, offsets, sizes,
                                 tuple(f'c{i}' for i in range(num_clients)))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--cohorts', default='1000,2048,10000')
  ap.add_argument('--examples_per_client', type=int, default=20)
  ap.add_argument('--steps', type=int, default=1)
  ap.add_argument('--batch_size', type=int, default=20)
  ap.add_argument('--repeats', type=int, default=7)
  ap.add_argument('--out', default=os.path.join(HERE, 'results',
                                                'pack_index.json'))
  args = ap.parse_args(argv)
  out = dict(workload=dict(examples_per_client=args.examples_per_client,
                           steps=args.steps, batch_size=args.batch_size),
             seconds_bulk={}, seconds_loop={}, speedup={})
  for k in map(int, args.cohorts.split(',')):
    resident = resident_data(max(k, 10_000), args.examples_per_client)
    ids = np.sort(np.random.default_rng(0).choice(resident.sizes.size, k,
                                                  replace=False))
    kw = dict(steps=args.steps, batch_size=args.batch_size, seed=0)
    bulk = lambda r: cohort_lib.pack_index(resident, ids, round_num=r, **kw)
    loop = lambda r: cohort_lib.pack_index(resident, ids, round_num=r,
                                           policy_small='repeat', **kw)
    a, b = bulk(0), loop(0)  # warm-up, and the same rows either way
    for x, y in ((a.index, b.index), (a.mask, b.mask), (a.weight, b.weight)):
      np.testing.assert_array_equal(x, y)
    times = {'bulk': [], 'loop': []}
    for r in range(1, args.repeats + 1):
      for name, fn in (('bulk', bulk), ('loop', loop)):
        t = time.perf_counter()
        fn(r)
        times[name].append(time.perf_counter() - t)
    tb, tl = (statistics.median(times[n]) for n in ('bulk', 'loop'))
    out['seconds_bulk'][k], out['seconds_loop'][k] = tb, tl
    out['speedup'][k] = tl / tb
    print(f'K={k}: bulk {tb * 1e3:.1f} ms, per-client loop {tl * 1e3:.1f} ms'
          f' ({tl / tb:.2f}x)', flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(out, f, indent=1)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
