"""Partial variable training (Ro et al.): half the layers per client.

A 4-layer ViT on digits; every client draws 2 of the 4 blocks per round
(plus the head) and trains and uploads only those; the server averages each
block over the clients that drew it. `--config.techniques[0].mode=fixed`
with `layers=(2, 3)` trains a fixed top half instead (a static program:
no gradients, optimizer state or backward pass below block 2).

  python launch/train.py --config=configs/partial_vit.py --workdir=runs/pvt
"""

import ml_collections

from fedjax_eff.experiment.defaults import base_config


def get_config():
  c = base_config()
  c.num_rounds = 100
  c.clients_per_round = 10
  c.model.name = 'vit'
  c.model.kwargs = ml_collections.ConfigDict(dict(
      preset='tiny', num_layers=4, d_model=64, num_heads=4, mlp_dim=128,
      patch_size=2))
  c.client.optimizer = 'sgd'
  c.client.learning_rate = 0.05
  c.client.local_steps = 4
  c.client.batch_size = 16
  c.server.optimizer = 'fedadam'
  c.server.learning_rate = 0.01
  c.techniques = [ml_collections.ConfigDict(dict(
      name='partial_training', mode='per_client', num_layers=2,
      layers=(2, 3), train_head=True))]
  c.eval_every = 20
  return c
