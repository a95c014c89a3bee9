"""Federated layer-wise SSL with depth dropout (Guo et al. 2023) on digits.

The ViT of `configs/fedssl_vit.py`, trained one layer at a time: 15 rounds
per layer, first to last, each layer with its own fresh projection head;
frozen layers below the active one are skipped with probability 0.5, drawn
per chunk of `chunk_size` clients (set here to 1: per client, on every
backend; a wider chunk shares one draw among its clients and is faster on
an accelerator), so skipped layers really cost nothing.
Compare device_peak_bytes / device_flops_per_round / upload_bits in
metrics.jsonl and the linear-probe accuracy with the end-to-end run.

  python launch/train.py --config=configs/layerwise_ssl.py \\
      --workdir=runs/layerwise_ssl
"""

import ml_collections

from fedjax_eff.experiment.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, 'fedssl_vit')
  c.model.kwargs.per_layer_heads = True
  c.techniques = [ml_collections.ConfigDict(dict(
      name='layerwise', rounds_per_layer=15, order='forward',
      final_joint=False, head='per_layer', depth_dropout=0.5,
      depth_dropout_mode='chunk'))]
  # A per-chunk draw means what the chunk width says: name it (the
  # per-backend default, 0, is refused for per-chunk draws).
  c.chunk_size = 1
  return c
