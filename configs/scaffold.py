"""SCAFFOLD (Karimireddy et al. 2020) on LEAF's synthetic(1, 1).

The heterogeneous synthetic problem of configs/synthetic_fedprox.py (30
clients, multinomial logistic regression, 20 local SGD steps), without the
proximal term: SCAFFOLD's control variates correct each local gradient by
c - c_i instead. The server's c is server state; the clients' c_i live in
the client-state store (30 x model size), checkpointed with the server.
The technique takes the client learning rate from `client.learning_rate`
(option II of the paper assumes plain client SGD).

  python launch/train.py --config=configs/scaffold.py --workdir=runs/scaffold
  # FedAvg on the same problem, for comparison:
  python launch/train.py --config=configs/synthetic_fedprox.py \\
      --workdir=runs/fedavg_synth --config.client.prox_mu=0
"""

import ml_collections

from fedjax_eff.experiment.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, 'synthetic_fedprox')
  c.client.prox_mu = 0.0
  c.techniques = [ml_collections.ConfigDict(dict(name='scaffold'))]
  return c
