"""What a device pays per round under each layer-structured technique.

For one model (default: the ViT 'base' preset, 12 layers, 37.9M parameters,
on 28x28x1 images, patch 4: 49 tokens), compiles the program each technique
makes a device run (`accounting.client_cost`: the downloaded view and the
batches in, only the packed upload out; XLA's `memory_analysis` and
`cost_analysis`, nothing executed) and prints, per variant, peak memory,
training state (gradients + optimizer state + activations kept for the
backward pass), FLOPs per round, upload/download bits, the bytes the
compiled program returns, and the analytic breakdown, each with its ratio
against full-model FedAvg (> 1: the variant is cheaper).

Variants:
  full                  FedAvg, everything trains
  partial_half          partial variable training, the top half of the layers
  last_{1,2,4}          last-n training (Pfeiffer et al.), head included
  layerwise_l{k}        layer-wise stage with layer k active (depth k+1)
  layerwise_l{L-1}_dd   the last stage with half the frozen layers skipped
                        (what a device drawing depth dropout p=0.5 runs)

Then (`--sim_rounds` > 0) the simulator's own cost of depth dropout: seconds
per round of the last layer-wise stage on the 'small' ViT with p = 0.5 drawn
per client (dynamic gates: exact, every layer still computed) vs per chunk
(unbatched gates: the `lax.cond` really skips), vs no depth dropout.

  python benchmarks/device_cost.py                      # base ViT, ~4 min
  python benchmarks/device_cost.py --preset small --sim_rounds 0

Last line (also written to benchmarks/results/device_cost.json): one JSON
object with `layerwise_peak_memory_ratio` and
`layerwise_training_state_ratio` (full FedAvg over the largest layer-wise
stage measured: what a device must hold across the whole schedule; the
per-stage ratios are under `variants`), `device_outputs_equal_upload`
(every variant's compiled program returns exactly its upload), per variant
`device_peak_bytes`, `training_state_bytes`, `device_sent_bytes`,
`device_flops_per_round`, `upload_bits` and their ratios (full / variant),
and `sim_seconds_per_round` per depth dropout mode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np
import optax

from fedjax_eff import accounting, core, models
from fedjax_eff.core.technique import Technique
from fedjax_eff.data import FederatedData, pack
from fedjax_eff.techniques import last_n, layerwise, partial


def variants(model, num_layers):
  half = tuple(range(num_layers // 2, num_layers))
  out = {'full': core.identity(),
         'partial_half': partial.partial_training(model, layers=half)}
  for n in (1, 2, 4):
    if n <= num_layers:
      out[f'last_{n}'] = last_n.last_n(model, n).specialize(None, 0)
  sched = layerwise.LayerSchedule.make(num_layers, 1)
  lw = layerwise.layerwise(model, sched)
  for k in sorted({0, num_layers // 2, num_layers - 1}):
    out[f'layerwise_l{k}'] = lw.specialize(sched.stage(k), 0)
  k = num_layers - 1
  gates = np.array([i >= k or i % 2 == 1 for i in range(num_layers)])
  out[f'layerwise_l{k}_dd'] = core.chain(
      lw.specialize(sched.stage(k), 0),
      Technique(name='static_gates', forward=lambda plan: dict(
          layer_gates=gates)))
  return out


def sim_seconds(preset, rounds, clients, batch, steps):
  """Seconds per round of the last layer-wise stage, per depth-dropout mode."""
  model = models.get_model('vit', 10, preset=preset, patch_size=4)
  n = model.num_layers
  sched = layerwise.LayerSchedule.make(n, 1)
  rng = np.random.default_rng(0)
  data = FederatedData({f'c{i}': {
      'x': rng.uniform(size=(batch * steps, 28, 28, 1)).astype(np.float32),
      'y': rng.integers(0, 10, batch * steps).astype(np.int32)}
                        for i in range(clients)})
  cohort = pack(data, np.arange(clients), steps=steps, batch_size=batch,
                seed=0, round_num=0)
  params = model.init(jax.random.key(0), cohort.batches['x'][0, 0])['params']
  out = {}
  for mode in ('none', 'client', 'chunk'):
    tech = layerwise.layerwise(model, sched)
    if mode != 'none':
      tech = core.chain(tech, layerwise.depth_dropout(model, sched, 0.5,
                                                      mode))
    fns = core.build_round(model, core.classification(), tech,
                           optax.sgd(0.05), core.make_optimizer('fedavg', 1.0),
                           chunk_size=1, donate=False)
    state = fns.init(params)
    r = n - 1  # the last stage: the most frozen layers to skip
    jax.block_until_ready(fns.round_step(state, cohort, jax.random.key(0),
                                         round_num=r))
    times = []
    for i in range(rounds):
      t = time.perf_counter()
      jax.block_until_ready(fns.round_step(state, cohort,
                                           jax.random.key(i + 1),
                                           round_num=r))
      times.append(time.perf_counter() - t)
    out[mode] = statistics.median(times)
    print(f'sim {mode:>6}: {out[mode]:.3f} s/round (median of {rounds})',
          flush=True)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--preset', default='base')
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--steps', type=int, default=2)
  ap.add_argument('--optimizer', default='adam')
  ap.add_argument('--sim_rounds', type=int, default=5)
  ap.add_argument('--sim_preset', default='small')
  ap.add_argument('--sim_clients', type=int, default=8)
  ap.add_argument('--out', default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), 'results',
      'device_cost.json'))
  args = ap.parse_args()

  model = models.get_model('vit', 10, preset=args.preset, patch_size=4)
  x = np.zeros((args.batch, 28, 28, 1), np.float32)
  batch = {'x': x, 'y': np.zeros((args.batch,), np.int32)}
  params = jax.eval_shape(
      lambda: model.init(jax.random.key(0), x[:1])['params'])
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  opt = core.make_optimizer(args.optimizer, 1e-3)
  print(f'ViT {args.preset}: {model.num_layers} layers, {num_params:,} '
        f'parameters; batch {args.batch}, {args.steps} local steps, client '
        f'{args.optimizer}; jax {jax.__version__} on '
        f'{jax.default_backend()} ({platform.processor() or "?"})',
        flush=True)
  rows = {}
  for name, tech in variants(model, model.num_layers).items():
    t = time.time()
    cost = accounting.client_cost(model, core.classification(), tech, opt,
                                  params, batch, args.steps)
    rows[name] = cost.as_dict()
    print(f'  measured {name} in {time.time() - t:.1f} s', flush=True)
  full = rows['full']
  cols = [('device_peak_bytes', 'peak MB', 1e6, 'peak_ratio'),
          ('training_state_bytes', 'state MB', 1e6, 'training_state_ratio'),
          ('device_flops_per_round', 'GFLOPs', 1e9, 'flops_ratio'),
          ('upload_bits', 'up MB', 8e6, 'upload_ratio'),
          ('download_bits', 'down MB', 8e6, 'download_ratio'),
          ('analytic_gradient_bytes', 'grad MB', 1e6, None),
          ('analytic_optimizer_bytes', 'opt MB', 1e6, None),
          ('analytic_activation_bytes', 'act MB', 1e6, 'activation_ratio')]
  print(f'{"variant":<22}' + ''.join(f'{c[1]:>10}' for c in cols) +
        '   ratios vs full: peak / flops / upload')
  for name, r in rows.items():
    for key, _, _, ratio in cols:
      if ratio:
        r[ratio] = (full[key] / r[key]) if r[key] else None
    print(f'{name:<22}' + ''.join(f'{r[c[0]] / c[2]:>10.2f}' for c in cols) +
          f'   {r["peak_ratio"]:.2f}x / {r["flops_ratio"]:.2f}x / '
          f'{r["upload_ratio"]:.2f}x')
  sim = {}
  if args.sim_rounds:
    sim = sim_seconds(args.sim_preset, args.sim_rounds, args.sim_clients,
                      args.batch, args.steps)
    print(f'depth dropout per chunk vs per client: '
          f'{sim["client"] / sim["chunk"]:.2f}x faster simulation')
  # fp32 messages: the program's outputs are the upload, to the byte.
  equal = all(r['device_sent_bytes'] * 8 == r['upload_bits']
              for r in rows.values())
  print(f'compiled device programs return exactly their upload: {equal}')
  stages = [r for name, r in rows.items()
            if name.startswith('layerwise_l') and not name.endswith('_dd')]
  worst = lambda key: max(r[key] for r in stages)
  headline = {
      'layerwise_peak_memory_ratio': full['device_peak_bytes'] / worst(
          'device_peak_bytes'),
      'layerwise_training_state_ratio': full['training_state_bytes'] / worst(
          'training_state_bytes'),
      'device_outputs_equal_upload': equal,
      'model': f'vit-{args.preset}', 'num_params': num_params,
      'variants': rows, 'sim_seconds_per_round': sim,
      'jax': jax.__version__, 'backend': jax.default_backend()}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(headline, f, indent=1)
  print(json.dumps(headline))


if __name__ == '__main__':
  main()
