"""Config checks that fail early with the offending key in the message."""

from __future__ import annotations

import ml_collections

_POSITIVE_INTS = ('num_rounds', 'clients_per_round', 'client.local_steps',
                  'client.batch_size', 'eval_every', 'checkpoint_every',
                  'eval_batch_size', 'data.num_clients')
_NON_NEGATIVE = ('chunk_size', 'client.prox_mu', 'data.heldout_clients')
_CHOICES = {
    'client.policy_large': ('subsample', 'error'),
    'client.policy_small': ('pad', 'repeat'),
    'client.weighting': ('num_examples', 'uniform'),
}


def _get(config, dotted):
  node = config
  for part in dotted.split('.'):
    if part not in node:
      raise ValueError(f'config.{dotted} is missing from the config.')
    node = node[part]
  return node


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises `ValueError('config.KEY ...')` for impossible settings."""
  for key in _POSITIVE_INTS:
    v = _get(config, key)
    if not isinstance(v, int) or v < 1:
      raise ValueError(f'config.{key} must be a positive integer, got {v!r}.')
  for key in _NON_NEGATIVE:
    v = _get(config, key)
    if v < 0:
      raise ValueError(f'config.{key} must be >= 0, got {v!r}.')
  for key, choices in _CHOICES.items():
    v = _get(config, key)
    if v not in choices:
      raise ValueError(f'config.{key} must be one of {choices}, got {v!r}.')
  if config.clients_per_round > config.data.num_clients:
    raise ValueError(
        f'config.clients_per_round={config.clients_per_round} is more than '
        f'config.data.num_clients={config.data.num_clients}.')
  if _get(config, 'client.learning_rate') <= 0:
    raise ValueError('config.client.learning_rate must be > 0, got '
                     f'{config.client.learning_rate!r}.')
