"""The base config every `configs/*.py` starts from and overrides.

Every key a run reads exists here, so `--config.KEY=VALUE` overrides are
type-checked by ml_collections and a misspelt key is an error naming it.
"""

from __future__ import annotations

import ml_collections

from fedjax_eff.data import registry as data_registry


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_rounds = 100
  c.clients_per_round = 10
  # Clients per vmapped chunk; 0 = per-backend default (1 on CPU, where a
  # scan over clients is fastest; up to 128 on GPU/TPU).
  c.chunk_size = 0

  c.data = data_registry.default_config()  # the data contract, one place

  c.model = ml_collections.ConfigDict(dict(
      name='cnn',             # logreg | mlp | cnn
      kwargs=ml_collections.ConfigDict(),
  ))

  c.client = ml_collections.ConfigDict(dict(
      optimizer='sgd',
      learning_rate=0.1,
      optimizer_kwargs=ml_collections.ConfigDict(),
      local_steps=4,          # S: local steps per round
      batch_size=16,          # B
      policy_large='subsample',  # clients with > S*B examples
      policy_small='pad',     # clients with < S*B examples: pad | repeat
      weighting='num_examples',  # aggregation weight: num_examples | uniform
      prox_mu=0.0,            # FedProx proximal term (0 = off)
  ))

  c.server = ml_collections.ConfigDict(dict(
      optimizer='fedavg',     # fedavg fedavgm fedadam fedyogi fedadagrad | optax
      learning_rate=1.0,
      optimizer_kwargs=ml_collections.ConfigDict(),
  ))

  # Techniques, composed in order (see fedjax_eff/techniques). Empty: FedAvg.
  c.techniques = []

  c.eval_every = 10
  c.eval_batch_size = 256
  c.checkpoint_every = 10
  c.checkpoint_keep = 3
  c.progress = True
  c.tensorboard = True
  return c
