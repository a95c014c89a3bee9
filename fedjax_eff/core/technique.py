"""Techniques as values: the hooks a round calls, and their composition.

A technique is an immutable bundle of pure functions, in the spirit of
`optax.GradientTransformation`. The round builder (`core/round.py`) calls the
hooks of one composed technique and never asks which techniques are on, so
adding a technique never touches the round builder.

Per client, inside the vmapped program, a round calls:

  plan      = plan(rng, round, ctx)              per-client choices (arrays)
  view      = view(server_params, plan)          the model the device trains
  mask      = trainable(view, plan)              1 = trained and uploaded
  kwargs    = forward(plan)                      extra model-apply kwargs
  ... local training on `view`, gradients and updates times `mask`;
      grads = correct(grads, plan) before each optimizer step ...
  msg       = encode(to_wire(delta, mask), plan, rng)   what travels up
  bits      = message_bits(msg)                  exact, on the final message
  sent      = from_wire(decode(msg, plan))       the server's reading of it
  cstate, feedback = finish(delta, sent, plan, steps)   new client state
  full, cov = merge(server_params, delta, mask, plan)
                                                 scatter back to server shape;
                                                 cov = per-parameter coverage
  down_bits = download(view, plan)               what travels down

`full` and `cov` are weighted and summed over clients; the server divides
each parameter by the weight of the clients that trained it (`cov`), and a
parameter nobody trained keeps its value.

`encode`/`decode` work on wire trees (`core/codecs.py`): a technique's
encode receives whatever the previous technique's encode produced and its
decode returns what its encode received, so encoders compose; bits are
counted on the final message (`upload` and `receive` below do the
conversion the round needs).

State, optax-style: `init(params) -> TechniqueState(server, client)` gives
the technique's server-side state (kept in the server state, checkpointed,
donated) and *one* client's initial persistent state (the round keeps one
per client of the population in a client-state store). A client's plan sees
both as `ctx['server_state']` and `ctx['client_state']`; `finish` returns
the client's new state and its feedback (what it tells the server state,
e.g. SCAFFOLD's change of control variate); feedback is summed over the
round's aggregated clients (unweighted) and `server_update(server_state,
feedback_sum, info)` gives the new server state (`info`: `clients`, the
number aggregated, and `population`, the store's size). Before the server
optimizer steps, `aggregate(server_state, delta_sum, coverage, info)` may
rewrite the round's weighted sums (noise on the sum, a fixed denominator,
a modular sum's decoding); its new server state is what `server_update`
starts from. Clients of weight 0 (an empty slot of a Poisson-sampled
cohort) are not aggregated: no feedback, no new state.

Trainable masks come in the two forms of DESIGN.md, "Heterogeneous devices".
A mask leaf that is an array is *dynamic*: exact per-client semantics, but the
simulator still differentiates the leaf and keeps optimizer state for it. A
mask leaf that is the Python bool `False` is *static*: the leaf is closed
over as a constant, so autodiff never computes its gradient (nor the backward
pass through layers below the lowest trainable one), the client optimizer
holds no state for it and nothing is uploaded: what a real device saves, the
simulator saves too. `True` is a static "trains".

Static choices that change over rounds or between device classes are
programs of their own. On the host, `stage(round) -> hashable` names the
program of a round (e.g. the active layer of layer-wise training), and
`specialize(stage, tier) -> Technique` gives the technique that clients of
device tier `tier` run at that stage; the round compiles one program per
stage and dispatches each chunk of same-tier clients to its tier's program
(`lax.switch`, so only that branch runs). `device()`, for a technique whose
per-client choices are dynamic, gives the static program a device with a
typical draw runs (e.g. a fixed layer subset, static depth-dropout gates):
what the accounting compiles. `chunk_plan(rng, round)` draws
choices shared by the clients of one chunk; they reach `plan` as
`ctx['chunk']`, unbatched, so e.g. a `lax.cond` on them really skips work.

Hooks with no opinion are left as `None`; `chain` composes techniques in
order (view/encode in order, decode/merge in reverse).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Hashable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_eff.core import codecs
from fedjax_eff.core.codecs import is_frozen, mask_as_array
from fedjax_eff.models import structure

PyTree = Any


class Technique(NamedTuple):
  """Hooks of one technique; `None` means "identity" for that hook."""
  name: str = 'identity'
  plan: Optional[Callable[..., PyTree]] = None
  view: Optional[Callable[[PyTree, PyTree], PyTree]] = None
  trainable: Optional[Callable[[PyTree, PyTree], PyTree]] = None
  forward: Optional[Callable[[PyTree], dict]] = None
  encode: Optional[Callable[..., tuple[PyTree, jax.Array]]] = None
  decode: Optional[Callable[[PyTree, PyTree], PyTree]] = None
  merge: Optional[Callable[..., tuple[PyTree, PyTree]]] = None
  download: Optional[Callable[[PyTree, PyTree], jax.Array]] = None
  stage: Optional[Callable[[int], Hashable]] = None
  specialize: Optional[Callable[[Hashable, int], 'Technique']] = None
  chunk_plan: Optional[Callable[[jax.Array, jax.Array], PyTree]] = None
  device: Optional[Callable[[], 'Technique']] = None
  # Evaluation this technique owns (e.g. federated dropout's nested
  # sub-models): `report(params, evaluate) -> {metric name: value}`, where
  # `evaluate(params, **forward_kwargs) -> {metric: value}` is the task's
  # evaluation on the central test set, supplied by the experiment.
  report: Optional[Callable[..., dict]] = None
  # State (see the module docstring).
  init: Optional[Callable[[PyTree], 'TechniqueState']] = None
  correct: Optional[Callable[[PyTree, PyTree], PyTree]] = None
  finish: Optional[Callable[..., tuple[PyTree, PyTree]]] = None
  server_update: Optional[Callable[[PyTree, PyTree, dict], PyTree]] = None
  # Bits a client downloads beside the model (e.g. SCAFFOLD's c):
  # `side_download(plan) -> bits`, summed over a chain.
  side_download: Optional[Callable[[PyTree], Any]] = None
  # Per-client draws that change what a device computes (depth dropout's
  # gates): `variant(plan) -> int32 scalar` names the static program this
  # client's draw amounts to, `device_variant(v)` is that program. The
  # round reports each client's variant (`RoundMetrics.client_variant`) and
  # the experiment accounts each client for its own variant's program.
  variant: Optional[Callable[[PyTree], Any]] = None
  device_variant: Optional[Callable[[int], 'Technique']] = None
  # The server's reading of the round's sums, before its optimizer:
  # `aggregate(server_state, delta_sum, coverage, info) -> (delta_sum,
  # coverage, server_state)` (e.g. differential privacy's noise on the sum
  # and its fixed denominator; secure aggregation's modular sum and
  # inverse rotation). `info`: `round` (int32) and `clients` (the number
  # of clients aggregated). Needs `init` (it reads and returns the
  # technique's server state).
  aggregate: Optional[Callable[..., tuple[PyTree, PyTree, PyTree]]] = None


class TechniqueState(NamedTuple):
  """A technique's server-side state, one client's initial state, and a
  zero feedback (the structure of what each client's `finish` feeds back
  to the server state)."""
  server: PyTree = ()
  client: PyTree = ()
  feedback: PyTree = ()


def hparam(ctx: dict, name: str, default):
  """A replica's own value of a technique knob (`ServerState.hparams[name]`,
  broadcast as `ctx['hparams']` by the round; `experiment/replicas.py`),
  else the technique's static `default`. A plan reads its knobs through
  this, so replicas that differ only in a knob that keeps shapes (a
  depth-dropout rate, quantization bits of one code dtype) share one
  program and each still runs its own value."""
  return ctx.get('hparams', {}).get(name, default)


def _and(a, b):
  if is_frozen(a) or is_frozen(b):
    return False
  if a is True:
    return b
  if b is True:
    return a
  return jnp.multiply(a, b)


def combine_masks(a: PyTree, b: PyTree) -> PyTree:
  """Elementwise AND of two trainable masks, keeping static leaves static."""
  return jax.tree.map(_and, a, b)


def tree_bits(tree: PyTree, mask: PyTree | None = None,
              bits_per_value: int = 32) -> jax.Array | float:
  """Bits to send the (masked) entries of `tree` at `bits_per_value` each.

  A Python float when the mask is static (exact to 2^53, and usable at
  trace time), an array when some mask leaf is dynamic.
  """
  leaves, treedef = jax.tree.flatten(tree)
  masks = ([True] * len(leaves) if mask is None
           else treedef.flatten_up_to(mask))
  static = float(sum(x.size for x, m in zip(leaves, masks)
                     if isinstance(m, (bool, np.bool_)) and m))
  dynamic = [(x, m) for x, m in zip(leaves, masks)
             if not isinstance(m, (bool, np.bool_))]
  if not dynamic:  # a Python number: exact, and static under tracing
    return static * bits_per_value
  total = jnp.asarray(static * bits_per_value, jnp.float32)
  for x, m in dynamic:
    total = total + jnp.sum(mask_as_array(m, x.shape)) * bits_per_value
  return total


def identity() -> Technique:
  """Full model, everything trains, fp32 up and down: plain FedAvg."""
  return Technique()


# Resolved hooks: what a `Technique` means when a hook is None.

def _plan(t, rng, round_num, ctx):
  return t.plan(rng, round_num, ctx) if t.plan else ()


def _view(t, params, plan):
  return t.view(params, plan) if t.view else params


def _trainable(t, params, plan):
  if t.trainable:
    return t.trainable(params, plan)
  return jax.tree.map(lambda _: True, params)


def _forward(t, plan):
  return dict(t.forward(plan)) if t.forward else {}


def _encode(t, msg, plan, rng):
  return t.encode(msg, plan, rng) if t.encode else msg


def _decode(t, msg, plan):
  return t.decode(msg, plan) if t.decode else msg


def encode_upload(t: Technique, delta: PyTree, mask: PyTree, plan, rng):
  """The message: the client's delta through `t`'s encoders."""
  return t.encode(codecs.to_wire(delta, mask), plan, rng)


def upload(t: Technique, delta: PyTree, mask: PyTree, plan, rng):
  """(message, bits): the client's delta through `t`'s encoders."""
  msg = encode_upload(t, delta, mask, plan, rng)
  return msg, codecs.message_bits(msg)


def receive(t: Technique, msg: PyTree, plan) -> PyTree:
  """The delta the server reads from `msg` (view-shaped)."""
  return codecs.from_wire(t.decode(msg, plan))


def stateful(t: Technique) -> bool:
  return t.init is not None


def init_state(t: Technique, params: PyTree) -> TechniqueState:
  return t.init(params) if t.init else TechniqueState()


def with_initial_state(t: Technique, params: PyTree, ctx: dict) -> dict:
  """`ctx` with `t`'s initial server and client state where it has none
  (one client probed on its own: accounting, tracing)."""
  if not stateful(t) or 'server_state' in ctx:
    return ctx
  s = jax.eval_shape(t.init, params) if any(
      isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)
  ) else t.init(params)
  return dict(ctx, server_state=s.server, client_state=s.client)


def _merge(t, server_params, delta, mask, plan):
  if t.merge:
    return t.merge(server_params, delta, mask, plan)
  cov = jax.tree.map(lambda d, m: mask_as_array(m, d.shape, d.dtype), delta,
                     mask)
  return delta, cov


def coverage_is_mask(t: Technique) -> bool:
  """Is `t`'s coverage its trainable mask, as an array (no technique of it
  merges)? Then a statically frozen or trained leaf's coverage is the
  constant 0 or 1 for every client, and the round sums a scalar weight for
  it instead of a model-size array per client (`core.round`)."""
  return bool(getattr(t.merge, 'coverage_is_mask', t.merge is None))


def _mask_merge(t: Technique):
  """`t`'s merge, resolved; marked when it is the default (its coverage
  is the mask: `coverage_is_mask`)."""
  def merge(sp, d, m, plan):
    return _merge(t, sp, d, m, plan)
  merge.coverage_is_mask = coverage_is_mask(t)
  return merge


def download_bits(t, params, plan):
  """What travels down: `t.download` (or the whole model in fp32), plus
  what the technique sends beside it (`side_download`)."""
  bits = t.download(params, plan) if t.download else tree_bits(params)
  if t.side_download is not None:
    bits = bits + t.side_download(plan)
  return bits


def feedback_bits(feedback: PyTree):
  """A client's feedback (`finish`) travels up beside its message, in
  fp32: e.g. SCAFFOLD's change of control variate, the size of the model."""
  return tree_bits(feedback)


def _identity_if(identity: bool, fn: Callable) -> Callable:
  """`fn`, marked `identity` when the hook it resolves was None (no plan
  drawn, no encoder): what `same_for_every_client` reads."""
  fn.identity = identity
  return fn


def _is_identity(hook) -> bool:
  """A hook that is None, or resolved from None (`_identity_if`)."""
  return hook is None or bool(getattr(hook, 'identity', False))


def same_for_every_client(t: Technique) -> bool:
  """Does every client of the resolved program `t` (a technique, or what
  its `specialize` gives for one stage and tier) train the same view with
  the same mask and forward kwargs, and upload its delta as it is?

  True when no technique of `t` draws a plan (so view, trainable and
  forward are the same for all), none encodes or merges (the server reads
  Δ_k itself, coverage = the mask: Σ_k w_k Δ_k is linear in the Δ_k), and
  none keeps state, corrects gradients, reports variants, draws per chunk,
  aggregates. Plain FedAvg/FedAdam/FedProx and one tier's static last-n
  qualify. Then the round may run several
  clients back to back in one lane (`build_round(lanes=True)`): all a
  client leaves behind is w_k Δ_k added to a sum.
  """
  return (_is_identity(t.plan) and _is_identity(t.encode)
          and _is_identity(t.decode)
          and coverage_is_mask(t) and t.init is None and t.correct is None
          and t.finish is None and t.variant is None
          and t.chunk_plan is None and t.aggregate is None)


def resolve(t: Technique) -> Technique:
  """Returns `t` with every per-client hook filled in (identity if None).

  `stage`, `specialize` and `chunk_plan` stay None when `t` has none, so
  the round can tell a technique without stages, tiers or chunk plans and
  skip that machinery; so does `download`, so that `chain` can tell which
  technique decides what travels down (`download_bits` fills it in).
  """
  specialize = None
  if t.specialize:
    specialize = lambda stage, tier: resolve(t.specialize(stage, tier))
  return Technique(
      name=t.name,
      plan=_identity_if(_is_identity(t.plan),
                        lambda rng, r, ctx: _plan(t, rng, r, ctx)),
      view=lambda p, plan: _view(t, p, plan),
      trainable=lambda p, plan: _trainable(t, p, plan),
      forward=lambda plan: _forward(t, plan),
      encode=_identity_if(_is_identity(t.encode),
                          lambda msg, plan, rng: _encode(t, msg, plan, rng)),
      decode=_identity_if(_is_identity(t.decode),
                          lambda msg, plan: _decode(t, msg, plan)),
      merge=_mask_merge(t),
      download=t.download,  # None stays None: see download_bits
      stage=t.stage,
      specialize=specialize,
      chunk_plan=t.chunk_plan,
      device=t.device,
      report=t.report,
      init=t.init,
      correct=t.correct,
      finish=t.finish,
      server_update=t.server_update,
      side_download=t.side_download,
      variant=t.variant,
      device_variant=t.device_variant,
      aggregate=t.aggregate)


def device_program(t: Technique, variant: int | None = None) -> Technique:
  """The static program a device runs for `t`: that of its `variant`
  (`t.device_variant(variant)`) when given and `t` has variants, else
  `t.device()` (a typical device), else `t`."""
  if variant is not None and t.device_variant:
    return t.device_variant(int(variant))
  return t.device() if t.device else t


def _member_ctx(ctx, i, chunk_plan):
  """Technique i's view of a chain's ctx: its chunk plan, its state."""
  ctx = dict(ctx)
  if 'chunk' in ctx:
    ctx['chunk'] = chunk_plan
  for k in ('server_state', 'client_state'):
    if k in ctx:
      ctx[k] = ctx[k][i]
  return ctx


def chain(*techniques: Technique) -> Technique:
  """Composes techniques like `optax.chain`; the result is resolved.

  Plans are a tuple (one entry per technique, each drawn with its own key).
  Views apply in order; trainable masks multiply; forward kwargs merge
  (an error when two techniques set one key to different values);
  encoders apply in order (the last one's bit count is what travels) and
  decoders in reverse; merges apply in reverse, each scattering into the
  shape the previous view started from, the inner coverage serving as the
  outer merge's mask. What travels down is counted by the last technique
  that has a `download` hook (the full model in fp32 if none has).
  """
  ts = [resolve(t) for t in techniques] or [resolve(identity())]
  if len(ts) == 1:
    return ts[0]

  every = lambda hook: all(_is_identity(getattr(t, hook)) for t in ts)

  @functools.partial(_identity_if, every('plan'))
  def plan(rng, round_num, ctx):
    keys = jax.random.split(rng, len(ts))
    chunk = ctx.get('chunk', (None,) * len(ts))
    return tuple(t.plan(k, round_num, _member_ctx(ctx, i, c))
                 for i, (t, k, c) in enumerate(zip(ts, keys, chunk)))

  def views(params, plans):
    out = [params]
    for t, p in zip(ts, plans):
      out.append(t.view(out[-1], p))
    return out

  def view(params, plans):
    return views(params, plans)[-1]

  def trainable(params, plans):
    mask = None
    for t, p in zip(ts, plans):
      m = t.trainable(params, p)
      mask = m if mask is None else combine_masks(mask, m)
    return mask

  def forward(plans):
    # A typed merge: two techniques setting one key to different values
    # is an error naming both (models.structure.ForwardPlan).
    return structure.merge_forward([t.forward(p) for t, p in zip(ts, plans)],
                                   names=[t.name for t in ts])

  @functools.partial(_identity_if, every('encode'))
  def encode(msg, plans, rng):
    keys = jax.random.split(rng, len(ts))
    for t, p, k in zip(ts, plans, keys):
      msg = t.encode(msg, p, k)
    return msg

  @functools.partial(_identity_if, every('decode'))
  def decode(msg, plans):
    for t, p in zip(reversed(ts), reversed(plans)):
      msg = t.decode(msg, p)
    return msg

  def merge(server_params, delta, mask, plans):
    # Each level's coverage is the next (outer) level's mask.
    vs = views(server_params, plans)
    cov = mask
    for i in reversed(range(len(ts))):
      delta, cov = ts[i].merge(vs[i], delta, cov, plans[i])
    return delta, cov
  merge.coverage_is_mask = all(coverage_is_mask(t) for t in ts)

  # What travels down is decided by the last technique with an opinion.
  down = max((i for i, t in enumerate(ts) if t.download is not None),
             default=None)
  download = None
  if down is not None:
    def download(params, plans):
      return ts[down].download(params, plans[down])

  stage = specialize = chunk_plan = device = None
  if any(t.device for t in ts):
    def device():
      return chain(*(device_program(t) for t in ts))
  if any(t.stage for t in ts):
    def stage(round_num):
      return tuple(t.stage(round_num) if t.stage else () for t in ts)

  if any(t.specialize for t in ts):
    def specialize(stages, tier):
      if stages is None:
        stages = stage(0) if stage else ((),) * len(ts)
      return chain(*(t.specialize(s, tier) if t.specialize else t
                     for t, s in zip(ts, stages)))
  if any(t.chunk_plan for t in ts):
    def chunk_plan(rng, round_num):
      keys = jax.random.split(rng, len(ts))
      return tuple(t.chunk_plan(k, round_num) if t.chunk_plan else None
                   for t, k in zip(ts, keys))

  report = None
  if any(t.report for t in ts):
    def report(params, evaluate):
      out = {}
      for t in ts:
        for k, v in (t.report(params, evaluate) if t.report else {}).items():
          if k in out:
            raise ValueError(f'Two techniques of {[t.name for t in ts]} '
                             f'report {k!r}.')
          out[k] = v
      return out

  init = correct = finish = server_update = aggregate = None
  if any(t.aggregate for t in ts):
    def aggregate(server_state, delta_sum, coverage, info):
      # In reverse, like decode: the last encoder's sum is read first.
      states = list(server_state)
      for i in reversed(range(len(ts))):
        if ts[i].aggregate:
          delta_sum, coverage, states[i] = ts[i].aggregate(
              states[i], delta_sum, coverage, info)
      return delta_sum, coverage, tuple(states)
  if any(t.init for t in ts):
    def init(params):
      states = [init_state(t, params) for t in ts]
      return TechniqueState(tuple(s.server for s in states),
                            tuple(s.client for s in states),
                            tuple(s.feedback for s in states))

    def finish(delta, sent, plans, steps):
      out = [t.finish(delta, sent, p, steps) if t.finish else ((), ())
             for t, p in zip(ts, plans)]
      return tuple(o[0] for o in out), tuple(o[1] for o in out)

    def server_update(server_state, feedback_sum, info):
      return tuple(t.server_update(s, f, info) if t.server_update else s
                   for t, s, f in zip(ts, server_state, feedback_sum))
  if any(t.correct for t in ts):
    def correct(grads, plans):
      for t, p in zip(ts, plans):
        if t.correct:
          grads = t.correct(grads, p)
      return grads

  side_download = None
  if any(t.side_download for t in ts):
    def side_download(plans):
      return sum(t.side_download(p) for t, p in zip(ts, plans)
                 if t.side_download)

  variant = device_variant = None
  varying = [i for i, t in enumerate(ts) if t.variant]
  if len(varying) > 1:
    raise ValueError(f'{[ts[i].name for i in varying]}: only one technique '
                     'of a chain may have per-client program variants.')
  if varying:
    (i,) = varying

    def variant(plans):
      return ts[i].variant(plans[i])

    def device_variant(v):
      return chain(*(t.device_variant(v) if j == i else device_program(t)
                     for j, t in enumerate(ts)))

  return Technique('+'.join(t.name for t in ts), plan, view, trainable,
                   forward, encode, decode, merge, download, stage,
                   specialize, chunk_plan, device, report, init, correct,
                   finish, server_update, side_download, variant,
                   device_variant, aggregate)


def _static_or_none(x):
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError):
    return None


def _is_python_value(v) -> bool:
  """A static forward kwarg: Python scalars, strings, tuples of them (e.g.
  federated dropout's `widths`), not arrays."""
  if isinstance(v, tuple):
    return all(_is_python_value(x) for x in v)
  return isinstance(v, (bool, int, float, str, type(None)))


def trace_plan(tech: Technique, params: PyTree, ctx: dict) -> dict:
  """The static parts of one client's plan, traced once (nothing runs).

  Returns `view` (ShapeDtypeStructs of the model the device trains),
  `flags` (the trainable mask with dynamic leaves as True: an upper bound),
  `forward` (the model kwargs that are Python values: `depth`, `stop_below`,
  `widths`, ...; what evaluation at this stage needs) and `download_bits` (None when
  the count is dynamic), `upload_bits` likewise from the encoder (so a
  quantizer's wire format is counted). `params`/`ctx` may be arrays or
  ShapeDtypeStructs.
  """
  found = {}

  def probe(server_params, ctx):
    round_num = jnp.zeros((), jnp.int32)
    if tech.chunk_plan:
      ctx = dict(ctx, chunk=tech.chunk_plan(jax.random.key(1), round_num))
    ctx = with_initial_state(tech, server_params, ctx)
    plan = tech.plan(jax.random.key(0), round_num, ctx)
    view = tech.view(server_params, plan)
    trainable = tech.trainable(view, plan)
    found['flags'] = jax.tree.map(
        lambda m: m if isinstance(m, (bool, np.bool_)) else True, trainable)
    found['view'] = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), view)
    fwd = tech.forward(plan)
    found['forward'] = {k: v for k, v in fwd.items() if _is_python_value(v)}
    # Static NumPy kwargs (e.g. a depth-dropout variant's `layer_gates`),
    # as nested tuples: part of what defines the device's program.
    found['forward_arrays'] = {
        k: np.asarray(v).tolist() for k, v in fwd.items()
        if isinstance(v, (np.ndarray, np.generic))}
    found['download_bits'] = _static_or_none(download_bits(tech, view, plan))
    _, up = upload(tech, jax.tree.map(jnp.zeros_like, view), trainable, plan,
                   jax.random.key(2))
    if stateful(tech):
      up = up + feedback_bits(tech.init(server_params).feedback)
    found['upload_bits'] = _static_or_none(up)
    return 0
  jax.eval_shape(probe, params, ctx)
  return found


def view_shapes(tech: Technique, params: PyTree, ctx: dict) -> PyTree:
  """ShapeDtypeStructs of the model one client of `tech` trains (nothing
  runs; no encoder is traced)."""
  def probe(server_params):
    round_num = jnp.zeros((), jnp.int32)
    c = with_initial_state(tech, server_params, ctx)
    if tech.chunk_plan:
      c = dict(c, chunk=tech.chunk_plan(jax.random.key(1), round_num))
    return tech.view(server_params, tech.plan(jax.random.key(0), round_num,
                                              c))
  return jax.eval_shape(probe, params)


# Forward kwargs that describe the shapes of a client's view (federated
# dropout's narrower sub-model), not the server model they were drawn from.
VIEW_SHAPE_KWARGS = ('widths',)


def server_forward(tech: Technique, params: PyTree, ctx: dict) -> dict:
  """The static forward kwargs to run the *server* model as `tech`'s stage
  runs it (depth, stop_below, task, ...): `trace_plan`'s, less the ones
  that only fit the client's narrower view."""
  fwd = trace_plan(tech, params, ctx)['forward']
  return {k: v for k, v in fwd.items() if k not in VIEW_SHAPE_KWARGS}
