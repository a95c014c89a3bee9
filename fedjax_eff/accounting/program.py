"""The cost of one technique program on one device, from the real update.

`client_cost` builds the exact single-client update the simulator vmaps
(`core.round.build_client_update` with the technique as specialised for a
stage and tier), compiles it for abstract arguments of one client's shapes
and reads what XLA says it needs: peak memory of the whole local update (S
steps, optimizer state, upload encoding) and its FLOPs. FLOPs are those of
the one-step update times S (every local step runs the same program; the
once-per-round work, computing and encoding the delta, is a few FLOPs per
parameter and is counted S times: a slight overestimate that saves
compiling an S-step unrolled program). Bits up come from the leaves that actually train
(static mask; a dynamic mask counts as training: an upper bound), bits down
from the technique's `download` hook when it is static.

For techniques whose per-client choices are dynamic arrays (drawn subsets,
per-client gates), the compiled program is the simulator's exact-semantics
program, which computes full shapes: an upper bound on the device's cost.
Static programs (fixed subsets, layer-wise stages, last-n tiers, per-chunk
draws) are exactly what the device would run.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_eff.accounting import analytic as analytic_lib
from fedjax_eff.accounting import bits as bits_lib
from fedjax_eff.accounting import compiled as compiled_lib
from fedjax_eff.core import round as round_lib
from fedjax_eff.core import technique as technique_lib


def _spec(x) -> jax.ShapeDtypeStruct:
  x_shape, dtype = bits_lib.shape_dtype(x)
  return jax.ShapeDtypeStruct(x_shape, dtype)


def _client_args(tech, params, example_batch, steps, ctx):
  """Abstract arguments of one client's update with `steps` local steps
  (and the chunk plan it shares, for techniques that have one)."""
  batch = {k: _spec(v) for k, v in example_batch.items()}
  b = next(iter(batch.values())).shape[0]
  batches = {k: jax.ShapeDtypeStruct((steps,) + v.shape, v.dtype)
             for k, v in batch.items()}
  key = jax.eval_shape(lambda: jax.random.key(0))
  return (jax.tree.map(_spec, params), batches,
          jax.ShapeDtypeStruct((steps, b), jnp.float32),
          jax.tree.map(_spec, dict(ctx)), key,
          jax.ShapeDtypeStruct((), jnp.int32),
          jax.eval_shape(tech.chunk_plan, key, jax.ShapeDtypeStruct(
              (), jnp.int32)) if tech.chunk_plan else None)


def client_cost(model, task, technique: technique_lib.Technique,
                client_optimizer: optax.GradientTransformation, params,
                example_batch: Mapping[str, Any], local_steps: int,
                ctx: Mapping[str, Any] | None = None, prox_mu: float = 0.0,
                analytic: bool = True) -> compiled_lib.DeviceCost:
  """`DeviceCost` of one client running `technique` (already specialised).

  Args:
    model, task, client_optimizer, prox_mu: as for `core.build_round`.
    technique: the program one device runs (`tech.specialize(stage, tier)`
      for staged or tiered techniques).
    params: server params (arrays or ShapeDtypeStructs).
    example_batch: feature -> one batch `[B, ...]` (arrays or specs).
    local_steps: S.
    ctx: one client's context (e.g. `{'client_index': 0}`), arrays or specs.
  """
  tech = technique_lib.chain(technique)
  ctx = {k: np.asarray(v) if isinstance(v, (int, float)) else v
         for k, v in (ctx or {'client_index': np.int32(0)}).items()}
  ctx = technique_lib.with_initial_state(
      tech, jax.tree.map(_spec, params), ctx)
  update = round_lib.build_client_update(model, task, tech, client_optimizer,
                                         prox_mu)
  args = _client_args(tech, params, example_batch, local_steps, ctx)
  memory = compiled_lib.measure(update, *args, unroll_scans=False)
  f1, _, _ = compiled_lib.unrolled_flops(
      update, *_client_args(tech, params, example_batch, 1, ctx))
  flops = None if f1 is None else f1 * local_steps

  found = technique_lib.trace_plan(tech, args[0], args[3])
  upload = found['upload_bits']
  if upload is None:  # a dynamic count: every trainable leaf in fp32
    upload = bits_lib.leaf_bits(found['view'], found['flags'])
  download = found['download_bits']
  if download is None:
    download = bits_lib.leaf_bits(found['view'])
  breakdown = None
  if analytic:
    loss_fn = round_lib.make_loss_fn(model, task, 0.0)
    fwd = found['forward']
    batch = {k: _spec(v) for k, v in example_batch.items()}
    b = next(iter(batch.values())).shape[0]
    breakdown = analytic_lib.analytic_cost(
        lambda p, batch, mask_b, rng: loss_fn(p, batch, mask_b, rng, p, fwd),
        found['view'], found['flags'], client_optimizer, batch,
        jax.ShapeDtypeStruct((b,), jnp.float32),
        jax.eval_shape(lambda: jax.random.key(0)), has_aux=True)
  return compiled_lib.DeviceCost(memory.peak_bytes, flops, upload, download,
                                 breakdown)
