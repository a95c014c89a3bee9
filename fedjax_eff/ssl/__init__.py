"""Federated self-supervised learning: SimCLR views, NT-Xent, linear probe.

  augment.py       pure-JAX per-example image augmentations (static shapes)
  simclr.py        NT-Xent with padding masks; `contrastive_task` for the round
  linear_probe.py  frozen-feature logistic-regression evaluation
"""

from __future__ import annotations

from fedjax_eff.ssl.augment import DEFAULT_KNOBS
from fedjax_eff.ssl.augment import color_jitter
from fedjax_eff.ssl.augment import cutout
from fedjax_eff.ssl.augment import gaussian_noise
from fedjax_eff.ssl.augment import random_crop
from fedjax_eff.ssl.augment import random_flip
from fedjax_eff.ssl.augment import random_grayscale
from fedjax_eff.ssl.augment import random_resized_crop
from fedjax_eff.ssl.augment import simclr_augment
from fedjax_eff.ssl.linear_probe import extract_features
from fedjax_eff.ssl.linear_probe import linear_probe
from fedjax_eff.ssl.linear_probe import probe_accuracy
from fedjax_eff.ssl.simclr import ContrastiveTask
from fedjax_eff.ssl.simclr import contrastive_task
from fedjax_eff.ssl.simclr import contrastive_top1
from fedjax_eff.ssl.simclr import nt_xent
from fedjax_eff.ssl.simclr import nt_xent_reference
from fedjax_eff.ssl.simclr import pair_logits
from fedjax_eff.ssl.simclr import two_views
