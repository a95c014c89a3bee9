"""Explicit list of blocks vs `nn.scan` over layers: compile and step time.

`fedjax_eff.models.Transformer` and `ViT` keep their blocks as a Python list
(`block_0`..`block_{L-1}`) so that techniques can make static per-layer
choices (`depth`, `stop_below`, gates). `nn.scan` over one stacked block is
the usual alternative: one block traced and compiled once, whatever L. This
script measures what the list costs on the 'small' presets (6 layers,
d_model 256, 4 heads, mlp 1024):

* `list`: the library model as is;
* `scan`: the same embedding, blocks and head with the blocks under
  `nn.scan` (defined here). Its parameters are the list model's, stacked,
  and the script checks that both give the same loss before timing.

Step = one jitted SGD training step: cross-entropy, `jax.grad`, update.
`compile s` = `jit(step).lower(...).compile()` (trace + XLA compile).
Steps are timed one by one (blocked), alternating list and scan so that a
slow spell of a shared machine hits both; the median is reported.

Workloads: ViT on 28x28x1 images (patch 4: 49 tokens), 62 classes; text
encoder classifier on 64 tokens, vocab 10k, 2 classes; batch 32, dropout 0.

Run:

  python benchmarks/layer_stack.py
  python benchmarks/layer_stack.py --models vit --steps 20 --preset tiny

Prints a table, then ratios (list / scan, > 1: the list is slower), and as
its last line one JSON object: `compile_s_list`, `compile_s_scan`,
`step_s_list`, `step_s_scan` of the first model of `--models` (ViT by
default), `by_model` with the same per model, and the machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_eff.models.transformer import (Block, Head, PatchEmbed,
                                           TokenEmbed, Transformer, ViT,
                                           transformer_preset, vit_preset)


class _ScanBody(nn.Module):
  """One block as a scan body: (h, mask) -> (h, None)."""
  num_heads: int
  mlp_dim: int
  train: bool = False

  @nn.compact
  def __call__(self, h, mask):
    return Block(self.num_heads, self.mlp_dim, name='block')(
        h, mask, self.train), None


def _scan_blocks(m, h, mask, train):
  stack = nn.scan(_ScanBody, variable_axes={'params': 0},
                  split_rngs={'params': True, 'dropout': True},
                  in_axes=nn.broadcast, length=m.num_layers)
  h, _ = stack(m.num_heads, m.mlp_dim, train, name='blocks')(h, mask)
  return h


class ScanViT(ViT):
  """`ViT` (mean pooling, linear head) with its blocks under `nn.scan`."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = PatchEmbed(self.patch_size, self.d_model, name='embed')(x)
    h = _scan_blocks(self, h, None, train)
    return Head(self.num_classes, name='head')(h.mean(1))[1]


class ScanTransformer(Transformer):
  """Encoder `Transformer` (mean pooling) with its blocks under `nn.scan`."""

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    h = TokenEmbed(self.vocab_size, self.d_model, self.max_len,
                   name='embed')(tokens)
    keep = tokens != self.pad_id
    h = _scan_blocks(self, h, keep[:, None, None, :], train)
    w = keep.astype(h.dtype)[..., None]
    pooled = (h * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
    return Head(self.num_classes, name='head')(pooled)[1]


def stack_params(params, num_layers):
  """List-model parameters -> scan-model parameters (blocks stacked)."""
  p = params['params']
  blocks = [p[f'block_{i}'] for i in range(num_layers)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
  return {'params': {'embed': p['embed'], 'head': p['head'],
                     'blocks': {'block': stacked}}}


def workload(name, preset, batch, seq_len, seed):
  rng = np.random.default_rng(seed)
  if name == 'vit':
    kw = dict(num_classes=62, **vit_preset(preset))
    lst, scn = ViT(**kw), ScanViT(**kw)
    x = jnp.asarray(rng.uniform(size=(batch, 28, 28)), jnp.float32)
  else:
    kw = dict(num_classes=2, vocab_size=10_000, max_len=seq_len,
              **transformer_preset(preset))
    lst, scn = Transformer(**kw), ScanTransformer(**kw)
    x = jnp.asarray(rng.integers(1, 10_000, size=(batch, seq_len)))
  y = jnp.asarray(rng.integers(0, kw['num_classes'], size=(batch,)))
  return lst, scn, x, y


def make_step(model, lr):
  def loss(p, x, y):
    logits = model.apply(p, x, True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(p, x, y):
    l, g = jax.value_and_grad(loss)(p, x, y)
    return jax.tree.map(lambda a, b: a - lr * b, p, g), l
  return loss, step


def bench_model(name, args):
  lst, scn, x, y = workload(name, args.preset, args.batch_size, args.seq_len,
                            args.seed)
  p_list = jax.jit(lst.init)(jax.random.key(args.seed), x)
  p_scan = stack_params(p_list, lst.num_layers)
  n_params = sum(a.size for a in jax.tree.leaves(p_list))
  out = {'params': n_params}
  steps, losses = {}, {}
  for tag, m, p in (('list', lst, p_list), ('scan', scn, p_scan)):
    loss, step = make_step(m, args.lr)
    losses[tag] = float(jax.jit(loss)(p, x, y))
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(p, x, y).compile()
    out[f'compile_s_{tag}'] = time.perf_counter() - t0
    steps[tag] = (compiled, p)
  if not np.isclose(losses['list'], losses['scan'], rtol=1e-4, atol=1e-5):
    raise AssertionError(f'{name}: list and scan disagree: {losses}')
  times = {'list': [], 'scan': []}
  order = ['list', 'scan']
  for i in range(args.warmup + args.steps):
    for tag in (order if i % 2 == 0 else order[::-1]):
      compiled, p = steps[tag]
      t0 = time.perf_counter()
      p, l = compiled(p, x, y)
      jax.block_until_ready((p, l))
      if i >= args.warmup:
        times[tag].append(time.perf_counter() - t0)
      steps[tag] = (compiled, p)
  for tag in order:
    out[f'step_s_{tag}'] = statistics.median(times[tag])
    out[f'step_s_{tag}_min'] = min(times[tag])
  return out


def machine_info() -> dict:
  cpu = None
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f
                  if line.startswith('model name')), None)
  except OSError:
    pass
  versions = {p: importlib.metadata.version(p)
              for p in ('jax', 'jaxlib', 'flax', 'numpy')}
  return dict(nproc=os.cpu_count(), cpu=cpu, platform=platform.platform(),
              python=platform.python_version(),
              backend=jax.default_backend(), versions=versions)


def main(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', default='vit,transformer',
                 help='comma-separated: vit, transformer.')
  p.add_argument('--preset', default='small', choices=('tiny', 'small',
                                                       'base'))
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--seq_len', type=int, default=64)
  p.add_argument('--steps', type=int, default=10,
                 help='timed steps per variant, after --warmup.')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--lr', type=float, default=0.01)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default=None, help='also write the JSON here.')
  args = p.parse_args(argv)
  names = [n.strip() for n in args.models.split(',') if n.strip()]
  for n in names:
    if n not in ('vit', 'transformer'):
      raise SystemExit(f'unknown model {n!r}')

  by_model = {n: bench_model(n, args) for n in names}
  print(f'preset={args.preset} batch={args.batch_size} '
        f'seq_len={args.seq_len} (text) steps={args.steps}')
  print(f"{'model':<12} {'params':>10} {'compile list':>13} "
        f"{'compile scan':>13} {'ratio':>6} {'step list':>10} "
        f"{'step scan':>10} {'ratio':>6}")
  for n, r in by_model.items():
    print(f"{n:<12} {r['params']:>10,} {r['compile_s_list']:>12.2f}s "
          f"{r['compile_s_scan']:>12.2f}s "
          f"{r['compile_s_list'] / r['compile_s_scan']:>5.2f}x "
          f"{r['step_s_list'] * 1e3:>8.1f}ms {r['step_s_scan'] * 1e3:>8.1f}ms "
          f"{r['step_s_list'] / r['step_s_scan']:>5.2f}x")
  print('ratio = list / scan (> 1: the explicit list is slower).')
  first = by_model[names[0]]
  summary = {k: round(first[k], 5) for k in ('compile_s_list',
                                             'compile_s_scan', 'step_s_list',
                                             'step_s_scan')}
  summary.update(model=names[0], preset=args.preset,
                 by_model={n: {k: (round(v, 5) if isinstance(v, float) else v)
                               for k, v in r.items()}
                           for n, r in by_model.items()},
                 machine=machine_info())
  line = json.dumps(summary)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(line + '\n')
  print(line)


if __name__ == '__main__':
  main()
