"""EMNIST-62 with the FedJAX/TFF CNN and FedJAX's EMNIST settings.

FedJAX's EMNIST baseline (fedjax/experiments, after Reddi et al. 2020):
3,400 clients, 10 clients per round, 1 local epoch with batch 20, client SGD
lr 10^-1.5, server Adam lr 10^-2.5 (b1 0.9, b2 0.999, eps 1e-4), 1,500
rounds. TFDS's EMNIST carries no writer ids, so the 3,400 clients come from
a Dirichlet(0.3) label-skew partition of `emnist/byclass` (~205 examples per
client); 16 steps x 20 covers a typical client's epoch (larger ones are
subsampled). The server optimizer is Reddi et al.'s FedAdam (no bias
correction), where FedJAX uses optax.adam.

Needs the TFDS data prepared offline as ArrayRecord (no download here):

  tfds build emnist/byclass --data_dir=$HOME/tensorflow_datasets \
      --file_format=array_record      # on a machine with network
  python launch/train.py --config=configs/emnist_fedavg.py \
      --workdir=runs/emnist --config.data.data_dir=$HOME/tensorflow_datasets
"""

from fedjax_eff.experiment.defaults import base_config


def get_config():
  c = base_config()
  c.num_rounds = 1500
  c.clients_per_round = 10
  c.data.source = 'tfds'
  c.data.name = 'emnist/byclass'
  c.data.partition = 'dirichlet'
  c.data.dirichlet_alpha = 0.3
  c.data.num_clients = 3400
  c.data.heldout_clients = 100
  c.model.name = 'cnn'
  c.client.optimizer = 'sgd'
  c.client.learning_rate = 10 ** -1.5
  c.client.batch_size = 20
  c.client.epochs = 1  # S: the largest client's ceil(n / 20)
  c.server.optimizer = 'fedadam'
  c.server.learning_rate = 10 ** -2.5
  c.server.optimizer_kwargs.b1 = 0.9
  c.server.optimizer_kwargs.b2 = 0.999
  c.server.optimizer_kwargs.eps = 1e-4
  c.eval_every = 50
  c.checkpoint_every = 50
  return c
