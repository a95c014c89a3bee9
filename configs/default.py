"""Default experiment: FedAvg with the CNN on scikit-learn's digits.

1,797 real 8x8 handwritten digits (offline), 20% as a central test set, the
rest split over 110 clients by Dirichlet(0.5) label skew: 100 train, 10
held out. Reaches >= 90% test accuracy in well under 3 minutes on 2 cores.

  python launch/train.py --config=configs/default.py --workdir=runs/default
"""

from fedjax_eff.experiment.defaults import base_config


def get_config():
  c = base_config()
  c.num_rounds = 150
  c.clients_per_round = 10
  c.model.name = 'cnn'
  c.client.learning_rate = 0.05
  c.client.local_steps = 4
  c.client.batch_size = 8
  c.server.optimizer = 'fedavg'
  c.server.learning_rate = 1.0
  c.eval_every = 10
  return c
