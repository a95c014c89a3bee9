"""Federated self-supervised learning, end to end: SimCLR with a ViT on digits.

Every client trains the whole ViT and its projection head on two augmented
views of its own unlabelled digits (NT-Xent); the server averages (FedAvg).
Evaluation is a linear probe: a logistic regression on the frozen features
of the labelled training examples, scored on the central test set. The
baseline that `configs/layerwise_ssl.py` (Guo et al.) is compared against.

  python launch/train.py --config=configs/fedssl_vit.py --workdir=runs/fedssl
"""

from fedjax_eff.experiment.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, 'vit_digits')
  c.num_rounds = 60
  c.model.kwargs.update(head_hidden=64, num_classes=32)  # 32-d projection
  c.task.name = 'contrastive'
  c.task.temperature = 0.2
  c.task.augment.update(crop_pad=1, noise_std=0.05)
  c.client.optimizer = 'adam'
  c.client.learning_rate = 1e-3
  c.client.batch_size = 32
  return c
