"""SCAFFOLD: control variates against client drift (Karimireddy et al.
2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
Algorithm 1 with option II).

The server keeps a control variate c, each client i its own c_i (zeros at
first). Each local step corrects the client's gradient,

  y <- y - η_l (g_i(y) - c_i + c),

and after its K real local steps the client sets

  c_i+ = c_i - c + (x - y) / (K η_l)      (option II; Δ = x - y)

and feeds back Δc_i = c_i+ - c_i. The server averages the deltas as
usual (its optimizer plays the global step size η_g) and sets

  c <- c + (1 / N) Σ_{i in S} Δc_i

over the round's aggregated clients S and the population N. What travels
doubles: each client downloads c beside the model and uploads Δc_i beside
its Δ (fp32, model-sized; both counted in upload_bits/download_bits). c
is server state (checkpointed with the server); the c_i live in the round's
client-state store (N x model size). Option II assumes the client
optimizer is plain SGD with learning rate η_l (`client_learning_rate`);
with another client optimizer (x - y) / (K η_l) is only a heuristic
estimate of the client's mean gradient. A client with no real step keeps
its c_i.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_eff.core.technique import Technique, TechniqueState, hparam
from fedjax_eff.core.technique import tree_bits


def scaffold(client_learning_rate: float,
             follow_client_optimizer: bool = False) -> Technique:
  """SCAFFOLD with the client's SGD learning rate η_l.

  `follow_client_optimizer`: η_l is the client optimizer's own, so a
  replica with its own client learning rate (`ServerState.hparams
  ['client_learning_rate']`, `experiment/replicas.py`) uses that one.
  """
  if not client_learning_rate > 0:
    raise ValueError(f'scaffold client_learning_rate={client_learning_rate}'
                     ' must be > 0.')
  static_lr = client_learning_rate

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return TechniqueState(server=zeros, client=zeros, feedback=zeros)

  def plan(rng, round_num, ctx):
    del rng, round_num
    lr = (hparam(ctx, 'client_learning_rate', static_lr)
          if follow_client_optimizer else static_lr)
    return ctx['server_state'], ctx['client_state'], lr  # (c, c_i, η_l)

  def correct(grads, plan):
    c, c_i, _ = plan
    return jax.tree.map(lambda g, a, b: g - b + a, grads, c, c_i)

  def finish(delta, sent, plan, steps):
    del sent
    c, c_i, lr = plan
    trained = steps > 0
    new = jax.tree.map(
        lambda ci, cc, d: jnp.where(
            trained, ci - cc + d / (jnp.maximum(steps, 1) * lr), ci),
        c_i, c, delta)
    return new, jax.tree.map(jnp.subtract, new, c_i)

  def server_update(c, feedback_sum, info):
    return jax.tree.map(lambda a, f: a + f / info['population'], c,
                        feedback_sum)

  return Technique(name='scaffold', plan=plan, init=init, correct=correct,
                   finish=finish, server_update=server_update,
                   side_download=lambda plan: tree_bits(plan[0]))


__all__ = ['scaffold']
