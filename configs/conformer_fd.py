"""Federated dropout on a Conformer speech recognizer (Guliani et al. 2022),
CPU-sized, on the offline espeak-ng speech set.

The set (`launch/build_speech.py`, built on first use and cached): spoken
digit strings synthesised by espeak-ng, one client per (voice, rate, pitch)
speaker, 28 training and 4 held-out speakers, 40 utterances each, 40 log-mel
bins. The model: `conformer_ctc` 'cpu' (4 conformer blocks, d 96, 4 heads,
1.04M parameters) with a CTC head over 29 characters.

Each round every client trains a dense sub-model keeping 75% of the heads
and feed-forward units in the first block down to 50% in the last (the
`depth` schedule from `rate_first` 0.25 to `rate` 0.5), so it downloads,
trains and uploads about half the blocks' weights. Metrics per round:
CTC loss per character, exact-match accuracy; every `eval_every` rounds
`test_cer`/`test_wer` on the held-out speakers; at the end the nested
sub-models' CER/WER at keep 0.25, 0.5, 0.75, 1.0 (`keep*/test_cer`).

  python launch/train.py --config=configs/conformer_fd.py --workdir=runs/fd
  python launch/train.py --config=configs/conformer_fd.py --workdir=runs/full \\
      --config.techniques='()'           # the full-model baseline
  python launch/train.py --config=configs/conformer_fd.py --workdir=runs/all \\
      --config.techniques[0].scope=all   # every width drops (residual too)

`benchmarks/fd_schedules.py` compares constant, depth and size schedules at
equal sub-model size with `scope='all'`.
"""

import ml_collections

from fedjax_eff.experiment.defaults import base_config


def get_config():
  c = base_config()
  c.data.source = 'speech'
  c.data.num_clients, c.data.heldout_clients = 28, 4
  c.task.name = 'ctc'
  c.model.name = 'conformer_ctc'
  c.model.kwargs = ml_collections.ConfigDict(dict(preset='cpu'))
  # scope 'units': heads and feed-forward units drop; 'all' also drops the
  # residual width, the conv-module and front-end channels (the sub-model
  # at keep 0.25 is then 0.07 of the parameters, not 0.46).
  c.techniques = [ml_collections.ConfigDict(dict(
      name='federated_dropout', rate=0.5, schedule='depth', rate_first=0.25,
      scope='units'))]
  c.num_rounds = 300
  c.clients_per_round = 8
  c.client.optimizer, c.client.learning_rate = 'adam', 1e-3
  c.client.local_steps, c.client.batch_size = 4, 8
  c.server.optimizer, c.server.learning_rate = 'fedavg', 1.0
  c.eval_every = 10  # CER/WER on the held-out speakers
  c.checkpoint_every = 25
  c.eval_batch_size = 64
  return c
