"""FedProx on LEAF's synthetic(1, 1) with multinomial logistic regression.

Li et al. 2020, "Federated Optimization in Heterogeneous Networks": 30
clients with lognormal sizes, 60 features, 10 classes, 10 clients per round,
batch 10, client SGD lr 0.01, proximal term mu = 1. FedProx runs 20 local
epochs; here every client runs 20 steps of batch 10 (small clients cycle
through their data, large ones are subsampled), so the static shapes hold.

  python launch/train.py --config=configs/synthetic_fedprox.py \
      --workdir=runs/synthetic_fedprox
"""

from fedjax_eff.experiment.defaults import base_config


def get_config():
  c = base_config()
  c.num_rounds = 200
  c.clients_per_round = 10
  c.data.source = 'synthetic'
  c.data.partition = 'natural'
  c.data.num_clients = 30
  c.data.heldout_clients = 5
  c.data.synthetic_alpha = 1.0
  c.data.synthetic_beta = 1.0
  c.data.test_fraction = 0.2
  c.model.name = 'logreg'
  c.client.learning_rate = 0.01
  c.client.batch_size = 10
  c.client.local_steps = 20
  c.client.policy_small = 'repeat'
  c.client.prox_mu = 1.0
  c.server.optimizer = 'fedavg'
  c.eval_every = 20
  c.checkpoint_every = 20
  return c
