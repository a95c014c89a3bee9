"""Runs a few federated rounds on a Mesh and saves the final server params.

Run by `tests/test_scale.py` in a fresh process, because the number of
(fake) CPU devices is fixed when JAX starts:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python tests/scripts/mesh_rounds.py --mesh 4 --out /tmp/p.npz

`--mesh 0` runs without a mesh (the single-device baseline). With
`--num_processes 2 --process_id i --coordinator 127.0.0.1:PORT` it joins a
`jax.distributed` job (CPU collectives through gloo) and the mesh spans
every process's devices; process 0 writes `--out`.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument('--mesh', default='0',
                 help='comma-separated mesh sizes, 0 = no mesh')
  p.add_argument('--chunk', type=int, default=2)
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--tiers', action='store_true')
  p.add_argument('--resident', action='store_true')
  p.add_argument('--local_part', action='store_true',
                 help='each process packs only its own slots\' clients')
  p.add_argument('--out', required=True)
  p.add_argument('--coordinator', default='')
  p.add_argument('--num_processes', type=int, default=1)
  p.add_argument('--process_id', type=int, default=0)
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  if args.num_processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(args.coordinator, args.num_processes,
                               args.process_id)
  sys.path.insert(0, os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  import helpers  # pylint: disable=g-import-not-at-top
  from fedjax_eff import core  # pylint: disable=g-import-not-at-top
  from fedjax_eff.techniques import last_n  # pylint: disable=g-import-not-at-top
  from fedjax_eff import data as data_lib  # pylint: disable=g-import-not-at-top

  technique = None
  num_tiers = 1
  if args.tiers:  # two tiers of last-n training: two programs per round
    technique = last_n.last_n(helpers.get_model('mlp', 5, hidden=(16, 16)),
                              (1, 2))
    num_tiers = 2
  kw, params = helpers.tiny_setup(
      'mlp', server='fedadam', server_lr=0.01, technique=technique,
      model_kwargs={'hidden': (16, 16)})
  data = helpers.ragged_clients(sizes=(3, 7, 20, 40, 1, 12, 9, 5, 16, 2, 30))
  resident = data_lib.ResidentData.of(data)
  out = {}
  for size in [int(m) for m in args.mesh.split(',')]:
    mesh = (jax.make_mesh((size,), (core.CLIENTS_AXIS,)) if size else None)
    fns = core.build_round(**kw, chunk_size=args.chunk, num_tiers=num_tiers,
                           mesh=mesh)
    state = fns.init(jax.tree.map(np.array, params))  # donated: a copy
    for r in range(args.rounds):
      ids = np.arange(data.num_clients)
      k = len(ids)
      tiers = ids % 2 if args.tiers else None
      kw_round = {}
      if args.local_part and size:  # only this process's slots
        pos = fns.local_part(k, tiers)
        kw_round['part_of'] = (k, tiers)
        ids = ids[np.minimum(pos, k - 1)]
        tiers = tiers[np.minimum(pos, k - 1)] if args.tiers else None
      kw_pack = dict(steps=3, batch_size=4, seed=0, round_num=r,
                     ctx=None if tiers is None else {'tier': tiers})
      if args.resident:
        cohort = data_lib.pack_index(resident, ids, **kw_pack)
        kw_round['examples'] = resident.examples
      else:
        cohort = data_lib.pack(data, ids, **kw_pack)
      state, m = fns.round_step(state, cohort, jax.random.key(r), **kw_round)
    for i, x in enumerate(jax.tree.leaves(state.params)):
      out[f'mesh{size}/param{i}'] = np.asarray(x)
    out[f'mesh{size}/loss'] = np.asarray(m.train_loss)
    out[f'mesh{size}/upload_bits'] = np.asarray(m.client_upload_bits)
  out['devices'] = np.asarray(jax.device_count())
  if jax.process_index() == 0:
    np.savez(args.out, **out)


if __name__ == '__main__':
  main()
