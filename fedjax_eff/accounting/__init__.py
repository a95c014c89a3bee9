"""Accounting: what one simulated device would pay for a round.

The simulator vmaps the client update over a cohort, so its own memory and
FLOPs say nothing about a single device. Here the single-client update
(`core.round.build_client_update`, no vmap) is compiled on its own and XLA's
analyses are read: the program a real device would run. Nothing is executed,
and arguments may be `jax.ShapeDtypeStruct`s, so models larger than this
machine's memory can be accounted for.

The numbers (`DeviceCost.as_dict()`):

  device_peak_bytes       compiled peak memory of one client update:
                          arguments + outputs + XLA's temp arena - aliased
                          (donated) bytes (`compiled.CompiledCost`).
  device_flops_per_round  XLA's FLOPs of the whole update, every local step
                          (S of them; per round, `Experiment.device_metrics`
                          charges each device its own steps,
                          `Cohort.steps_run`: with `client.epochs` or small
                          clients they vary).
  upload_bits             what the client sends up (`bits.leaf_bits`, or the
  download_bits           technique's count) and receives.
  analytic_*_bytes        one local step broken down by kind from shapes
                          (`analytic.AnalyticCost`): weights, gradients of
                          the trainable leaves, optimizer state of the
                          trainable leaves, activations autodiff saves for
                          the backward pass.

Caveats:

* FLOPs in loops: XLA's `cost_analysis` counts a while-loop body once, not
  per iteration (verified on CPU, JAX 0.10.2: a 4-step scan reports the
  FLOPs of 1 step). `measure` corrects this by compiling a twin with every
  `lax.scan` unrolled; `lax.while_loop`s (no static trip count) remain
  counted once and are reported in `CompiledCost.loops_counted_once`.
  Conditionals count their most expensive branch.
* Peak memory is a model of XLA's buffer assignment, not an allocator
  trace: arguments live for the whole call, the temp arena holds every
  intermediate packed by liveness, and an aliased output is not counted
  twice. XLA's own `peak_memory_in_bytes` is ignored: on CPU it is just
  arguments + outputs.
* Granularity: buffers are aligned and padded by the backend, so at tiny
  sizes the byte counts are dominated by padding and ratios between
  configurations mean little; account at realistic sizes. The CPU's numbers
  are the CPU compiler's buffer assignment; a phone's or a GPU's compiler
  schedules, fuses and rematerializes differently.
* Backends without a memory analysis (`memory_analysis()` is None or
  unimplemented) give None for every byte count, and None FLOPs without a
  cost analysis; `as_dict()` writes None (JSON null).
* The analytic breakdown counts every kind as live at once and saved
  residuals as JAX's autodiff emits them (less inputs and constants; XLA
  may still fuse some away, e.g. a ReLU mask into the matmul that made
  it): it explains the compiled peak, it does not reproduce it.
"""

from __future__ import annotations

from fedjax_eff.accounting.analytic import (AnalyticCost, analytic_cost,
                                            residual_bytes, trainable_flags)
from fedjax_eff.accounting.bits import bits_to_bytes, leaf_bits, tree_bytes
from fedjax_eff.accounting.compiled import (CompiledCost, DeviceCost,
                                            device_cost, measure,
                                            unrolled_flops)
from fedjax_eff.accounting.program import client_cost

__all__ = [
    'AnalyticCost', 'CompiledCost', 'DeviceCost', 'analytic_cost',
    'client_cost',
    'bits_to_bytes', 'device_cost', 'leaf_bits', 'measure', 'residual_bytes',
    'trainable_flags', 'tree_bytes', 'unrolled_flops',
]
