"""The pretrained backbone of the FedYolo experiments: a ViT trained
centrally on digits 0-4.

FedYolo (Zhang et al. 2023) starts federated training from a pretrained
transformer. Offline, the backbone is pretrained here on the digits 0-4
(pooled from the training clients), and the federated runs fine-tune it on
tasks it has not seen (digits 5-9): `configs/fedyolo_multitask.py` and
`benchmarks/communication.py`. The ViT is wide enough that the modules are
small next to it: 4 pre-LN blocks of d_model 512 (8.4M parameters; 4x4
patches of the 8x8 digits: 4 tokens).

  python launch/pretrain.py --config=configs/fedyolo_backbone.py \\
      --workdir=runs/fedyolo_backbone
"""

import ml_collections

from fedjax_eff.experiment.defaults import base_config

# The backbone's architecture; fine-tuning configs add modules to it.
BACKBONE = dict(preset='tiny', num_layers=4, d_model=512, num_heads=8,
                mlp_dim=1024, patch_size=4)


def get_config():
  c = base_config()
  c.model.name = 'vit'
  c.model.kwargs = ml_collections.ConfigDict(BACKBONE)
  c.data.classes = [0, 1, 2, 3, 4]
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=600, batch_size=64, optimizer='adam', learning_rate=3e-4,
      log_every=50, checkpoint_every=200))
  return c
