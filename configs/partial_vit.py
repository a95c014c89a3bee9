"""Partial variable training (Ro et al.): half the layers per client.

A 4-layer ViT on digits; every client draws 2 of the 4 blocks per round
(plus the head) and trains and uploads only those; the server averages each
block over the clients that drew it. `--config.techniques[0].mode=fixed`
with `layers=(2, 3)` trains a fixed top half instead (a static program:
no gradients, optimizer state or backward pass below block 2).

  python launch/train.py --config=configs/partial_vit.py --workdir=runs/pvt
"""

import ml_collections

from fedjax_eff.experiment.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, 'vit_digits')
  c.server.optimizer = 'fedadam'
  c.server.learning_rate = 0.01
  c.techniques = [ml_collections.ConfigDict(dict(
      name='partial_training', mode='per_client', num_layers=2,
      layers=(2, 3), train_head=True))]
  return c
