"""The slow twin of `round.py`: a plain Python loop over clients and steps.

This is the oracle the tests hold the vectorised round to, and the
"per-client loop" baseline of `benchmarks/round_throughput.py` (one jitted
step per client step, as fedjax's jit backend runs). It uses the same keys
(`fold_in(rng, client position)`), the same technique hooks and the same
loss, but none of the round's machinery: no vmap, no scan, no chunking, no
padding tricks: a padded step is simply skipped, a non-finite client simply
left out, and the weighted sums are accumulated in float64 NumPy.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_eff.core import round as round_lib
from fedjax_eff.core import technique as technique_lib


def build_reference_round(model, task, technique, client_optimizer,
                          server_optimizer, *, prox_mu: float = 0.0):
  """Returns `reference_round(state, cohort, rng) -> (state, metrics dict)`."""
  tech = technique_lib.chain(technique)
  grad_fn = jax.grad(round_lib.make_loss_fn(model, task, prox_mu),
                     has_aux=True)

  @jax.jit
  def local_step(params, opt_state, batch, mask_b, rng, start, trainable,
                 plan):
    grads, aux = grad_fn(round_lib.masked_params(params, trainable), batch,
                         mask_b, rng, start, tech.forward(plan))
    grads = jax.tree.map(lambda g, m: g * m, grads, trainable)
    updates, opt_state = client_optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u, m: u * m, updates, trainable)
    return optax.apply_updates(params, updates), opt_state, aux

  @jax.jit
  def client_start(server_params, ctx, key, round_num):
    plan_key, _, _ = round_lib.split_client_key(key)
    plan = tech.plan(plan_key, round_num, ctx)
    start = tech.view(server_params, plan)
    trainable = tech.trainable(start, plan)
    return plan, start, trainable, client_optimizer.init(start)

  @jax.jit
  def client_finish(server_params, start, final, trainable, plan, key):
    _, _, encode_key = round_lib.split_client_key(key)
    delta = jax.tree.map(lambda a, b, m: (a - b) * m, start, final, trainable)
    msg, bits = tech.encode(delta, trainable, plan, encode_key)
    delta, coverage = tech.merge(server_params, tech.decode(msg, plan),
                                 trainable, plan)
    return delta, coverage, bits, tech.download(start, plan)

  server_step = jax.jit(
      lambda state, d, c: round_lib.server_update(server_optimizer, state, d,
                                                  c))

  def reference_round(state: round_lib.ServerState, cohort, rng):
    k, steps = cohort.mask.shape[:2]
    acc_delta = jax.tree.map(lambda p: np.zeros(p.shape, np.float64),
                             state.params)
    acc_cov = jax.tree.map(lambda p: np.zeros(p.shape, np.float64),
                           state.params)
    loss = correct = examples = up = down = 0.0
    dropped = 0
    for i in range(k):
      key = jax.random.fold_in(rng, i)
      ctx = {n: v[i] for n, v in cohort.ctx.items()}
      plan, start, trainable, opt_state = client_start(
          state.params, ctx, key, state.round)
      params = start
      c_loss = c_correct = c_n = 0.0
      for s in range(steps):
        mask_b = np.asarray(cohort.mask[i, s])
        if mask_b.sum() == 0:
          continue
        batch = {f: v[i, s] for f, v in cohort.batches.items()}
        params, opt_state, (l, c, n) = local_step(
            params, opt_state, batch, mask_b,
            jax.random.fold_in(round_lib.split_client_key(key)[1], s), start,
            trainable, plan)
        c_loss += l; c_correct += c; c_n += n  # device scalars: no sync
      c_loss, c_correct, c_n = float(c_loss), float(c_correct), float(c_n)
      delta, cov, bits, dbits = client_finish(state.params, start, params,
                                              trainable, plan, key)
      up += float(bits); down += float(dbits)
      finite = (all(np.all(np.isfinite(x)) for x in jax.tree.leaves(delta))
                and np.isfinite(c_loss))
      if not finite:
        dropped += int(cohort.weight[i] > 0)
        continue
      w = float(cohort.weight[i])
      acc_delta = jax.tree.map(lambda a, d: a + w * np.asarray(d, np.float64),
                               acc_delta, delta)
      acc_cov = jax.tree.map(lambda a, d: a + w * np.asarray(d, np.float64),
                             acc_cov, cov)
      loss += c_loss; correct += c_correct; examples += c_n
    to32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
    new_state = server_step(state, to32(acc_delta), to32(acc_cov))
    n = max(examples, 1.0)
    metrics: dict[str, Any] = dict(
        train_loss=loss / n, train_accuracy=correct / n, num_clients=k,
        num_dropped=dropped, upload_bits=up / k, download_bits=down / k)
    return new_state, metrics

  return reference_round
