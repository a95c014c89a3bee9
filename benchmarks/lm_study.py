"""Perplexity vs upload: Ro et al.'s language-model study, CPU-sized.

Reproduces technique 1 of TECHNIQUES.md (Ro et al. 2022, "Scaling Language
Model Size in Cross-Device Federated Learning") on the offline federated
corpus of `configs/lm/stdlib.py` (the Python standard library, one client
per module, SentencePiece BPE): the grid of `configs/lm/` with smaller
models, vocabulary and round budget so it runs on a laptop:

  lstm_*        the Stack Overflow LSTM's shape (embed -> LSTM -> proj ->
                vocab), scaled down; fp32 uploads (the baseline)
  tf_*          a causal Transformer of the same size (tied embeddings)
  *_fedavg/_fedadam/_fedyogi   server optimizer (Reddi et al.'s settings)
  tf_partial    train the top half of the blocks (embedding frozen)
  tf_q8, tf_q4  8- / 4-bit stochastic-rounding uploads
  tf_partial_q4 both
  tf_pre_partial_q4  central pretraining on 20% of the modules (disjoint
                from the federated ones), then partial + 4-bit fine-tuning
                (also with 8 bits, and with FedAvg instead of FedAdam)
  cf_*          a causal Conformer LM of the same size (2 blocks)

For each: held-out-module perplexity at the end, upload bytes per client
per round (exact, from metrics.jsonl), and the upload ratio against the
fp32 LSTM with the same server optimizer (FedAdam). The claim under test:
a Transformer variant matches the LSTM's perplexity with >= 10x less
upload.

  python benchmarks/lm_study.py                  # ~35 min on 2 CPU cores
  python benchmarks/lm_study.py --rounds 5 --variants lstm_fedadam,tf_q4
  python benchmarks/lm_study.py --replot         # the PNG from the JSON

Writes benchmarks/results/lm_study.{json,md,png}. Last line: one JSON
object with `perplexity` and `upload_bytes_per_client_round` per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np
import plots

from fedjax_eff.experiment import pretrain as pretrain_lib
from fedjax_eff.experiment import train as train_lib
from fedjax_eff.experiment.defaults import load_config_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM = load_config_module(os.path.join(ROOT, 'configs', 'lm', 'x.py'),
                        'stdlib')
VOCAB = 2_000
# Same-size models (~0.6M parameters with a 2k vocabulary).
SIZES = {
    'lstm_lm': dict(vocab_size=VOCAB, embed_dim=64, lstm_dim=256,
                    proj_dim=64, num_lstm_layers=1),
    'transformer': dict(causal=True, tied_embeddings=True, max_len=20,
                        vocab_size=VOCAB, num_layers=4, d_model=96,
                        num_heads=4, mlp_dim=384),
    # Two conformer blocks (two half-FFNs and a causal conv module each)
    # weigh about as much as four Transformer blocks.
    'conformer_lm': dict(max_len=20, vocab_size=VOCAB, num_layers=2,
                         d_model=96, num_heads=4, mlp_dim=384,
                         conv_kernel=7),
}
# name -> configs/lm/stdlib.py spec
VARIANTS = {
    'lstm_fedavg': 'lstm,fedavg',
    'lstm_fedadam': 'lstm,fedadam',
    'lstm_fedyogi': 'lstm,fedyogi',
    'tf_fedavg': 'transformer,fedavg',
    'tf_fedadam': 'transformer,fedadam',
    'tf_fedyogi': 'transformer,fedyogi',
    'tf_partial': 'transformer,fedadam,partial',
    'tf_q8': 'transformer,fedadam,q8',
    'tf_q4': 'transformer,fedadam,q4',
    'tf_partial_q4': 'transformer,fedadam,partial,q4',
    'tf_pre_partial_q4': 'transformer,fedadam,partial,q4,pretrain',
    'tf_pre_partial_q8': 'transformer,fedadam,partial,q8,pretrain',
    'tf_pre_partial_q4_fedavg': 'transformer,fedavg,partial,q4,pretrain',
    'cf_fedadam': 'conformer,fedadam',
    'cf_partial_q4': 'conformer,fedadam,partial,q4',
}
BASELINE = 'lstm_fedadam'


def config(spec: str, rounds: int, clients: int, steps: int):
  c = LM.get_config(spec)
  c.model.kwargs = dict(SIZES[c.model.name])
  c.data.vocab_size = VOCAB
  c.data.max_sequences = 256
  c.num_rounds, c.clients_per_round = rounds, clients
  c.client.local_steps = steps
  c.eval_every = c.checkpoint_every = rounds
  c.accounting = False
  c.progress = c.tensorboard = False
  c.pretrain.steps, c.pretrain.batch_size = 400, 64
  c.pretrain.log_every = c.pretrain.checkpoint_every = 100
  return c


def plot(rows: dict, path: str) -> None:
  """Held-out perplexity against upload MB per client per round."""
  plots.labelled_scatter(
      {n: (r['upload_bytes_per_client_round'] / 1e6, r['perplexity'])
       for n, r in rows.items()}, path,
      xlabel='upload per client per round (MB)',
      ylabel='held-out perplexity',
      title='Federated LMs on the Python stdlib: perplexity vs upload',
      square=lambda n: n.startswith('lstm'))


def table(rows: dict) -> str:
  lines = ['| variant | spec | params | upload MB/client/round | upload '
           'ratio vs ' + BASELINE + ' | held-out perplexity | held-out '
           'accuracy | s |', '|' + '---|' * 8]
  for name, r in rows.items():
    ratio = r.get('upload_ratio')
    lines.append(
        f"| {name} | {r['spec']} | {r['num_params']:,} | "
        f"{r['upload_bytes_per_client_round'] / 1e6:.3f} | "
        f"{'-' if ratio is None else f'{ratio:.1f}x'} | "
        f"{r['perplexity']:.2f} | {r['accuracy']:.3f} | "
        f"{r['seconds']:.0f} |")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=80)
  parser.add_argument('--clients', type=int, default=10)
  parser.add_argument('--steps', type=int, default=8)
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--workdir', default='/tmp/fedjax_eff_lm_study')
  parser.add_argument('--out', default=os.path.join(
      ROOT, 'benchmarks', 'results', 'lm_study.json'))
  parser.add_argument('--merge', action='store_true',
                      help='keep the other variants already in --out (same '
                      'rounds/clients/steps) and add or replace these')
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
        f'{os.cpu_count()} cpus; {args.rounds} rounds x {args.clients} '
        f'clients x {args.steps} steps', flush=True)
  rows = {}
  if args.merge and os.path.exists(args.out):
    with open(args.out) as f:
      old = json.load(f)
    if (old['rounds'], old['clients_per_round'], old['local_steps']) != (
        args.rounds, args.clients, args.steps):
      parser.error(f'--merge: {args.out} was run with other settings.')
    rows = old['variants']
  for name in names:
    t = time.time()
    c = config(VARIANTS[name], args.rounds, args.clients, args.steps)
    wd = os.path.join(args.workdir, name)
    if 'pretrain' in VARIANTS[name]:
      pre = pretrain_lib.pretrain(c, os.path.join(wd, 'pretrain'))
      print(f"  pretrained {pre['steps']} steps: held-out perplexity "
            f"{np.exp(pre['test_loss']):.2f}", flush=True)
      c.init_checkpoint = os.path.join(wd, 'pretrain')
    s = train_lib.train_and_evaluate(c, os.path.join(wd, 'federated'))
    m = s['final_metrics']
    rows[name] = dict(
        spec=VARIANTS[name], num_params=int(s['num_params']),
        upload_bytes_per_client_round=float(m['upload_bits']) / 8,
        download_bytes_per_client_round=float(m['download_bits']) / 8,
        perplexity=float(m['test_perplexity']),
        accuracy=float(m['test_accuracy']),
        train_loss=float(m['train_loss']), seconds=time.time() - t)
    r = rows[name]
    print(f"{name:18s} up {r['upload_bytes_per_client_round'] / 1e6:7.3f} MB"
          f"  ppl {r['perplexity']:7.2f}  acc {r['accuracy']:.3f}  "
          f"({r['seconds']:.0f} s)", flush=True)
  base = rows.get(BASELINE)
  for r in rows.values():
    r['upload_ratio'] = (base['upload_bytes_per_client_round'] /
                         r['upload_bytes_per_client_round'] if base else None)
    r['perplexity_vs_baseline'] = (r['perplexity'] / base['perplexity']
                                   if base else None)
  md = table(rows)
  print('\n' + md)
  if base:
    wins = [n for n, r in rows.items() if n.startswith('tf_')
            and r['upload_ratio'] >= 10 and r['perplexity'] <= base['perplexity']]
    print(f"\nTransformer variants with <= {BASELINE}'s perplexity "
          f"({base['perplexity']:.2f}) and >= 10x less upload: "
          f"{wins or 'none'}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  stem = os.path.splitext(args.out)[0]
  plot(rows, stem + '.png')
  with open(stem + '.md', 'w') as f:
    f.write(md + '\n')
  with open(args.out, 'w') as f:
    json.dump({'rounds': args.rounds, 'clients_per_round': args.clients,
               'local_steps': args.steps, 'vocab_size': VOCAB,
               'variants': rows, 'jax': jax.__version__,
               'backend': jax.default_backend()}, f, indent=2)
  print(json.dumps({
      'perplexity': {k: round(r['perplexity'], 3) for k, r in rows.items()},
      'upload_bytes_per_client_round': {
          k: r['upload_bytes_per_client_round'] for k, r in rows.items()},
      'upload_ratio': {k: None if r['upload_ratio'] is None
                       else round(r['upload_ratio'], 2)
                       for k, r in rows.items()},
  }))


if __name__ == '__main__':
  main()
