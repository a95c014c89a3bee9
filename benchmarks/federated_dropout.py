"""What federated dropout saves a device, and the simulator, per keep ratio.

For the Conformer CTC of `configs/conformer_fd.py` on the offline espeak-ng
speech set, per keep ratio r (every width group keeps round(r * width)
units: with `--scope units`, the default, heads and feed-forward units of
every block; with `--scope all` also the residual width, the conv-module
and front-end channels), side by side with the full model (r = 1) in one
run:

  download / upload bits  exact, what one client's round sends
  FLOPs, peak memory      XLA's cost and memory analysis of the compiled
                          single-client update (`accounting.client_cost`)
  sim seconds per round   the simulator's own time for a round of
                          `--clients` clients x `--steps` local steps (after
                          compilation; the median of `--sim_rounds`)

and ratios against the full model (> 1: cheaper / faster). With
`--train_rounds N` it also trains the config (federated dropout, keep 0.75
-> 0.5 by depth) and the full-model baseline for N rounds and reports the
held-out CER/WER of the full model and of the nested sub-models (the first
r of the units, evaluated alone) of both.

  python benchmarks/federated_dropout.py                     # costs, ~3 min
  python benchmarks/federated_dropout.py --scope all         # every width
  python benchmarks/federated_dropout.py --train_rounds 150  # + CER/WER

Last line: one JSON object with, per keep ratio, `upload_ratio`,
`flops_ratio`, `peak_memory_ratio` and `sim_speedup` (and `cer`/`wer` per
run and sub-model when trained).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import ml_collections

from fedjax_eff.experiment import train as train_lib
from fedjax_eff.experiment.defaults import load_config_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_config(args):
  c = load_config_module(os.path.join(ROOT, 'configs', 'x.py'),
                         'conformer_fd').get_config()
  c.model.kwargs.preset = args.preset
  c.clients_per_round = args.clients
  c.client.local_steps = args.steps
  c.progress = c.tensorboard = False
  return c


def keep_config(args, keep: float):
  c = base_config(args)
  c.techniques = [] if keep == 1.0 else [ml_collections.ConfigDict(dict(
      name='federated_dropout', rate=1.0 - keep, scope=args.scope))]
  return c


def measure(args, keep: float) -> dict:
  exp = train_lib.Experiment(keep_config(args, keep))
  cost = exp.program_cost(0, 0)
  state = exp.init_state()
  cohort = exp.cohort(0).cohort
  times = []
  for r in range(args.sim_rounds + 1):  # round 0 compiles
    t = time.perf_counter()
    state, m = exp.round_fns.round_step(state, cohort, exp.round_key(r),
                                        round_num=r, examples=exp.examples)
    jax.block_until_ready(state.params)
    times.append(time.perf_counter() - t)
  return dict(upload_bits=float(m.upload_bits),
              download_bits=float(m.download_bits),
              flops=float(cost.flops_per_round),
              peak_bytes=float(cost.peak_bytes),
              sim_seconds=statistics.median(times[1:]),
              compile_seconds=times[0])


def train(args, name: str, techniques) -> dict:
  c = base_config(args)
  if techniques is not None:
    c.techniques = techniques
  else:
    c.techniques[0].scope = args.scope
  c.submodel_keeps = [0.25, 0.5, 0.75, 1.0]  # the full baseline's too
  c.num_rounds = args.train_rounds
  c.eval_every = c.checkpoint_every = max(args.train_rounds // 3, 1)
  m = train_lib.train_and_evaluate(
      c, os.path.join(args.workdir, name))['final_metrics']
  return {k: float(v) for k, v in m.items()
          if k.endswith(('_cer', '_wer')) or k == 'upload_bits'}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='cpu')
  parser.add_argument('--scope', default='units', choices=('units', 'all'),
                      help="federated dropout's width groups")
  parser.add_argument('--keeps', default='0.25,0.5,0.75,1.0')
  parser.add_argument('--clients', type=int, default=8)
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--sim_rounds', type=int, default=5)
  parser.add_argument('--train_rounds', type=int, default=0)
  parser.add_argument('--workdir', default='/tmp/fedjax_eff_fd_bench')
  args = parser.parse_args()
  keeps = sorted({float(k) for k in args.keeps.split(',')} | {1.0})
  print(f'jax {jax.__version__} on {jax.default_backend()} '
        f'({platform.processor() or platform.machine()}), '
        f'{os.cpu_count()} cpus; conformer_ctc {args.preset}, scope '
        f'{args.scope}, '
        f'{args.clients} clients x {args.steps} steps per round', flush=True)
  rows = {}
  for keep in keeps:
    rows[keep] = measure(args, keep)
    r = rows[keep]
    print(f"keep {keep:4.2f}: up {r['upload_bits'] / 8e6:7.3f} MB  "
          f"down {r['download_bits'] / 8e6:7.3f} MB  "
          f"{r['flops'] / 1e9:8.2f} GFLOP  peak {r['peak_bytes'] / 2**20:7.1f}"
          f" MiB  {r['sim_seconds']:6.3f} s/round "
          f"(compile {r['compile_seconds']:.1f} s)", flush=True)
  full = rows[1.0]
  out = {}
  print(f"\n{'keep':>5s} {'upload_ratio':>12s} {'flops_ratio':>11s} "
        f"{'peak_memory_ratio':>17s} {'sim_speedup':>11s}")
  for keep, r in rows.items():
    out[f'{keep:g}'] = dict(
        upload_ratio=full['upload_bits'] / r['upload_bits'],
        download_ratio=full['download_bits'] / r['download_bits'],
        flops_ratio=full['flops'] / r['flops'],
        peak_memory_ratio=full['peak_bytes'] / r['peak_bytes'],
        sim_speedup=full['sim_seconds'] / r['sim_seconds'])
    o = out[f'{keep:g}']
    print(f"{keep:5.2f} {o['upload_ratio']:12.2f} {o['flops_ratio']:11.2f} "
          f"{o['peak_memory_ratio']:17.2f} {o['sim_speedup']:11.2f}")
  result = {'per_keep': out}
  if args.train_rounds:
    fd_run = train(args, 'federated_dropout', None)
    full_run = train(args, 'full', [])
    result['trained'] = {'federated_dropout': fd_run, 'full': full_run}
    print(f'\nafter {args.train_rounds} rounds (held-out speakers):')
    for name, m in result['trained'].items():
      subs = ', '.join(f"keep {k}: CER {m[f'keep{k}/test_cer']:.3f}"
                       for k in ('0.25', '0.5', '0.75', '1'))
      print(f"{name:18s} CER {m['test_cer']:.3f} WER {m['test_wer']:.3f}  "
            f"nested sub-models: {subs}")
  print(json.dumps(result))


if __name__ == '__main__':
  main()
