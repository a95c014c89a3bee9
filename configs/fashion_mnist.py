"""The default experiment (FedAvg, the CNN) on Fashion-MNIST, read offline
from IDX files.

Fashion-MNIST (Xiao et al. 2017): 60,000 + 10,000 real 28x28 grey images
of 10 clothing classes. The 60,000 training images are split over 520
clients by Dirichlet(0.5) label skew (500 train, 20 held out); the
official 10,000 test images are the central test set. 20 clients per
round, 5 local SGD steps of batch 20 (about one epoch of a typical
client's ~115 examples).

Needs the four IDX files: `apt-get install dataset-fashion-mnist`
(Debian/Ubuntu, as root; `make data` does it where it can) puts them in
/usr/share/datasets/fashion-mnist; elsewhere pass a directory holding
them (plain or .gz) as `--config.data.data_dir=DIR`.

  python launch/train.py --config=configs/fashion_mnist.py \\
      --workdir=runs/fashion_mnist
"""

from fedjax_eff.experiment.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, 'default')  # CNN, FedAvg, server lr 1
  c.num_rounds = 40
  c.clients_per_round = 20
  c.data.source = 'fashion_mnist'  # partition: Dirichlet(0.5), the default
  c.data.num_clients, c.data.heldout_clients = 500, 20
  c.client.learning_rate = 0.1
  c.client.local_steps = 5
  c.client.batch_size = 20
  c.eval_every = 20
  return c
