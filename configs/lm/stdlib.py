"""Language models in cross-device FL (Ro et al. 2022), offline: the Python
standard library as a federated next-token corpus.

One config file for the whole grid; the part after ':' picks a cell:

  python launch/train.py --config=configs/lm/stdlib.py:transformer,fedadam \\
      --workdir=runs/lm_tf_adam
  python launch/train.py \\
      --config=configs/lm/stdlib.py:transformer,fedyogi,partial,q4 \\
      --workdir=runs/lm_tf_yogi_pq4

Tokens (comma-separated, any order):
  model      transformer (4,182,048 parameters: the Stack Overflow
             LSTM's size), transformer_1m (1.11M), transformer_21m
             (21.6M), lstm (Stack Overflow's 4,050,748), lstm_large
             (20,051,732), conformer (20,804,096); all with 10,004 ids
  server     fedavg | fedadam | fedyogi (Reddi et al. 2021's Stack Overflow
             next-word settings: client SGD 10^-0.5, server 1 (FedAvg) or
             10^-2 with tau 10^-5 (FedAdam, FedYogi); 50 clients per round,
             batch 16, 16 local steps ~ one epoch of at most 256 sentences)
  partial    train the top half of the layers (and the head's norm/output);
             the embedding and the lower half are frozen, not uploaded
  q8 | q4    upload 8- or 4-bit stochastic-rounding codes (blocks of 256)
  paper      Reddi et al.'s round sizes: 50 clients per round, one local
             epoch (client.epochs=1) at batch 16 over at most 1,000
             sentences per module, 1,500 rounds,
             evaluation every 50 (about a day on 2 CPU cores: an
             accelerator's setting). Without it the round is sized for a
             CPU: 10 clients x 4 steps, at most 256 sentences per module,
             300 rounds, evaluation every 25 (README: how long each takes)
  pretrain   reserve 20% of the training modules (a stable hash) for
             central pretraining; then fine-tune federated on the rest:
               python launch/pretrain.py --config=configs/lm/stdlib.py:\\
                   transformer,pretrain --workdir=runs/lm_pre
               python launch/train.py --config=configs/lm/stdlib.py:\\
                   transformer,fedadam,pretrain --workdir=runs/lm_ft \\
                   --config.init_checkpoint=runs/lm_pre
             (launch/pretrain.py trains on the reserved modules only.)

Vocabulary: SentencePiece BPE of 10,004 ids (10k + pad/bos/eos/oov) trained
on the training modules; 20-token sequences, at most 1,000 per module; 10%
of the modules held out for evaluation. `benchmarks/lm_study.py` runs a
CPU-sized version of this grid.
"""

import ml_collections

from fedjax_eff.experiment.defaults import base_config

_V = 10_004  # vocabulary: 10k words + pad, bos, eos, oov
_LM = dict(causal=True, tied_embeddings=True, max_len=64)
MODELS = {
    'transformer': ('transformer', dict(_LM, num_layers=4, d_model=208,
                                        num_heads=4, mlp_dim=832)),
    'transformer_1m': ('transformer', dict(_LM, num_layers=4, d_model=80,
                                           num_heads=2, mlp_dim=320)),
    'transformer_21m': ('transformer', dict(_LM, num_layers=5, d_model=512,
                                            num_heads=8, mlp_dim=2176)),
    'lstm': ('lstm_lm', dict(preset='stackoverflow')),
    'lstm_large': ('lstm_lm', dict(preset='large')),
    'conformer': ('conformer_lm', dict(_LM, num_layers=12, d_model=256,
                                       num_heads=4, mlp_dim=1024)),
}
# Reddi et al. (2021), Stack Overflow next-word prediction.
SERVERS = {'fedavg': (1.0, {}), 'fedadam': (1e-2, dict(eps=1e-5)),
           'fedyogi': (1e-2, dict(eps=1e-5))}
VARIANTS = ('partial', 'q8', 'q4', 'pretrain', 'paper')


def parse(spec: str) -> tuple[str, str, set[str]]:
  tokens = [t.strip() for t in (spec or '').split(',') if t.strip()]
  models = [t for t in tokens if t in MODELS]
  servers = [t for t in tokens if t in SERVERS]
  variants = {t for t in tokens if t in VARIANTS}
  unknown = set(tokens) - set(MODELS) - set(SERVERS) - variants
  if unknown or len(models) > 1 or len(servers) > 1 or (
      {'q8', 'q4'} <= variants):
    raise ValueError(
        f'config spec {spec!r}: give at most one model of {sorted(MODELS)}, '
        f'one server of {sorted(SERVERS)}, and variants from {VARIANTS} '
        f'(q8 or q4, not both); unknown: {sorted(unknown)}.')
  return (models[0] if models else 'transformer',
          servers[0] if servers else 'fedadam', variants)


def apply(c: ml_collections.ConfigDict, spec: str) -> ml_collections.ConfigDict:
  """Sets the model, server optimizer and variants of `spec` on `c`."""
  model, server, variants = parse(spec)
  name, kwargs = MODELS[model]
  c.model.name = name
  c.model.kwargs = ml_collections.ConfigDict(
      dict(kwargs, **({'vocab_size': _V} if name != 'lstm_lm' else {})))
  lr, server_kwargs = SERVERS[server]
  c.server.optimizer, c.server.learning_rate = server, lr
  c.server.optimizer_kwargs = ml_collections.ConfigDict(server_kwargs)
  c.techniques = []
  if 'partial' in variants:
    c.techniques.append(ml_collections.ConfigDict(dict(
        name='partial_training', mode='fixed', top_fraction=0.5,
        train_head=True, train_embed=False)))
  for bits in (8, 4):
    if f'q{bits}' in variants:
      c.techniques.append(ml_collections.ConfigDict(dict(
          name='quantize', bits=bits, block_size=256, download_bits=0)))
  if 'pretrain' in variants:
    c.data.pretrain_fraction = 0.2
  if 'paper' in variants:  # Reddi et al. (2021)'s Stack Overflow rounds
    c.num_rounds, c.clients_per_round = 1500, 50
    # One local epoch at batch 16 over at most 1,000 sequences per client
    # (TFF's max_elements_per_user): ceil(min(n, 1000) / 16) steps.
    c.client.epochs, c.client.max_examples = 1, 1000
    c.data.max_sequences = 1000
    c.eval_every = c.checkpoint_every = 50
    c.pretrain.steps = 5000
  c.spec = ','.join([model, server] + sorted(variants))
  return c


def get_config(spec: str = 'transformer,fedadam'):
  c = base_config()
  c.data.source = 'stdlib'
  c.data.seq_len = 20
  c.data.vocab_size = _V
  c.data.max_sequences = 256  # 'paper': 1000
  c.data.test_fraction = 0.1
  c.task.name = 'lm'
  c.num_rounds = 300  # 'paper': 1500
  c.clients_per_round = 10  # 'paper': 50
  c.client.optimizer, c.client.learning_rate = 'sgd', 10 ** -0.5
  c.client.local_steps, c.client.batch_size = 4, 16  # 'paper': 16, 16
  c.eval_every = 25  # 'paper': 50
  c.checkpoint_every = 25
  c.eval_batch_size = 512
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=64, optimizer='adam', learning_rate=1e-3,
      log_every=100, checkpoint_every=500))  # 'paper': 5000 steps
  return apply(c, spec)
