"""Base of the layer-structured digits experiments: a 4-layer ViT, FedAvg.

1,797 real 8x8 digits (offline), 100 training + 10 held-out clients
(Dirichlet 0.5), a ViT of 4 pre-LN blocks (d_model 64, patches 2x2: 16
tokens), 10 clients per round, 4 local SGD steps of batch 16. Variants
(`partial_vit.py`, `caff_tiers.py`) import this and add a technique.

  python launch/train.py --config=configs/vit_digits.py --workdir=runs/vit
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
  c.eval_every = 20
  return c
