"""The slow twin of `round.py`: a plain Python loop over clients and steps.

This is the oracle the tests hold the vectorised round to, and the
"per-client loop" baseline of `benchmarks/round_throughput.py` (one jitted
step per client step, as fedjax's jit backend runs). It uses the same keys
(`fold_in(rng, client position)`), the same technique hooks (the stage's
program per device tier, the chunk plan of the client's chunk) and the same
loss, but none of the round's machinery: no vmap, no scan, no padding
tricks: a padded step is simply skipped, a non-finite client simply left
out, and the weighted sums are accumulated in float64 NumPy. Statically
frozen leaves are simply never updated.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_eff.core import placement as placement_lib
from fedjax_eff.core import round as round_lib
from fedjax_eff.core import technique as technique_lib


def build_reference_round(model, task, technique, client_optimizer,
                          server_optimizer, *, prox_mu: float = 0.0,
                          chunk_size: int = 1, num_tiers: int = 1):
  """Returns `reference_round(state, cohort, rng) -> (state, metrics dict)`.

  `chunk_size` and `num_tiers` only say which clients share a chunk plan
  (techniques with `chunk_plan`); everything else is per client.
  """
  tech = technique_lib.chain(technique)
  loss_fn = round_lib.make_loss_fn(model, task, prox_mu)

  @functools.lru_cache(maxsize=None)
  def client_fns(stage, tier):
    t = tech.specialize(stage, tier) if tech.specialize else tech

    @jax.jit
    def client_start(server_params, ctx, key, round_num, chunk):
      plan_key, _, _ = round_lib.split_client_key(key)
      if chunk is not None:
        ctx = dict(ctx, chunk=chunk)
      plan = t.plan(plan_key, round_num, ctx)
      start = t.view(server_params, plan)
      return plan, start

    def split_of(start, plan):
      return round_lib.TrainableSplit.of(start, t.trainable(start, plan))

    @jax.jit
    def local_step(train, opt_state, batch, mask_b, rng, start, plan):
      split = split_of(start, plan)
      grads, aux = jax.grad(
          lambda tr: loss_fn(split.full(split.stop_frozen(tr)), batch, mask_b,
                             rng, start, t.forward(plan)), has_aux=True)(train)
      if t.correct is not None:
        corrected = jax.tree.leaves(t.correct(split.full(grads), plan))
        grads = [corrected[i] for i in split.index]
      updates, opt_state = client_optimizer.update(split.apply_mask(grads),
                                                   opt_state, train)
      return (optax.apply_updates(train, split.apply_mask(updates)),
              opt_state, aux)

    @jax.jit
    def client_finish(server_params, start, final, plan, key, steps):
      _, _, encode_key = round_lib.split_client_key(key)
      trainable = t.trainable(start, plan)
      split = split_of(start, plan)
      moved = split.apply_mask([a - b for a, b in zip(split.train, final)])
      delta = round_lib.TrainableSplit.of(
          jax.tree.map(jnp.zeros_like, start), trainable).full(moved)
      msg, bits = technique_lib.upload(t, delta, trainable, plan, encode_key)
      sent = technique_lib.receive(t, msg, plan)
      client_state = feedback = ()
      if t.finish is not None:
        client_state, feedback = t.finish(delta, sent, plan, steps)
        bits = bits + technique_lib.feedback_bits(feedback)
      delta, coverage = t.merge(server_params, sent, trainable, plan)
      return (delta, coverage, bits,
              technique_lib.download_bits(t, start, plan), client_state,
              feedback)

    chunk_plan = jax.jit(t.chunk_plan) if t.chunk_plan else None
    return client_start, split_of, local_step, client_finish, chunk_plan

  server_step = jax.jit(
      lambda state, d, c: round_lib.server_update(server_optimizer, state, d,
                                                  c))

  def reference_round(state: round_lib.ServerState, cohort, rng,
                      round_num=None):
    k, steps = cohort.mask.shape[:2]
    round_num = int(state.round) if round_num is None else round_num
    stage = tech.stage(round_num) if tech.stage else None
    tiers = None
    if tech.specialize:
      tiers = np.asarray(cohort.ctx.get('tier', np.zeros(k, np.int64)))
    layout = round_lib.chunk_layout(
        k, min(chunk_size, k), tiers, num_tiers,
        steps=placement_lib.client_steps(cohort.mask))
    c = len(layout.order) // len(layout.chunk_tier)
    first_of_chunk = {}
    for slot, pos in enumerate(layout.order):
      if pos < k:
        first_of_chunk[int(pos)] = int(layout.order[slot - slot % c])
    acc_delta = jax.tree.map(lambda p: np.zeros(p.shape, np.float64),
                             state.params)
    acc_cov = jax.tree.map(lambda p: np.zeros(p.shape, np.float64),
                           state.params)
    loss = correct = examples = scored = 0.0
    up, down = np.zeros(k), np.zeros(k)
    dropped = 0
    stateful = technique_lib.stateful(tech)
    store, aggregated = state.clients, 0
    feedback_sum = (jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                 jax.eval_shape(tech.init, state.params
                                                ).feedback)
                    if stateful else ())
    for i in range(k):
      tier = int(tiers[i]) if tiers is not None else 0
      client_start, split_of, local_step, client_finish, chunk_plan = (
          client_fns(stage, tier))
      key = jax.random.fold_in(rng, i)
      chunk = None
      if chunk_plan is not None:
        first_key = jax.random.fold_in(rng, first_of_chunk[i])
        chunk = chunk_plan(round_lib.chunk_key(first_key), state.round)
      ctx = {n: v[i] for n, v in cohort.ctx.items()}
      if stateful:
        ci = int(cohort.ctx['client_index'][i])
        ctx = dict(ctx, server_state=state.technique,
                   client_state=jax.tree.map(lambda s: s[ci], store))
      plan, start = client_start(state.params, ctx, key, state.round, chunk)
      train = split_of(start, plan).train
      opt_state = client_optimizer.init(train)
      c_sums = None
      real_steps = 0
      for s in range(steps):
        mask_b = np.asarray(cohort.mask[i, s])
        if mask_b.sum() == 0:
          continue
        real_steps += 1
        batch = {f: v[i, s] for f, v in cohort.batches.items()}
        train, opt_state, sums = local_step(
            train, opt_state, batch, mask_b,
            jax.random.fold_in(round_lib.split_client_key(key)[1], s), start,
            plan)
        # Device scalars: no sync until the client is done.
        c_sums = sums if c_sums is None else jax.tree.map(jnp.add, c_sums,
                                                          sums)
      c_loss, c_correct, c_n, c_scored = (
          (0.0,) * 4 if c_sums is None else map(float, c_sums))
      delta, cov, bits, dbits, client_state, feedback = client_finish(
          state.params, start, train, plan, key,
          jnp.asarray(real_steps, round_lib.loss_dtype(state.params)))
      up[i], down[i] = float(bits), float(dbits)
      finite = (all(np.all(np.isfinite(x)) for x in jax.tree.leaves(delta))
                and np.isfinite(c_loss))
      if not finite:
        dropped += int(cohort.weight[i] > 0)
        continue
      if stateful and cohort.weight[i] > 0:  # aggregated: state, feedback
        store = jax.tree.map(lambda s, n: s.at[ci].set(n), store,
                             client_state)
        feedback_sum = jax.tree.map(jnp.add, feedback_sum, feedback)
        aggregated += 1
      w = float(cohort.weight[i])
      acc_delta = jax.tree.map(lambda a, d: a + w * np.asarray(d, np.float64),
                               acc_delta, delta)
      acc_cov = jax.tree.map(lambda a, d: a + w * np.asarray(d, np.float64),
                             acc_cov, cov)
      loss += c_loss; correct += c_correct; examples += c_n
      scored += c_scored
    dtype = round_lib.loss_dtype(state.params)
    to32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)
    acc_delta, acc_cov = to32(acc_delta), to32(acc_cov)
    technique_state = state.technique
    if tech.aggregate is not None:
      acc_delta, acc_cov, technique_state = tech.aggregate(
          state.technique, acc_delta, acc_cov,
          dict(round=state.round, clients=jnp.asarray(aggregated, dtype)))
    new_state = server_step(state, acc_delta, acc_cov)
    if stateful:
      if tech.server_update is not None:
        technique_state = tech.server_update(
            technique_state, feedback_sum,
            dict(clients=jnp.float32(aggregated),
                 population=(jax.tree.leaves(store)[0].shape[0]
                             if jax.tree.leaves(store) else None)))
      new_state = new_state._replace(technique=technique_state,
                                     clients=store)
    metrics: dict[str, Any] = dict(
        train_loss=loss / examples if examples > 0 else float('nan'),
        train_accuracy=correct / max(scored, 1.0), num_clients=k,
        num_dropped=dropped, upload_bits=up.mean(), download_bits=down.mean(),
        client_upload_bits=up, client_download_bits=down)
    return new_state, metrics

  return reference_round
