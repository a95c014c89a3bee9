"""Federated SimCLR on Fashion-MNIST, end to end (issue 16 item 1).

The SSL experiment of `configs/fedssl_vit.py` moved from 8x8 digits (where a
random ViT's features already gave the linear probe 0.81 and training added
nothing measurable) to real 28x28 Fashion-MNIST images: a ViT of 4 pre-LN
blocks (d_model 64, 4 heads, MLP 128, 7x7 patches: 16 tokens), 100 training
+ 10 held-out clients (Dirichlet 0.5 label skew, ~540 images each), 10
clients per round, 4 local Adam steps of batch 32 (two views each). Views:
random resized crop (area >= 0.5), shift 2 px, brightness/contrast jitter,
noise 0.05 -- clothing is recognised by silhouette, which the crops keep.
Evaluation: linear probe (L-BFGS logistic regression) on the pooled
features of the first `task.probe_max_examples` labelled training images,
scored on the official test set (its first 5,000 images).

Layer-wise variant (Guo et al. 2023): `layerwise()` below, or
`benchmarks/ssl_layerwise.py`, which runs both with seeds.

  python launch/train.py --config=configs/fashion_ssl.py --workdir=runs/fssl
"""

import ml_collections

from fedjax_eff.experiment.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, 'fedssl_vit')
  c.num_rounds = 60
  c.data.source = 'fashion_mnist'
  c.data.num_clients, c.data.heldout_clients = 100, 10
  c.model.kwargs.update(patch_size=7)
  c.task.temperature = 0.2
  c.task.augment.update(crop_pad=2, min_scale=0.5, noise_std=0.05)
  c.client.batch_size = 32
  c.client.local_steps = 4
  c.eval_every = 20
  return c


def layerwise(c: ml_collections.ConfigDict, rounds_per_layer: int,
              depth_dropout: float = 0.0) -> ml_collections.ConfigDict:
  """`c` trained layer-wise as `configs/layerwise_ssl.py` does: one stage
  per block, first to last, a fresh projection head per block; frozen
  blocks below the active one skipped with probability `depth_dropout`
  (drawn per client)."""
  c.model.kwargs.per_layer_heads = True
  c.techniques = [ml_collections.ConfigDict(dict(
      name='layerwise', rounds_per_layer=rounds_per_layer, order='forward',
      final_joint=False, head='per_layer', depth_dropout=depth_dropout,
      depth_dropout_mode='chunk'))]
  c.chunk_size = 1
  return c
