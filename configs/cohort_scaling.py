"""Cohort size against the server learning rate rule: the shape of Charles
et al. 2021 ("On Large-Cohort Training for Federated Learning") offline.

Fashion-MNIST's 60,000 real training images (Debian's
dataset-fashion-mnist; `make data`) over 2,000 clients by Dirichlet(0.5)
label skew, 30 images each on average, no held-out clients; the official
10,000 test images are the test set. A small MLP (one hidden layer of 64,
50,890 parameters) so that a cohort of 1,000 clients a round is
affordable on two CPU cores; 3 local SGD steps of batch 10 (about one
epoch of a typical client), client lr 0.1; server FedAvg whose learning
rate follows `server.lr_scaling` in the cohort size K:

  'none'    learning_rate                 (constant in K)
  'sqrt'    learning_rate x sqrt(K / 10)  (Charles et al.'s heuristic)
  'linear'  learning_rate x K / 10

(10 = `server.lr_reference_clients`). Test accuracy every 5 rounds, so
rounds-to-target can be read from metrics.jsonl.

  python launch/train.py --config=configs/cohort_scaling.py \\
      --workdir=runs/cohort --config.clients_per_round=100 \\
      --config.server.lr_scaling=sqrt
  # The study (K in 10..1000 x rule x 3 seeds, server lr tuned per rule):
  python benchmarks/cohort_scaling.py
"""

from fedjax_eff.experiment.defaults import base_config


def get_config():
  c = base_config()
  c.num_rounds = 60
  c.clients_per_round = 10
  c.data.source = 'fashion_mnist'
  c.data.partition = 'dirichlet'
  c.data.dirichlet_alpha = 0.5
  c.data.num_clients, c.data.heldout_clients = 2000, 0
  c.model.name = 'mlp'
  c.model.kwargs.hidden = (64,)
  c.client.learning_rate = 0.1
  c.client.local_steps = 3
  c.client.batch_size = 10
  c.server.optimizer = 'fedavg'
  c.server.learning_rate = 1.0
  c.server.lr_scaling = 'none'    # 'none' | 'sqrt' | 'linear'
  c.server.lr_reference_clients = 10
  c.eval_every = 5
  c.checkpoint_every = 60
  return c
