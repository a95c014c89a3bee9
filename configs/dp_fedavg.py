"""Client-level DP-FedAvg on Fashion-MNIST split over 3,000 clients.

McMahan et al. 2018 (DP-FedAvg) with adaptive clipping to the median
update norm (Andrew et al. 2021): Poisson sampling of q = 100 / 3,000
clients per round (so sampling amplification matters), uniform client
weights, each client's update clipped to C and Gaussian noise of std
z C on the sum, divided by the expected cohort size 100; server momentum
0.9. Epsilon at delta = 1e-5 (RDP, dp-accounting) is in every line of
metrics.jsonl and in summary.json's `privacy`.

Fashion-MNIST's 60,000 real training images (Debian's
dataset-fashion-mnist; `make data`) over 3,000 clients by Dirichlet(1.0)
label skew, 20 images each on average; logistic regression (7,850
parameters: the noise's norm grows with sqrt(d), so DP at 100 clients
per round favours a small model); one local epoch (2 steps of 10).

  python launch/train.py --config=configs/dp_fedavg.py --workdir=runs/dp
  # DP-FTRL (banded matrix factorisation, no amplification):
  python launch/train.py --config=configs/dp_fedavg.py --workdir=runs/ftrl \\
      --config.privacy.mechanism=banded --config.sampling=cyclic
  # The noise multiplier for a target epsilon:
  python launch/noise_multiplier.py --target_epsilon=5 --delta=1e-5 \\
      --rounds=200 --sampling_probability=0.0333
"""

from fedjax_eff.experiment.defaults import base_config


def get_config():
  c = base_config()
  c.num_rounds = 200
  c.clients_per_round = 100       # expected: q = 100 / 3,000
  c.sampling = 'poisson'
  c.data.source = 'fashion_mnist'
  c.data.num_clients, c.data.heldout_clients = 3000, 0
  c.data.dirichlet_alpha = 1.0
  c.model.name = 'logreg'
  c.client.learning_rate = 0.1
  c.client.local_steps = 2
  c.client.batch_size = 10
  c.client.weighting = 'uniform'  # DP: each client adds at most C
  c.server.optimizer = 'fedavgm'
  c.server.learning_rate = 1.0
  c.server.optimizer_kwargs.momentum = 0.9
  c.privacy.mechanism = 'gaussian'
  c.privacy.noise_multiplier = 1.0
  c.privacy.clip_norm = 0.1
  c.privacy.target_quantile = 0.5
  c.privacy.delta = 1e-5
  c.eval_every = 20
  c.checkpoint_every = 50
  return c
