"""What XLA says one program costs: FLOPs and memory of the compiled program.

`measure(fn, *args)` lowers and compiles `fn` for the shapes of `args` and
reads the compiler's analyses; nothing runs and nothing is allocated, so
`args` may be `jax.ShapeDtypeStruct`s of models that would not fit here.

Two corrections to the raw numbers, both verified on CPU with JAX 0.10.2:

* Loops. `cost_analysis()` counts the ops of a while-loop body once, not
  once per iteration: a `lax.scan` of 4 matmuls reports the FLOPs of 1. The
  local steps of a client update are such a scan, so the raw count would
  be that of one step. `measure` therefore compiles a second program for the
  FLOPs, in which every `lax.scan` (also `fori_loop` with static bounds,
  which lowers to scan) is fully unrolled: the same ops, straight-line, so
  XLA counts each iteration. Memory comes from the program as written (the
  rolled one is what a device would run; unrolling can change buffer reuse).
  The second compile costs compile time that grows with the trip counts
  (fine for the handful of local steps of cross-device FL); pass
  `unroll_scans=False` to skip it. A `lax.while_loop` has no static trip
  count and stays rolled, as does a scan whose unrolled body would exceed
  `MAX_UNROLLED_EQNS` (e.g. CTC's recursion over frames):
  `loops_counted_once` says how many there are, and their bodies are
  counted once in `flops`.
* Conditionals. `lax.cond`/`switch` are counted as their most expensive
  branch (XLA's choice), an upper bound on what a client executes.

Peak memory is `argument + output + temp - alias` (see `CompiledCost`).
XLA's own `peak_memory_in_bytes` is not used: on CPU it reports arguments +
outputs only, without the temporaries.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from jax.extend import core as jex_core

from fedjax_eff.accounting.analytic import AnalyticCost


class CompiledCost(NamedTuple):
  """Costs of one compiled program, as XLA analyses it.

  flops: floating-point operations of one call, with scans unrolled
    (`compiled.py` module docstring); None if the backend has no cost
    analysis.
  argument_bytes: the program's inputs (for a client update: the server
    model, the client's batches, ...).
  output_bytes: buffers the program returns.
  temp_bytes: XLA's scratch arena for every intermediate (activations,
    gradients, optimizer state inside the step). Buffer assignment already
    packs intermediates by liveness, so this is the *peak* of
    intermediates, not their sum.
  alias_bytes: outputs written in place into (donated) input buffers.
  generated_code_bytes: the executable's code (0 on CPU).
  peak_bytes: `argument + output + temp - alias`: inputs are live for the
    whole call, outputs and the scratch arena are allocated by the program,
    and an aliased output occupies its input's buffer, so it is subtracted
    once not to count it twice. An upper bound in one way (it assumes every
    output is live from the start) and exact in the others.
  xla_flops: `cost_analysis()` of the program as written (loop bodies
    counted once).
  loops_counted_once: `while_loop`s that could not be unrolled.

  The byte fields are None where the backend has no memory analysis
  (`memory_analysis()` returns None or is unimplemented).
  """
  flops: float | None
  argument_bytes: int | None
  output_bytes: int | None
  temp_bytes: int | None
  alias_bytes: int | None
  generated_code_bytes: int | None
  peak_bytes: int | None
  xla_flops: float | None
  loops_counted_once: int


def _jit(fn: Callable[..., Any]) -> Any:
  """`fn` itself if already jitted (its donation/static args are kept)."""
  return fn if hasattr(fn, 'lower') else jax.jit(fn)


def compiled_flops(compiled: Any) -> float | None:
  """Sum of 'flops' in `compiled.cost_analysis()`.

  JAX 0.10 returns one dict; older versions a list of dicts (one per
  module), and some backends None or an exception.
  """
  try:
    analysis = compiled.cost_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if analysis is None:
    return None
  if isinstance(analysis, dict):
    analysis = [analysis]
  values = [d['flops'] for d in analysis if d and 'flops' in d]
  return float(sum(values)) if values else None


def _memory(compiled: Any) -> tuple[int | None, ...]:
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    m = None
  if m is None:
    return (None,) * 6
  arg, out = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
  temp, alias = int(m.temp_size_in_bytes), int(m.alias_size_in_bytes)
  return (arg, out, temp, alias, int(m.generated_code_size_in_bytes),
          arg + out + temp - alias)


def _unroll_value(v: Any, counts: list[int]) -> Any:
  if isinstance(v, jex_core.ClosedJaxpr):
    return v.replace(jaxpr=_unroll_jaxpr(v.jaxpr, counts))
  if isinstance(v, jex_core.Jaxpr):
    return _unroll_jaxpr(v, counts)
  if isinstance(v, (tuple, list)) and any(
      isinstance(x, (jex_core.ClosedJaxpr, jex_core.Jaxpr)) for x in v):
    return type(v)(_unroll_value(x, counts) for x in v)
  return v


# A scan is unrolled only if its unrolled body stays this small (trip count
# x equations in the body). Longer ones are cheap recurrences in practice
# (CTC's forward-backward over ~70 frames: unrolled, XLA:CPU took > 5 min and
# 11 GB to compile it) and stay rolled, counted once like a while loop.
MAX_UNROLLED_EQNS = 1024


def _unroll_jaxpr(jaxpr: Any, counts: list[int]) -> Any:
  """`jaxpr` with every scan (nested ones too) fully unrolled, up to
  `MAX_UNROLLED_EQNS`.

  counts: [scans unrolled, loops left rolled], updated in place.
  """
  eqns = []
  for eqn in jaxpr.eqns:
    params = {k: _unroll_value(v, counts) for k, v in eqn.params.items()}
    if eqn.primitive.name == 'scan':
      length = int(params['length'])
      if length * len(params['jaxpr'].jaxpr.eqns) <= MAX_UNROLLED_EQNS or (
          length <= 1):
        counts[0] += 1
        params['unroll'] = max(length, 1)
      else:
        counts[1] += 1
    elif eqn.primitive.name == 'while':
      counts[1] += 1
    eqns.append(eqn.replace(params=params))
  return jaxpr.replace(eqns=eqns)


def _is_dynamic(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic,
                        jax.ShapeDtypeStruct))


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


def unrolled_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any
                   ) -> tuple[float | None, int, int]:
  """(flops with scans unrolled, scans unrolled, loops left rolled).

  Traces `fn` to a jaxpr, rewrites each scan to `unroll=length` and compiles
  the result. Array and ShapeDtypeStruct leaves of the arguments stay
  inputs; other leaves (Python scalars, strings) are baked in as constants.
  When there is no scan the FLOPs are None (nothing to correct).
  """
  flat, tree = jax.tree.flatten((args, kwargs))
  dynamic = [i for i, x in enumerate(flat) if _is_dynamic(x)]

  def flat_fn(*values):
    full = list(flat)
    for i, v in zip(dynamic, values):
      full[i] = v
    a, k = jax.tree.unflatten(tree, full)
    return fn(*a, **k)

  avals = [_abstract(flat[i]) for i in dynamic]
  closed = jax.make_jaxpr(flat_fn)(*avals)
  counts = [0, 0]
  unrolled = closed.replace(jaxpr=_unroll_jaxpr(closed.jaxpr, counts))
  if not counts[0]:
    return None, 0, counts[1]
  compiled = jax.jit(jex_core.jaxpr_as_fun(unrolled)).lower(*avals).compile()
  return compiled_flops(compiled), counts[0], counts[1]


def measure(fn: Callable[..., Any], *args: Any, unroll_scans: bool = True,
            **kwargs: Any) -> CompiledCost:
  """Compiles `fn(*args, **kwargs)` (never runs it) and reads XLA's costs.

  Args:
    fn: any JAX function; if already `jax.jit`-wrapped, its own options
      (donation, static arguments) are used for the memory numbers.
    *args, **kwargs: arrays or `jax.ShapeDtypeStruct`s (pytrees of them).
    unroll_scans: correct the FLOPs for loop bodies counted once by
      compiling a scan-unrolled twin (module docstring). False: `flops` is
      XLA's raw count.
  """
  compiled = _jit(fn).lower(*args, **kwargs).compile()
  xla_flops = compiled_flops(compiled)
  flops, loops_once = xla_flops, 0
  if unroll_scans:
    unrolled, _, loops_once = unrolled_flops(fn, *args, **kwargs)
    if unrolled is not None:
      flops = unrolled
  return CompiledCost(flops, *_memory(compiled), xla_flops, loops_once)


def _json_number(x: Any) -> int | float | None:
  if x is None:
    return None
  x = np.asarray(x).item()
  return int(x) if float(x).is_integer() else float(x)


class DeviceCost(NamedTuple):
  """What one simulated device pays per round.

  peak_bytes: compiled peak memory of the single-client update
    (`CompiledCost.peak_bytes`).
  flops_per_round: compiled FLOPs of that update, all local steps
    (`CompiledCost.flops`).
  upload_bits / download_bits: what travels (e.g. `bits.leaf_bits`, or the
    bits the technique reports).
  analytic: the per-kind breakdown of one local step (`AnalyticCost`), or
    None.
  sent_bytes: what the compiled device program returns, less what it
    writes in place of its inputs (its client state): the packed upload
    (`accounting.program.build_device_program`); None if unknown.
  """
  peak_bytes: int | None
  flops_per_round: float | None
  upload_bits: int | float | None
  download_bits: int | float | None
  analytic: AnalyticCost | None = None
  sent_bytes: int | None = None

  @property
  def training_state_bytes(self) -> int | None:
    """What training keeps besides the weights and the data (analytic, one
    local step): gradients + optimizer state + activations saved for the
    backward pass."""
    a = self.analytic
    if a is None:
      return None
    return a.gradient_bytes + a.optimizer_state_bytes + a.activation_bytes

  def as_dict(self) -> dict[str, int | float | None]:
    """Flat, JSON-friendly numbers (None where unknown)."""
    a = self.analytic
    analytic = {
        'analytic_weights_bytes': 'weights_bytes',
        'analytic_gradient_bytes': 'gradient_bytes',
        'analytic_optimizer_bytes': 'optimizer_state_bytes',
        'analytic_activation_bytes': 'activation_bytes',
    }
    return {
        'device_peak_bytes': _json_number(self.peak_bytes),
        'device_flops_per_round': _json_number(self.flops_per_round),
        'upload_bits': _json_number(self.upload_bits),
        'download_bits': _json_number(self.download_bits),
        'device_sent_bytes': _json_number(self.sent_bytes),
        'training_state_bytes': _json_number(self.training_state_bytes),
        **{key: None if a is None else _json_number(getattr(a, field))
           for key, field in analytic.items()},
    }


def device_cost(client_update: Callable[..., Any], *args: Any,
                upload_bits: int | float | None,
                download_bits: int | float | None,
                analytic: AnalyticCost | None = None,
                unroll_scans: bool = True, **kwargs: Any) -> DeviceCost:
  """`DeviceCost` of one client: `measure(client_update, *args)` + the rest.

  `args` are one client's arguments without the client axis, e.g.
  `(server_params, batches [S, B, ...], mask [S, B], ctx, key, round_num)`
  for `core.round.build_client_update`, as ShapeDtypeStructs or arrays.
  """
  cost = measure(client_update, *args, unroll_scans=unroll_scans, **kwargs)
  return DeviceCost(cost.peak_bytes, cost.flops, upload_bits, download_bits,
                    analytic)
