"""Budget-aware training of the last n layers (Pfeiffer et al. 2024,
arXiv 2411.07826, "constraint-aware fine-tuning").

Each device tier has budgets: peak training memory, FLOPs per round and
upload bytes. A device trains the last n layers of the model (and the head)
with the rest frozen, so backward stops n layers from the output: memory
(no activations kept below), FLOPs (no backward below) and upload (only
those layers) all fall with n. For every tier the largest n whose
*measured* cost fits every budget is chosen: the cost of each n comes from
compiling that device program and reading XLA's memory and cost analyses
(`accounting.client_cost`), not from a formula.

Tiers are static programs (DESIGN.md, "Heterogeneous devices"): clients of
different tiers run different compiled programs in the same round, and the
server averages each layer over the clients that trained it (layer-wise
weighted averaging, the round's per-parameter coverage).
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

from absl import logging

from fedjax_eff.core.technique import Technique
from fedjax_eff.models.structure import supported_forward
from fedjax_eff.techniques import structure as structure_lib


class Budget(NamedTuple):
  """A device tier's limits; None = unlimited."""
  memory_bytes: float | None = None
  flops_per_round: float | None = None
  upload_bytes: float | None = None

  def fits(self, cost) -> bool:
    return ((self.memory_bytes is None
             or cost.peak_bytes <= self.memory_bytes)
            and (self.flops_per_round is None
                 or cost.flops_per_round <= self.flops_per_round)
            and (self.upload_bytes is None
                 or cost.upload_bits / 8 <= self.upload_bytes))


def last_n_names(model, n: int, train_head: bool = True) -> set[str]:
  s = structure_lib.structure_of(model)
  if not 0 <= n <= s.num_layers:
    raise ValueError(f'last n={n} is not in [0, {s.num_layers}].')
  names = set(s.layers[s.num_layers - n:]) | (set(s.head) if train_head
                                              else set())
  if n == s.num_layers:
    names |= set(s.embed)
  return names


def last_n(model, n: int | Sequence[int], train_head: bool = True
           ) -> Technique:
  """Trains the last `n` layers (+ head); `n` may be one int per tier."""
  s = structure_lib.structure_of(model)
  per_tier = (int(n),) if isinstance(n, int) else tuple(int(i) for i in n)
  programs = []
  for k in per_tier:
    names = last_n_names(model, k, train_head)
    if not names:
      raise ValueError('last_n with n=0 and train_head=False trains nothing.')
    lowest = s.num_layers - k
    fwd = supported_forward(
        model, stop_below=lowest if 0 < lowest < s.num_layers else None)
    programs.append(Technique(
        name=f'last_{k}',
        trainable=lambda params, plan, names=names: structure_lib.names_mask(
            params, names),
        forward=lambda plan, fwd=fwd: fwd))

  def specialize(stage, tier):
    del stage
    if not 0 <= tier < len(programs):
      raise ValueError(f'tier {tier} has no n (last_n has {len(programs)}).')
    return programs[tier]

  return Technique(name='last_n' + '_'.join(map(str, per_tier)),
                   specialize=specialize)


def choose_n(budgets: Sequence[Budget], num_layers: int,
             cost_of_n: Callable[[int], object]) -> tuple[list[int], dict]:
  """Largest n per budget whose measured cost fits; and the cost table.

  Costs are monotone in n in practice but the search does not assume it:
  every n in [0, L] is measured once (cached) and the largest fitting one
  is taken. Raises if a tier cannot train even the head alone.
  """
  table = {n: cost_of_n(n) for n in range(num_layers + 1)}
  chosen = []
  for t, b in enumerate(budgets):
    fits = [n for n, c in table.items() if b.fits(c)]
    if not fits:
      c = table[0]
      raise ValueError(
          f'device tier {t} budget {b} cannot train even the head alone '
          f'(peak {c.peak_bytes} B, {c.flops_per_round:.3g} FLOPs, '
          f'{c.upload_bits / 8:.0f} B up).')
    chosen.append(max(fits))
  return chosen, table


def budgeted_last_n(model, budgets: Sequence[Mapping | Budget],
                    measure: Callable[[Technique], object],
                    train_head: bool = True) -> Technique:
  """`last_n` with each tier's n chosen from its budget by measured cost.

  `measure(technique) -> accounting.DeviceCost` compiles the device program
  of a (static) technique; the experiment provides it
  (`techniques.TechniqueContext.measure`).
  """
  budgets = [b if isinstance(b, Budget) else Budget(**dict(b))
             for b in budgets]
  s = structure_lib.structure_of(model)
  chosen, table = choose_n(
      budgets, s.num_layers,
      lambda n: measure(last_n(model, n, train_head).specialize(None, 0)))
  for n, c in table.items():
    logging.info('last_n n=%d: peak %s B, %.4g FLOPs/round, %d B up', n,
                 c.peak_bytes, c.flops_per_round or 0, c.upload_bits // 8)
  logging.info('last_n: n per tier %s for budgets %s', chosen, budgets)
  return last_n(model, chosen, train_head)
