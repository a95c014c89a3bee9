"""Budget-aware last-n training on heterogeneous devices (Pfeiffer et al.).

A 4-layer ViT on digits; clients are drawn into three device tiers (50% /
30% / 20%) with budgets on peak training memory, FLOPs per round and upload
bytes. For each tier the technique compiles the device program of every
n = 0..4 (last n layers + head trainable, the rest frozen), reads XLA's
measured cost and picks the largest n that fits (here: small phones n = 1,
mid-range n = 2, the rest the full model). All tiers train in the same round,
each in its own compiled program; the server averages every layer over the
clients that trained it. metrics.jsonl reports device cost per tier
(`tier{t}/device_peak_bytes`, ...), summary.json the whole cost table.

  python launch/train.py --config=configs/caff_tiers.py --workdir=runs/caff
"""

import ml_collections

from fedjax_eff.experiment.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, 'vit_digits')
  c.devices.tier_fractions = [0.5, 0.3, 0.2]
  c.techniques = [ml_collections.ConfigDict(dict(
      name='budgeted_last_n', train_head=True, budgets=[
          # Measured for this model (batch 16, 4 steps, SGD) on XLA:CPU
          # by accounting.client_cost, the device holding only its upload:
          # n=1: 2.27 MB peak, 0.45 GFLOPs, 137 kB up; n=2: 3.81 MB, 0.60
          # GFLOPs, 271 kB; n=3: 5.36 MB, 0.74 GFLOPs, 405 kB; n=4: 6.97 MB,
          # 0.89 GFLOPs, 544 kB. Each memory budget sits between two n's
          # peaks (tier 1's upload budget also stops it at n=2).
          dict(memory_bytes=3.0e6, flops_per_round=1.0e9,
               upload_bytes=1.0e6),
          dict(memory_bytes=4.5e6, flops_per_round=1.0e9,
               upload_bytes=3.0e5),
          dict(memory_bytes=1.0e9, flops_per_round=1.0e12,
               upload_bytes=1.0e9),
      ]))]
  return c
