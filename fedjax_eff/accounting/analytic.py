"""What one local training step keeps in memory, by kind, from shapes alone.

The compiled numbers (`compiled.py`) say what XLA allocates, in total; this
says *why*: how much is weights, gradients, optimizer state, activations
saved for the backward pass, and input data. It needs no compile (a trace
and `jax.eval_shape`) and is exact in bytes, but it is a model of memory, not
a measurement: XLA may fuse a saved activation away, keep extra scratch
buffers, or free a gradient as soon as the optimizer used it.

The trainable mask decides all but the weights. A leaf whose mask entry is
the static `False` is frozen: it gets no gradient and no optimizer state, and
it is not differentiated, so autodiff saves nothing to differentiate it. In
particular layers *below* the lowest trainable layer keep no activations:
their outputs are never differentiated, only the input of the lowest
trainable layer is saved. That is the memory saving of training only the
last layers (last-n training, Pfeiffer et al.) and of layer-wise training:
the backward pass, and its residuals, stop at the lowest trainable layer.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax
from jax.extend import core as jex_core

from fedjax_eff.accounting import bits as bits_lib

PyTree = Any


class AnalyticCost(NamedTuple):
  """Bytes one local training step holds, by kind (exact Python ints).

  weights_bytes: every parameter, trainable or frozen (the forward pass
    reads them all).
  gradient_bytes: the trainable parameters' gradients (same shapes/dtypes).
  optimizer_state_bytes: `optimizer.init` on the trainable parameters only
    (Adam: 2x trainable + a step counter; SGD: 0).
  activation_bytes: the residuals autodiff saves between the forward and
    the backward pass when differentiating w.r.t. the trainable parameters,
    each distinct array counted once; residuals that *are* a parameter or an
    input are left out (counted as weights / data), and so are residuals
    computable without the inputs (e.g. broadcast zeros).
  data_bytes: the batch arguments.
  total_bytes: the sum of the five. Everything is counted as live at once,
    so this is an upper bound in the sense of a model without buffer reuse.
  """
  weights_bytes: int
  gradient_bytes: int
  optimizer_state_bytes: int
  activation_bytes: int
  data_bytes: int
  total_bytes: int


def trainable_flags(params: PyTree, trainable_mask: PyTree | None
                    ) -> list[bool]:
  """One bool per leaf of `params`: does this leaf train?

  `None` trains everything; a static leaf (Python bool/int, concrete 0-d
  array) trains iff truthy. A non-scalar or traced (dynamic) mask leaf counts
  as trainable, because that is what the simulator does with it
  (`core/technique.py`: a dynamic leaf is still differentiated and holds
  optimizer state, and the mask only zeroes its update).
  """
  flags = []
  for m in bits_lib.mask_leaves(params, trainable_mask):
    flag = bits_lib.static_flag(m)
    flags.append(True if flag is None else flag)
  return flags


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(*bits_lib.shape_dtype(x)), tree)


def _aval_bytes(aval: Any) -> int:
  return bits_lib.bits_to_bytes(
      bits_lib.leaf_bits(jax.ShapeDtypeStruct(aval.shape, aval.dtype),
                         bits_per_value=None))


def residual_bytes(loss_fn: Callable[..., Any], params: PyTree,
                   trainable_mask: PyTree | None, *batch_args: Any,
                   has_aux: bool = False) -> int:
  """Bytes of the activations autodiff saves to differentiate `loss_fn`.

  Traces `jax.vjp` of `loss_fn` w.r.t. the trainable leaves only; frozen
  leaves and `batch_args` enter as non-differentiated inputs (the same
  program as closing over them as constants, but it also works with
  `jax.ShapeDtypeStruct`s, which cannot be closed over). The residuals are
  the extra outputs of the traced forward pass that the returned VJP closes
  over; this is what the (private in JAX 0.10) `saved_residuals` utility
  reads, which `jax.ad_checkpoint` only exposes as a printer.

  Residuals that are program inputs (parameters, data), literals, or
  computable without the inputs (constants and what is derived from them
  alone) are not activations and are left out; an array saved twice is
  counted once.
  """
  leaves, treedef = jax.tree.flatten(params)
  flags = trainable_flags(params, trainable_mask)
  train = [x for x, f in zip(leaves, flags) if f]
  frozen = [x for x, f in zip(leaves, flags) if not f]
  if not train:
    return 0

  def forward(train, frozen, batch_args):
    def loss_of_trainable(train):
      it_t, it_f = iter(train), iter(frozen)
      full = [next(it_t) if f else next(it_f) for f in flags]
      out = loss_fn(jax.tree.unflatten(treedef, full), *batch_args)
      return out[0] if has_aux else out
    return jax.vjp(loss_of_trainable, train)

  flat, in_tree = jax.tree.flatten(
      _abstract((train, frozen, tuple(batch_args))))
  closed, out_shape = jax.make_jaxpr(
      lambda *xs: forward(*jax.tree.unflatten(in_tree, xs)),
      return_shape=True)(*flat)
  num_res = len(jax.tree.leaves(out_shape[1]))
  jaxpr = closed.jaxpr
  res = jaxpr.outvars[len(jaxpr.outvars) - num_res:]
  computed = _input_dependent(jaxpr)
  seen, total = set(), 0
  for v in res:
    if isinstance(v, jex_core.Literal) or v not in computed or v in seen:
      continue
    seen.add(v)
    total += _aval_bytes(v.aval)
  return total


def _input_dependent(jaxpr: Any) -> set[Any]:
  """Variables computed from the inputs: eqn outputs with an input upstream.

  Inputs themselves are not in the set (they are weights or data), nor are
  values computable from constants alone: e.g. JAX's ReLU derivative saves
  a broadcast of 0.0 as large as the activation, which XLA folds into the
  backward pass instead of storing.
  """
  depends = set(jaxpr.invars)
  computed = set()
  for eqn in jaxpr.eqns:
    if any(not isinstance(v, jex_core.Literal) and v in depends
           for v in eqn.invars):
      depends.update(eqn.outvars)
      computed.update(eqn.outvars)
  return computed


def analytic_cost(loss_fn: Callable[..., Any], params: PyTree,
                  trainable_mask: PyTree | None,
                  optimizer: optax.GradientTransformation | None,
                  *batch_args: Any, has_aux: bool = False) -> AnalyticCost:
  """The memory breakdown of one local step of `optimizer` on `loss_fn`.

  Args:
    loss_fn: `loss_fn(params, *batch_args)` -> scalar loss, or
      `(loss, aux)` with `has_aux=True`.
    params: the model the device trains (arrays or ShapeDtypeStructs).
    trainable_mask: pytree matching `params` (or a prefix of it) of static
      bools: True trains, False is frozen. None: everything trains.
    optimizer: the client optimizer; None counts no optimizer state.
    *batch_args: the rest of `loss_fn`'s arguments (batch, mask, rng, ...),
      arrays or ShapeDtypeStructs.
    has_aux: whether `loss_fn` returns `(loss, aux)`.

  Nothing is compiled or executed.
  """
  leaves, treedef = jax.tree.flatten(params)
  flags = trainable_flags(params, trainable_mask)
  weights = bits_lib.tree_bytes(params)
  gradients = bits_lib.tree_bytes(leaves, flags)
  if optimizer is None or not any(flags):
    opt_state = 0  # nothing trains: no optimizer (not even a step counter)
  else:
    # Frozen leaves become None (an empty subtree) rather than being dropped,
    # so transformations that follow the parameter tree still see its shape.
    trainable_tree = jax.tree.unflatten(
        treedef, [x if f else None for x, f in zip(_abstract(leaves), flags)])
    opt_state = bits_lib.tree_bytes(
        jax.eval_shape(optimizer.init, trainable_tree))
  activations = residual_bytes(loss_fn, params, trainable_mask, *batch_args,
                               has_aux=has_aux)
  data = bits_lib.tree_bytes(batch_args)
  return AnalyticCost(weights, gradients, opt_state, activations, data,
                      weights + gradients + opt_state + activations + data)
