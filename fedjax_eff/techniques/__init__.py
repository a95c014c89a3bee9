"""The technique registry: config entries -> one composed `Technique`.

`config.techniques` is a list (in the spirit of `optax.chain`); each entry
is a ConfigDict with a `name` and that technique's knobs. Later techniques
register here; the round builder never changes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from fedjax_eff.core.technique import Technique, chain, identity

REGISTRY: dict[str, Callable[..., Technique]] = {'identity': identity}


def build(entries: Iterable[Any] | None) -> Technique:
  """Builds the composed technique from `config.techniques` entries."""
  techniques = []
  for i, entry in enumerate(entries or ()):
    entry = dict(entry)
    name = entry.pop('name', None)
    if name not in REGISTRY:
      raise ValueError(f'config.techniques[{i}].name={name!r} is not one of '
                       f'{sorted(REGISTRY)}.')
    techniques.append(REGISTRY[name](**entry))
  return chain(*techniques)
