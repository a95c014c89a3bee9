"""The cost of one technique program on one device: the program it runs.

`client_cost` compiles what a device runs (`build_device_program`, built on
`core.round.build_device_update`, the very function the simulator's round
vmaps): it takes the downloaded view (a sub-model for federated dropout),
the client's batches, its plan and keys, and returns only what the device
uploads, as bytes (`codecs.pack`), plus its client state written in place.
Nothing at server shape enters or leaves it; scattering the update to
server shape, coverage and metrics are the server's. The compiled
program's outputs therefore equal the upload (`DeviceCost.sent_bytes`;
tests/test_device_program.py checks every registered technique and tier).

Peak memory is that of the whole local update (S steps, optimizer state,
upload encoding). FLOPs are those of the one-step program times S (every
local step runs the same program; the once-per-round work, computing and
encoding the delta, is a few FLOPs per parameter and is counted S times: a
slight overestimate that saves compiling an S-step unrolled program). Bits
up come from the encoder's message (static counts), bits down from the
technique's `download` hook when it is static.

For techniques whose per-client choices are dynamic arrays (drawn subsets,
per-client gates), callers account `technique.device_program(t)`: the
static program of a typical device. Given a dynamic program, the compiled
program is the simulator's exact-semantics one (full shapes): an upper
bound on the device's cost.
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
from fedjax_eff.core import codecs
from fedjax_eff.core import round as round_lib
from fedjax_eff.core import technique as technique_lib


def _spec(x) -> jax.ShapeDtypeStruct:
  x_shape, dtype = bits_lib.shape_dtype(x)
  return jax.ShapeDtypeStruct(x_shape, dtype)


def _traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def device_arguments(tech, params, example_batch, steps, ctx):
  """Abstract arguments of one device's program with `steps` local steps:
  `(view, batches, mask, plan, train_key, encode_key)` as
  `core.round.build_device_update` takes them.

  The view and the plan are traced from the server params the way the
  round makes them (round 0, the chunk plan the client shares). A plan
  leaf computed from traced values becomes a `ShapeDtypeStruct` (an input
  of the program); a Python or NumPy leaf stays the constant it is (a
  static choice the program is specialised for).
  """
  found = {}

  def probe(server_params, ctx):
    round_num = jnp.zeros((), jnp.int32)
    if tech.chunk_plan:
      ctx = dict(ctx, chunk=tech.chunk_plan(jax.random.key(1), round_num))
    ctx = technique_lib.with_initial_state(tech, server_params, ctx)
    plan = tech.plan(jax.random.key(0), round_num, ctx)
    found['plan'] = jax.tree.map(
        lambda x: _spec(x) if _traced(x) else x, plan)
    found['view'] = jax.tree.map(_spec, tech.view(server_params, plan))
    return 0
  jax.eval_shape(probe, jax.tree.map(_spec, params),
                 jax.tree.map(lambda x: x if _traced(x) else _spec(x), ctx))
  batch = {k: _spec(v) for k, v in example_batch.items()}
  b = next(iter(batch.values())).shape[0]
  batches = {k: jax.ShapeDtypeStruct((steps,) + v.shape, v.dtype)
             for k, v in batch.items()}
  key = jax.eval_shape(lambda: jax.random.key(0))
  return (found['view'], batches,
          jax.ShapeDtypeStruct((steps, b), jnp.float32), found['plan'], key,
          key)


def _split_plan(plan):
  """(its input leaves, a function rebuilding the plan from them)."""
  leaves, treedef = jax.tree.flatten(plan)
  index = [i for i, x in enumerate(leaves)
           if isinstance(x, jax.ShapeDtypeStruct)]

  def rebuild(inputs):
    full = list(leaves)
    for i, x in zip(index, inputs):
      full[i] = x
    return treedef.unflatten(full)
  return [leaves[i] for i in index], rebuild


def build_device_program(model, task, technique, client_optimizer,
                         plan_template, prox_mu: float = 0.0):
  """What a device runs, as one program to compile:

    (view, batches, mask, plan inputs, train_key, encode_key)
        -> (packed message, feedback, new client state)

  The message leaves as bytes (`codecs.pack`: each sent Wire's values at
  its bits, e.g. 4-bit codes two to a byte, top-k indices at ceil(log2 n)
  bits), the feedback in fp32, so the program's outputs are exactly what
  the device uploads; the client state is written in place of the state it
  read (the plan is donated: XLA aliases it). Decoding, scattering to
  server shape, coverage and metrics are the server's.
  """
  update = round_lib.build_device_update(model, task, technique,
                                         client_optimizer, prox_mu)
  _, rebuild = _split_plan(plan_template)

  def program(view, batches, mask, plan_inputs, train_key, encode_key):
    out = update(view, batches, mask, rebuild(plan_inputs), train_key,
                 encode_key)
    return codecs.pack(out.message), out.feedback, out.client_state
  return program


# XLA returns several outputs as a tuple: a table of one pointer per buffer,
# counted in `output_size_in_bytes` (measured on CPU, JAX 0.10.2: outputs
# of 40 + 40 bytes report 96).
POINTER_BYTES = 8


def _tuple_table_bytes(outputs) -> int:
  n = len(jax.tree.leaves(outputs))
  return POINTER_BYTES * n if n > 1 else 0


def client_cost(model, task, technique: technique_lib.Technique,
                client_optimizer: optax.GradientTransformation, params,
                example_batch: Mapping[str, Any], local_steps: int,
                ctx: Mapping[str, Any] | None = None, prox_mu: float = 0.0,
                analytic: bool = True) -> compiled_lib.DeviceCost:
  """`DeviceCost` of one client running `technique` (already specialised).

  Compiles the device program (`build_device_program`) for one client's
  abstract arguments: peak memory from the S-step program, FLOPs from the
  one-step program (unrolled) times S, `sent_bytes` = XLA's output bytes
  less the output tuple's pointer table and the client state the device
  keeps: the packed upload and its feedback.

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

  def args_for(steps):
    view, batches, mask, plan, k1, k2 = device_arguments(
        tech, params, example_batch, steps, ctx)
    inputs, _ = _split_plan(plan)
    return plan, (view, batches, mask, inputs, k1, k2)
  plan, args = args_for(local_steps)
  program = build_device_program(model, task, tech, client_optimizer, plan,
                                 prox_mu)
  memory = compiled_lib.measure(jax.jit(program, donate_argnums=(3,)), *args,
                                unroll_scans=False)
  # One step (run as it is, no loop; an inner scan unrolled) times S.
  f1 = compiled_lib.measure(program, *args_for(1)[1]).flops
  flops = None if f1 is None else f1 * local_steps
  sent = None
  if memory.output_bytes is not None:
    packed, feedback, state = jax.eval_shape(program, *args)
    sent = memory.output_bytes - _tuple_table_bytes(
        (packed, feedback, state)) - bits_lib.tree_bytes(state)

  found = technique_lib.trace_plan(tech, params, ctx)
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
                                 breakdown, sent)
