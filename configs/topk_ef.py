"""FedAvg with top-k + 8-bit uploads and error feedback.

The default digits CNN experiment. Each client keeps the 1% largest-
magnitude entries of every tensor of its update (values and their flat
indices), quantizes the kept values to 8 bits with stochastic rounding, and
keeps what the message failed to carry as a residual that it adds to its
next update (error feedback: Stich et al. 2018; Karimireddy et al. 2019).
The residuals are per-client state: one model-sized tree per training
client in the round's client-state store, checkpointed with the server.
`upload_bits` in metrics.jsonl counts values (8 bits), indices
(ceil(log2 n) bits) and each tensor's lo/hi (64 bits) exactly.

  python launch/train.py --config=configs/topk_ef.py --workdir=runs/topk_ef
  # without feedback, for comparison:
  python launch/train.py --config=configs/topk_ef.py \\
      --workdir=runs/topk_noef --config.techniques[0].error_feedback=False
"""

import ml_collections

from fedjax_eff.experiment.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, 'default')
  c.techniques = [ml_collections.ConfigDict(dict(
      name='compress', error_feedback=True,
      codecs=[dict(name='topk', fraction=0.01),
              dict(name='quantize', bits=8)]))]
  return c
