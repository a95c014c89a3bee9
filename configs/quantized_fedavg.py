"""FedAvg with 8-bit quantized uploads (Ro et al.'s quantization lever).

The default digits CNN experiment, with every client's update sent as 8-bit
integers with stochastic (unbiased) rounding and one fp32 range per block of
256 values: 4.1x fewer bits up than fp32 (`upload_bits` in metrics.jsonl).
`--config.techniques[0].bits=4` (or 1..16), `...block_size=0` (one scale
per tensor), `...download_bits=8` quantizes the download too.

  python launch/train.py --config=configs/quantized_fedavg.py \\
      --workdir=runs/quantized
"""

import ml_collections

from fedjax_eff.experiment.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, 'default')
  c.techniques = [ml_collections.ConfigDict(dict(
      name='quantize', bits=8, block_size=256, download_bits=0))]
  return c
