"""Where the C = 1 round loses to the centralized floor (issue 18 item 3).

On `ragged.py`'s Stack Overflow-shaped cohort (50 clients, one epoch of
batch 16 over at most `--cap` sequences, its tiny causal Transformer), the
same real steps are timed as:

  floor_scan         ragged.py's floor: one model, one `lax.scan`, no metrics
  floor_fori         the same as a `fori_loop` of dynamic trip count, rows
                     indexed per step (how the round loops)
  floor_select       + the round's padded-step select on the parameters
  floor_stats        + the round's training sums (`Sums`: loss, accuracy
                     hits via `task.argmax_hits`, units)
  floor_stats_argmax the same with `argmax(logits) == y` for the hits (what
                     the tasks did before 57b6638)
  chunks, lanes      the round, chunked and on lanes (`--chunk` wide)

each the median of `--rounds` after a warm-up, every variant in one process
in turn (so a slow spell hits all). Ratios are to `floor_scan`.

  python benchmarks/round_overhead.py            # ~2 min on one core

Last line (also in benchmarks/results/round_overhead.json): seconds and
`over_floor` per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ragged  # noqa: E402  (the cohort, model and floor of ragged.py)

from fedjax_eff import core  # noqa: E402
from fedjax_eff.core import round as round_lib  # noqa: E402
from fedjax_eff.data import cohort as cohort_lib  # noqa: E402
from fedjax_eff.models import get_model  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--cap', type=int, default=256)
  ap.add_argument('--chunk', type=int, default=1)
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--out', default=os.path.join(
      ragged.ROOT, 'benchmarks', 'results', 'round_overhead.json'))
  args = ap.parse_args(argv)
  B = ragged.B
  model = get_model('transformer', ragged.VOCAB, causal=True,
                    tied_embeddings=True, max_len=64, num_layers=2,
                    d_model=32, num_heads=2, mlp_dim=64,
                    vocab_size=ragged.VOCAB)
  params = model.init(jax.random.key(0),
                      np.zeros((1, ragged.SEQ), np.int32))['params']
  data = ragged.so_shaped_data(2000)
  steps = cohort_lib.epoch_steps(data.client_sizes, B, 1, args.cap)
  ids = np.random.default_rng(1).choice(data.num_clients, ragged.CLIENTS,
                                        replace=False)
  cohort = cohort_lib.pack(data, ids, steps=steps, batch_size=B, seed=0,
                           round_num=0, epochs=1, max_examples=args.cap)
  real = np.asarray(cohort.mask).reshape(-1, B).any(axis=1)
  batches = jax.device_put({k: np.asarray(v).reshape((-1, B) + v.shape[3:])[
      real] for k, v in cohort.batches.items()})
  mask = jax.device_put(np.asarray(cohort.mask).reshape(-1, B)[real])
  n = jnp.int32(mask.shape[0])
  opt = optax.sgd(ragged.LR)
  task = core.next_token()

  def argmax_task():
    def correct(logits, batch):
      y = batch['y'].astype(jnp.int32)
      hit = (jnp.argmax(logits, -1) == y) & (y != 0) & (y != 2) & (y != 3)
      return jnp.sum(hit.astype(jnp.float32), -1)
    return task._replace(correct=correct)

  def fori(select: bool, stats, loop_task=task):
    loss_fn = round_lib.make_loss_fn(model, loop_task)

    @jax.jit
    def run(p, key):
      def body(s, carry):
        p, st = carry
        batch = {k: v[s] for k, v in batches.items()}
        g, sums = jax.grad(loss_fn, has_aux=True)(
            p, batch, mask[s], jax.random.fold_in(key, s), p, {})
        new = optax.apply_updates(p, opt.update(g, opt.init(p), p)[0])
        if select:
          real = jnp.sum(mask[s]) > 0
          new = jax.tree.map(lambda a, b: jnp.where(real, a, b), new, p)
        return new, (jax.tree.map(jnp.add, st, sums) if stats else st)
      z = jnp.zeros(())
      return jax.lax.fori_loop(0, n, body,
                               (p, core.task.Sums(z, z, z, z)))
    return lambda r: run(params, jax.random.key(r))

  floor = ragged.floor_fn(model, task, cohort)
  rounds = {lanes: core.build_round(
      model, task, core.identity(), opt, core.make_optimizer('fedavg', 1.0),
      chunk_size=args.chunk, donate=False, lanes=lanes)
      for lanes in (False, True)}
  state = rounds[False].init(params)
  variants = {
      'floor_scan': lambda r: floor(params, r),
      'floor_fori': fori(False, False),
      'floor_select': fori(True, False),
      'floor_stats': fori(True, True),
      'floor_stats_argmax': fori(True, True, argmax_task()),
      'chunks': lambda r: rounds[False].round_step(state, cohort,
                                                   jax.random.key(r)),
      'lanes': lambda r: rounds[True].round_step(state, cohort,
                                                 jax.random.key(r)),
  }
  seconds = {k: ragged.timed(f, args.rounds) for k, f in variants.items()}
  out = dict(seconds=seconds, over_floor={
      k: v / seconds['floor_scan'] for k, v in seconds.items()},
      real_steps=int(mask.shape[0]), cap=args.cap, chunk=args.chunk,
      rounds=args.rounds, jax=jax.__version__,
      backend=jax.default_backend())
  for k, v in seconds.items():
    print(f'{k:20s} {v:.3f} s  {out["over_floor"][k]:.2f}x the floor',
          flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(out, f, indent=1)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
