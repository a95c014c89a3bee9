"""Replicas of one program on a Mesh's 'replicas' axis vs on one device.

Run by `tests/test_replicas.py` in a fresh process (the number of fake CPU
devices is fixed when JAX starts):

  python tests/scripts/replicas_on_a_mesh.py OUT_DIR

Four replicas (seeds, learning rates, FedProx mu) run twice with
`run_replicas`: on one device, and on a 2 x 4 ('replicas', 'clients') mesh
(mesh_replicas 2, mesh_clients 4: each block of 4 devices runs 2
replicas, their cohorts split 4 ways). Then one round on a 4-device
'replicas' mesh (mesh_replicas 4, one replica per device). Prints one JSON
line: each replica's per-round training losses and final test accuracy
both ways, and the sharding of that round's output params.
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)),
                os.path.dirname(HERE)]

import jax  # pylint: disable=g-import-not-at-top

from fedjax_eff.core.round import stack_replicas
from fedjax_eff.experiment import replicas
from fedjax_eff.experiment.build import Experiment
from fedjax_eff.experiment.metrics import read_metrics
from test_replicas import _cells


def main(out):
  cfgs = _cells() + _cells()[:1]
  cfgs[3].seed = 2
  result = {}
  for name, (mesh, clients) in (('0', (0, 0)), ('2x4', (2, 4))):
    for c in cfgs:
      c.num_rounds, c.mesh_replicas, c.mesh_clients = 1, mesh, clients
      c.data_placement = 'host'
    dirs = [f'{out}/mesh{name}_{i}' for i in range(4)]
    sums = replicas.run_replicas(cfgs, dirs, log=lambda _: None)
    result[f'loss{name}'] = [[r['train_loss'] for r in read_metrics(d)]
                             for d in dirs]
    result[f'acc{name}'] = [s['final_metrics']['test_accuracy']
                            for s in sums]
  # The round's outputs stay sharded over the replicas axis.
  for c in cfgs:
    c.mesh_replicas, c.mesh_clients = 4, 0
  exps = [Experiment(c, replica_hparams=True) for c in cfgs]
  place = replicas.replica_placement(cfgs[0], 4)
  state = place(stack_replicas([e.init_state() for e in exps]))
  state, _ = exps[0].round_fns.replica_step(
      state, place(stack_replicas([e.cohort(0).cohort for e in exps])),
      place(stack_replicas([e.round_key(0) for e in exps])), round_num=0,
      examples=exps[0].examples)
  leaf = jax.tree.leaves(state.params)[0]
  result['spec'] = str(leaf.sharding.spec)
  result['devices'] = len(leaf.sharding.device_set)
  print(json.dumps(result))


if __name__ == '__main__':
  main(sys.argv[1])
