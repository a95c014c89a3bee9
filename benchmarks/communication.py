"""Upload bits vs accuracy: full updates, quantized updates, partial
training and FedYolo modules, fine-tuning one pretrained backbone.

The backbone (`configs/fedyolo_backbone.py`: a ViT of 4 blocks, d_model 512,
8.4M parameters) is pretrained centrally on digits 0-4 (`launch/pretrain`'s
code path, cached in `--workdir`), then every variant fine-tunes it
federatedly on digits 5-9 (new classes, a fresh head; 50 clients, Dirichlet
0.5, 10 per round, 4 local Adam steps of batch 16), in one run:

  full        full model, fp32 update (the baseline)
  q8, q4, q2  full model, k-bit stochastic quantized update (block 256)
  partial     partial training: the last block + head (fixed)
  head        head only (frozen backbone)
  lora_r4/r8  LoRA rank 4 / 8 on the attention query and value kernels
  adapter     bottleneck adapters (dim 16) after every MLP
  prompt      8 learned prompt tokens
  local       no server: every client fine-tunes (full model) alone

For each: upload bits per client per round (exact, from the run's metrics),
download bits per round, final test accuracy, upload_ratio = full fp32
upload / variant upload, and the accuracy gap to `full`. Module variants
keep the backbone frozen, so their download after the first round is the
modules and head too.

  python benchmarks/communication.py                 # ~25 min on 2 CPU cores
  python benchmarks/communication.py --rounds 5 --variants full,lora_r4
  python benchmarks/communication.py --rounds 120 --seeds 0,1,2 \
      --variants full,lora_r4                        # mean over seeds
  python benchmarks/communication.py --replot \
      --out benchmarks/results/communication_120_seeds.json  # PNG from JSON

Last line: one JSON object with `upload_ratio` and `accuracy` per variant
(and `upload_bits`, `download_bits`, `accuracy_gap`, `seconds`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time

import jax
import ml_collections
import numpy as np
import plots

from fedjax_eff.experiment import pretrain as pretrain_lib
from fedjax_eff.experiment import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Adam learning rates, tuned per family on 8-25 round probes: full-model
# updates 3e-4; LoRA and adapters 3e-3; the smallest modules (head, prompt)
# 1e-2 (3e-2 overfits the non-IID clients).
FULL_LR, MODULE_LR, SMALL_LR = 3e-4, 3e-3, 1e-2


def _entry(**kw):
  return ml_collections.ConfigDict(kw)


# name -> (extra model kwargs, techniques, client learning rate, mode)
VARIANTS = {
    'full': ({}, [], FULL_LR, 'federated'),
    'q8': ({}, [_entry(name='quantize', bits=8, block_size=256)], FULL_LR,
           'federated'),
    'q4': ({}, [_entry(name='quantize', bits=4, block_size=256)], FULL_LR,
           'federated'),
    'q2': ({}, [_entry(name='quantize', bits=2, block_size=256)], FULL_LR,
           'federated'),
    'partial': ({}, [_entry(name='partial_training', layers=[3],
                            train_head=True)], FULL_LR, 'federated'),
    'head': ({}, [_entry(name='modules', kinds='')], SMALL_LR, 'federated'),
    'lora_r4': (dict(lora_rank=4), [_entry(name='modules', kinds='lora')],
                MODULE_LR, 'federated'),
    'lora_r8': (dict(lora_rank=8), [_entry(name='modules', kinds='lora')],
                MODULE_LR, 'federated'),
    'adapter': (dict(adapter_dim=16), [_entry(name='modules',
                                              kinds='adapter')],
                MODULE_LR, 'federated'),
    'prompt': (dict(prompt_len=8), [_entry(name='modules', kinds='prompt')],
               SMALL_LR, 'federated'),
    'local': ({}, [], FULL_LR, 'local'),
}


def _backbone_config():
  path = os.path.join(ROOT, 'configs', 'fedyolo_backbone.py')
  spec = importlib.util.spec_from_file_location('_backbone', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def downstream_config(name: str, rounds: int, backbone: str):
  model_kw, techniques, lr, mode = VARIANTS[name]
  c = _backbone_config()
  c.num_rounds, c.clients_per_round = rounds, 10
  c.data.classes = [5, 6, 7, 8, 9]
  c.data.num_clients, c.data.heldout_clients = 50, 0
  for k, v in model_kw.items():
    c.model.kwargs[k] = v
  c.techniques = techniques
  c.client.optimizer, c.client.learning_rate = 'adam', lr
  c.client.local_steps, c.client.batch_size = 4, 16
  c.init_checkpoint, c.init_checkpoint_skip = backbone, '^head'
  c.mode = mode
  c.local.num_clients = 10
  c.eval_every = max(rounds // 3, 1)
  c.checkpoint_every = rounds
  c.progress = False
  c.tensorboard = False
  return c


def plot(rows: dict, path: str) -> None:
  """Accuracy against upload bits per client per round (log scale); with
  several seeds, their mean and standard deviation."""
  seeds = max(len(r.get('accuracy_per_seed') or [0]) for r in rows.values())
  plots.labelled_scatter(
      {n: (r['upload_bits'] / 8e3, r['accuracy'],
           float(np.std(r['accuracy_per_seed'], ddof=1)) if seeds > 1
           else None)
       for n, r in rows.items() if r['upload_bits']}, path,
      xlabel='upload per client per round (kB)',
      ylabel='test accuracy' + (f' (mean ± s.d., {seeds} seeds)'
                                if seeds > 1 else ''),
      title='Fine-tuning a pretrained ViT: upload vs accuracy')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=60)
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--seeds', default='0',
                      help='comma-separated config.seed values; accuracy is '
                      'their mean (cohorts, local shuffles, head init)')
  parser.add_argument('--workdir', default='/tmp/fedjax_eff_communication')
  parser.add_argument('--out', default=os.path.join(
      ROOT, 'benchmarks', 'results', 'communication.json'))
  parser.add_argument('--replot', action='store_true',
                      help='train nothing: redraw --out\'s PNG from its JSON')
  args = parser.parse_args()
  if args.replot:
    with open(args.out) as f:
      plot(json.load(f)['variants'], os.path.splitext(args.out)[0] + '.png')
    return
  names = [v for v in args.variants.split(',') if v]
  bad = [v for v in names if v not in VARIANTS]
  if bad:
    parser.error(f'unknown variants {bad}; choose from {list(VARIANTS)}')
  print(f'jax {jax.__version__} on {jax.default_backend()} '
        f'({platform.processor() or platform.machine()}), '
        f'{os.cpu_count()} cpus')

  t0 = time.time()
  backbone = os.path.join(args.workdir, 'backbone')
  pre = pretrain_lib.pretrain(_backbone_config(), backbone)
  print(f"backbone: {pre['steps']} steps on digits 0-4, test accuracy "
        f"{pre.get('test_accuracy', float('nan')):.3f} "
        f'({time.time() - t0:.0f} s)', flush=True)

  seeds = [int(x) for x in args.seeds.split(',')]
  rows = {}
  for name in names:
    runs = []
    for seed in seeds:
      t = time.time()
      c = downstream_config(name, args.rounds, backbone)
      c.seed = seed
      s = train_lib.train_and_evaluate(c, os.path.join(
          args.workdir, name if seed == 0 else f'{name}_seed{seed}'))
      runs.append((s, time.time() - t))
    m = runs[0][0]['final_metrics']
    accs = [float(s['final_metrics']['test_accuracy']) for s, _ in runs]
    rows[name] = dict(
        upload_bits=float(m.get('upload_bits', 0.0)),
        download_bits=float(m.get('download_bits', 0.0)),
        accuracy=float(np.mean(accs)),
        accuracy_per_seed=accs,
        initial_download_bits=float(runs[0][0]['initial_download_bits']),
        num_params=int(runs[0][0]['num_params']),
        seconds=float(np.mean([t for _, t in runs])))
    print(f"{name:8s} up {rows[name]['upload_bits'] / 8e3:10.1f} kB  "
          f"down {rows[name]['download_bits'] / 8e3:10.1f} kB  "
          f"acc {rows[name]['accuracy']:.3f} "
          f"({', '.join(f'{a:.3f}' for a in accs)})  "
          f"({rows[name]['seconds']:.0f} s per run)", flush=True)

  full = rows.get('full')
  print(f"\n{'variant':8s} {'upload kB':>10s} {'upload_ratio':>12s} "
        f"{'accuracy':>8s} {'gap':>6s}")
  for name, r in rows.items():
    if full and r['upload_bits']:
      r['upload_ratio'] = full['upload_bits'] / r['upload_bits']
    else:
      r['upload_ratio'] = None  # nothing uploaded (local) or no baseline
    r['accuracy_gap'] = (full['accuracy'] - r['accuracy']) if full else None
    ratio = (f"{r['upload_ratio']:12.1f}" if r['upload_ratio'] else
             f"{'-':>12s}")
    gap = f"{r['accuracy_gap']:6.3f}" if full else f"{'-':>6s}"
    print(f"{name:8s} {r['upload_bits'] / 8e3:10.1f} {ratio} "
          f"{r['accuracy']:8.3f} {gap}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  plot(rows, os.path.splitext(args.out)[0] + '.png')
  with open(args.out, 'w') as f:
    json.dump({'rounds': args.rounds, 'seeds': seeds,
               'backbone_test_accuracy':
               pre.get('test_accuracy'), 'variants': rows,
               'jax': jax.__version__, 'backend': jax.default_backend()},
              f, indent=2)
  print(json.dumps({
      'upload_ratio': {k: r['upload_ratio'] for k, r in rows.items()},
      'accuracy': {k: r['accuracy'] for k, r in rows.items()},
      'accuracy_gap': {k: r['accuracy_gap'] for k, r in rows.items()},
      'upload_bits': {k: r['upload_bits'] for k, r in rows.items()},
      'download_bits': {k: r['download_bits'] for k, r in rows.items()},
      'seconds': {k: round(r['seconds'], 1) for k, r in rows.items()},
  }))


if __name__ == '__main__':
  main()
