"""Work proportional to real examples: ragged cohorts (issue 18, item 3).

One local epoch per client (`client.epochs=1`, batch 16) over at most `cap`
sequences, 50 clients per round, on two size distributions:

  stdlib   the project's stdlib corpus (configs/lm/stdlib.py: one client
           per module, 20-token sequences, at most 1,000 per module)
  so       Stack Overflow-shaped sizes: lognormal, median 100 sentences,
           sigma 1.5, clipped to [1, 10,000] (TFF's Stack Overflow is
           heavy-tailed in the same way; its per-user counts are not
           shipped here), on random 20-token sequences

For each (distribution, cap), in one run:

  useful_fraction  real steps / computed steps. A client with m examples
                   has ceil(m / 16) real steps; the round computes, per
                   chunk of C clients, C x the chunk's longest client
                   (`core.round`: later steps are skipped; the host orders
                   clients by step count for C > 1). Fixed-S packing
                   (every client computing the largest client's S steps)
                   gives sum(real) / (K S).
  useful_fraction_c8_lanes
                   the same on C lanes that run several clients back to
                   back (`config.lanes`, `core.round.build_lane_update`):
                   the round's own longest-first schedule, computed = C x
                   the longest lane.
  s/round          the round as it runs now, the same cohort with every
                   client computing all S steps (today's fixed-S packing
                   before issue 18: each client's last step is given one
                   example so that nothing is skipped; timing only), and
                   the floor: the same real steps as one centralized
                   `lax.scan` of one model. C = `--time_chunk` (1, the
                   CPU default; wider on an accelerator). The median of
                   `--rounds` after a warm-up round. `seconds_lanes`: the
                   same round on C lanes (`speedup_lanes_vs_chunks`,
                   `round_over_floor_lanes`).

Model: a causal Transformer LM (2 blocks, d_model 32, tied embeddings),
client SGD, over a vocabulary of 1,000 (the stdlib corpus's 10,004 ids are
folded modulo 1,000: what is measured is the time of the steps a round
computes, and the 10k-way softmax would dominate it on a CPU).

  python benchmarks/ragged.py                  # ~15 min on 2 CPU cores
  python benchmarks/ragged.py --rounds 1 --caps 256 --dists so   # quick

Last line (also in benchmarks/results/ragged.json): `useful_fraction_c1`,
`useful_fraction_c8`, `useful_fraction_c8_lanes`, `round_over_floor`,
`speedup_vs_fixed_steps`, the lanes' timings (each per distribution and
cap) and the fixed-S useful fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_eff import core
from fedjax_eff.core import placement
from fedjax_eff.core import round as round_lib
from fedjax_eff.data import FederatedData, cohort as cohort_lib
from fedjax_eff.data import registry as data_registry
from fedjax_eff.experiment.defaults import load_config_module
from fedjax_eff.models import get_model

B, SEQ, VOCAB, CLIENTS, LR = 16, 20, 1_000, 50, 10 ** -0.5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stdlib_data() -> FederatedData:
  c = load_config_module(os.path.join(ROOT, 'configs', 'lm', 'x.py'),
                         'stdlib').get_config('transformer,fedavg')
  c.data.max_sequences = 1000
  train = data_registry.load(c.data).train
  # Token ids folded into VOCAB (timing only: the sizes are what matter).
  return FederatedData({cid: {k: v % VOCAB for k, v in train.client(
      cid).items()} for cid in train.client_ids})


def so_shaped_data(num_clients: int, seed: int = 0) -> FederatedData:
  rng = np.random.default_rng(seed)
  sizes = np.clip(np.round(rng.lognormal(np.log(100), 1.5, num_clients)),
                  1, 10_000).astype(int)
  seqs = {f'u{i:05d}': rng.integers(4, VOCAB, (n, SEQ + 1)).astype(np.int32)
          for i, n in enumerate(sizes)}
  return FederatedData({k: {'x': v[:, :-1], 'y': v[:, 1:]}
                        for k, v in seqs.items()})


def useful_fraction(steps: np.ndarray, chunk: int) -> float:
  """sum(real steps) / steps computed, with the round's layout."""
  layout = placement.chunk_layout(len(steps), chunk, steps=steps)
  padded = np.append(steps, 0)[np.minimum(layout.order, len(steps))]
  computed = padded.reshape(-1, chunk).max(axis=1).sum() * chunk
  return float(steps.sum() / computed)


def lanes_useful_fraction(steps: np.ndarray, chunk: int) -> float:
  """sum(real steps) / steps computed on `chunk` lanes that run several
  clients back to back (`build_round(lanes=True)`): the round's own
  schedule (`placement.lane_schedule`, longest first), computed = chunk x
  the longest lane."""
  sch = placement.lane_schedule(steps, chunk, int(max(steps.max(), 1)))
  return float(steps.sum() / (chunk * int(sch.length)))


def timed(fn, rounds: int) -> float:
  jax.block_until_ready(fn(0))  # compile + warm-up
  times = []
  for r in range(rounds):
    t = time.perf_counter()
    jax.block_until_ready(fn(r + 1))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def floor_fn(model, task, cohort):
  """One model through the cohort's real steps, one `lax.scan`."""
  real = np.asarray(cohort.mask).reshape(-1, B).any(axis=1)
  batches = {k: np.asarray(v).reshape((-1, B) + v.shape[3:])[real]
             for k, v in cohort.batches.items()}
  mask = np.asarray(cohort.mask).reshape(-1, B)[real]
  loss_fn = round_lib.make_loss_fn(model, task)
  opt = optax.sgd(LR)

  @jax.jit
  def run(params, batches, mask, key):
    def step(p, xs):
      batch, m, s = xs
      g, _ = jax.grad(loss_fn, has_aux=True)(
          p, batch, m, jax.random.fold_in(key, s), p, {})
      return optax.apply_updates(p, opt.update(g, opt.init(p), p)[0]), None
    return jax.lax.scan(step, params, (batches, mask,
                                       jnp.arange(mask.shape[0])))[0]
  return lambda params, r: run(params, batches, mask, jax.random.key(r))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--rounds', type=int, default=2)
  ap.add_argument('--caps', default='256,1000')
  ap.add_argument('--dists', default='stdlib,so')
  ap.add_argument('--chunk', type=int, default=8,
                  help='C of useful_fraction_c8 (counted, not timed).')
  ap.add_argument('--time_chunk', type=int, default=1,
                  help='C of the timed rounds (1: the CPU default; on an '
                  'accelerator, wider chunks ordered by step count).')
  ap.add_argument('--out', default=os.path.join(ROOT, 'benchmarks',
                                                'results', 'ragged.json'))
  args = ap.parse_args(argv)
  print(f'jax {jax.__version__} on {jax.default_backend()} '
        f'({platform.processor() or "?"}, {os.cpu_count()} cores)',
        flush=True)
  model = get_model('transformer', VOCAB, causal=True, tied_embeddings=True,
                    max_len=64, num_layers=2, d_model=32, num_heads=2,
                    mlp_dim=64, vocab_size=VOCAB)
  task = core.next_token()
  params = model.init(jax.random.key(0), np.zeros((1, SEQ), np.int32))[
      'params']
  fns, lane_fns = (core.build_round(
      model, task, core.identity(), optax.sgd(LR),
      core.make_optimizer('fedavg', 1.0), chunk_size=args.time_chunk,
      donate=False, lanes=lanes) for lanes in (False, True))
  state = fns.init(params)
  out = {k: {} for k in ('useful_fraction_c1', 'useful_fraction_c8',
                         'useful_fraction_c8_lanes',
                         'useful_fraction_fixed_steps', 'round_over_floor',
                         'speedup_vs_fixed_steps', 'seconds_per_round',
                         'seconds_fixed_steps', 'seconds_floor',
                         'seconds_lanes', 'round_over_floor_lanes',
                         'speedup_lanes_vs_chunks')}
  datasets = {'stdlib': stdlib_data, 'so': lambda: so_shaped_data(2000)}
  for dist in args.dists.split(','):
    data = datasets[dist]()
    sizes = data.client_sizes
    print(f'{dist}: {data.num_clients} clients, sequences per client '
          f'median {np.median(sizes):.0f}, p90 {np.percentile(sizes, 90):.0f}'
          f', max {sizes.max()}', flush=True)
    for cap in map(int, args.caps.split(',')):
      name = f'{dist}_cap{cap}'
      steps_max = cohort_lib.epoch_steps(sizes, B, 1, cap)
      ids = np.random.default_rng(1).choice(data.num_clients, CLIENTS,
                                            replace=False)
      cohort = cohort_lib.pack(data, ids, steps=steps_max, batch_size=B,
                               seed=0, round_num=0, epochs=1,
                               max_examples=cap)
      steps = placement.client_steps(cohort.mask)
      out['useful_fraction_c1'][name] = useful_fraction(steps, 1)
      out['useful_fraction_c8'][name] = useful_fraction(steps, args.chunk)
      out['useful_fraction_c8_lanes'][name] = lanes_useful_fraction(
          steps, args.chunk)
      out['useful_fraction_fixed_steps'][name] = float(
          steps.sum() / (len(steps) * steps_max))
      # Fixed S: one example in every client's last step (timing only).
      mask = np.array(cohort.mask)
      mask[:, -1, 0] = 1.0
      fixed = cohort._replace(mask=mask)
      now = timed(lambda r: fns.round_step(state, cohort, jax.random.key(r)),
                  args.rounds)
      before = timed(lambda r: fns.round_step(state, fixed,
                                              jax.random.key(r)),
                     args.rounds)
      lanes = timed(lambda r: lane_fns.round_step(state, cohort,
                                                  jax.random.key(r)),
                    args.rounds)
      floor = floor_fn(model, task, cohort)
      flo = timed(lambda r: floor(params, r), args.rounds)
      out['seconds_per_round'][name] = now
      out['seconds_fixed_steps'][name] = before
      out['seconds_floor'][name] = flo
      out['round_over_floor'][name] = now / flo
      out['speedup_vs_fixed_steps'][name] = before / now
      out['seconds_lanes'][name] = lanes
      out['round_over_floor_lanes'][name] = lanes / flo
      out['speedup_lanes_vs_chunks'][name] = now / lanes
      print(f'  cap {cap}: S = {steps_max}, real steps {steps.sum()} of '
            f'{len(steps) * steps_max} fixed; useful fraction C=1 '
            f'{out["useful_fraction_c1"][name]:.3f}, C={args.chunk} '
            f'{out["useful_fraction_c8"][name]:.3f} (on lanes: '
            f'{out["useful_fraction_c8_lanes"][name]:.3f}), fixed S '
            f'{out["useful_fraction_fixed_steps"][name]:.3f}; s/round '
            f'{now:.2f} (fixed S {before:.2f}, lanes {lanes:.2f}, floor '
            f'{flo:.2f}): {before / now:.2f}x faster than fixed S, '
            f'{now / flo:.2f}x the floor; lanes {now / lanes:.2f}x faster '
            f'than chunks, {lanes / flo:.2f}x the floor', flush=True)
  out.update(jax=jax.__version__, backend=jax.default_backend(),
             clients_per_round=CLIENTS, batch_size=B, rounds=args.rounds,
             time_chunk=args.time_chunk)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(out, f, indent=1)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
