"""Config checks that fail early with the offending key in the message."""

from __future__ import annotations

import math

import ml_collections
from ml_collections.config_flags import config_path

from fedjax_eff.experiment.workdir import flatten
from fedjax_eff.privacy import setup as privacy_setup

_POSITIVE_INTS = ('num_rounds', 'clients_per_round', 'client.local_steps',
                  'server.lr_reference_clients',
                  'client.batch_size', 'eval_every', 'checkpoint_every',
                  'checkpoint_keep',
                  'eval_batch_size', 'data.num_clients')
_NON_NEGATIVE = ('client.prox_mu', 'client.epochs', 'client.max_examples',
                 'data.heldout_clients',
                 'local.num_clients', 'max_failed_rounds', 'data.nan_clients')
_CHOICES = {
    'client.policy_large': ('subsample', 'error'),
    'client.policy_small': ('pad', 'repeat'),
    'client.weighting': ('num_examples', 'uniform'),
    'server.lr_scaling': ('none', 'sqrt', 'linear'),
    'mode': ('federated', 'local', 'fedbuff'),
    'data_placement': ('auto', 'device', 'host'),
}
_AT_LEAST_MINUS_ONE = ('chunk_size', 'mesh_clients',  # -1: auto / all
                       'mesh_replicas')


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
  for key in _AT_LEAST_MINUS_ONE:
    v = _get(config, key)
    if not isinstance(v, int) or v < -1:
      raise ValueError(f'config.{key} must be an integer >= -1, got {v!r}.')
  for key, choices in _CHOICES.items():
    v = _get(config, key)
    if v not in choices:
      raise ValueError(f'config.{key} must be one of {choices}, got {v!r}.')
  for key in ('client.epochs', 'client.max_examples'):
    if not isinstance(_get(config, key), int):
      raise ValueError(f'config.{key} must be an integer, got '
                       f'{_get(config, key)!r}.')
  limit = config.get('client_state_limit_gib', 4.0)
  if not isinstance(limit, (int, float)) or not limit > 0:
    raise ValueError('config.client_state_limit_gib must be > 0 (GiB), got '
                     f'{limit!r}.')
  if config.local.num_clients > config.data.num_clients:
    raise ValueError(
        f'config.local.num_clients={config.local.num_clients} is more than '
        f'config.data.num_clients={config.data.num_clients}.')
  if config.clients_per_round > config.data.num_clients:
    raise ValueError(
        f'config.clients_per_round={config.clients_per_round} is more than '
        f'config.data.num_clients={config.data.num_clients}.')
  check_numbers(config)
  if 'privacy' in config:
    privacy_setup.validate(config)
  check_devices(config)


def check_devices(config) -> None:
  """config.devices: the simulated devices' knobs."""
  d = config.devices
  if d.get('profiles', 'none') == 'none':
    return
  for key in ('jitter', 'over_selection', 'deadline_seconds'):
    if not d[key] >= 0:
      raise ValueError(f'config.devices.{key} must be >= 0, got {d[key]!r}.')
  if not 0 <= d.failure_probability < 1:
    raise ValueError('config.devices.failure_probability must be in [0, 1), '
                     f'got {d.failure_probability!r}.')
  if config.get('sampling', 'fixed') != 'fixed':
    raise ValueError('config.devices.profiles samples the clients that are '
                     "online: config.sampling must be 'fixed', got "
                     f'{config.sampling!r}.')
  if config.mode == 'local':
    raise ValueError("config.devices.profiles needs config.mode='federated' "
                     "or 'fedbuff'.")


# A learning rate above this is a typo, not a setting: with it one step
# moves a weight by thousands of times its gradient and overflows float32
# within a few rounds.
MAX_LEARNING_RATE = 1e3


def check_numbers(config: ml_collections.ConfigDict) -> None:
  """Every float in the config is finite; every `*learning_rate` lies in
  (0, MAX_LEARNING_RATE]."""
  for key, v in flatten(config.to_dict()).items():
    values = v if isinstance(v, (list, tuple)) else [v]
    for x in values:
      if isinstance(x, dict):
        check_numbers(ml_collections.ConfigDict(x))
        continue
      if isinstance(x, float) and not math.isfinite(x):
        raise ValueError(f'config.{key}={x!r} must be a finite number.')
    if key.endswith('learning_rate') and isinstance(v, (int, float)):
      if not 0 < v <= MAX_LEARNING_RATE:
        raise ValueError(
            f'config.{key}={v!r} must be > 0 and at most '
            f'{MAX_LEARNING_RATE:g} (a larger rate overflows float32 '
            'within a few steps).')


def find_unknown_overrides(argv) -> list[str]:
  """Dotted keys of `--config.KEY=VALUE` arguments the config lacks.

  Loads the config file named by `--config=PATH` the way ml_collections
  does, so a misspelt override is reported by name before flag parsing.
  """
  return [key for key, _ in unknown_overrides(argv)]


def unknown_overrides(argv) -> list[tuple[str, str | None]]:
  """`(key, closest known key or None)` for each `--config.KEY` override
  of `argv` that the config named by `--config=PATH` lacks."""
  config, overrides = _config_and_overrides(argv)
  if config is None:
    return []
  unknown = [key for key in overrides if not _has_key(config, key)]
  keys = dotted_keys(config) if unknown else []
  return [(key, suggest(key, keys)) for key in unknown]


def suggest(word: str, candidates) -> str | None:
  """The candidate closest to `word` (difflib), or None if none is close."""
  import difflib  # pylint: disable=g-import-not-at-top
  close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
  return close[0] if close else None


def dotted_keys(node, prefix: str = '') -> list[str]:
  """Every key a `--config.KEY` override may name: `a`, `a.b`, and
  `a[0].b` inside lists of dicts."""
  out = []
  if isinstance(node, (dict, ml_collections.ConfigDict)):
    for k in node.keys():
      key = f'{prefix}.{k}' if prefix else str(k)
      out.append(key)
      out.extend(dotted_keys(node[k], key))
  elif isinstance(node, (list, tuple)) and prefix:
    for i, item in enumerate(node):
      if isinstance(item, (dict, ml_collections.ConfigDict)):
        out.extend(dotted_keys(item, f'{prefix}[{i}]'))
  return out


def _has_key(config, key: str) -> bool:
  node = config
  try:
    parts = config_path.split(key)
  except ValueError:
    return False
  for part in parts:
    if isinstance(node, (dict, ml_collections.ConfigDict)) and part in node:
      node = node[part]
    elif (isinstance(node, (list, tuple)) and isinstance(part, int)
          and -len(node) <= part < len(node)):
      node = node[part]  # --config.techniques[0].p=...
    else:
      return False
  return True


def _config_and_overrides(argv):
  """(the config `--config=PATH[:arg]` builds, or None; the override keys)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, overrides = None, []
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith('--config='):
      path = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      path = argv[i + 1]
    elif arg.startswith('--config.'):
      overrides.append(arg[len('--config.'):].split('=', 1)[0])
  if not path or not overrides:
    return None, overrides
  path, _, arg = path.partition(':')  # 'configs/x.py:arg' -> get_config(arg)
  spec = importlib.util.spec_from_file_location('_fedjax_eff_cfg', path)
  if spec is None or spec.loader is None:
    return None, overrides
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    config = module.get_config(*((arg,) if arg else ()))
  except Exception:  # pylint: disable=broad-except
    return None, overrides  # let ml_collections report a broken config
  return config, overrides
