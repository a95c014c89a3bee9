"""What the arm-by-arm studies share (privacy.py, devices_in_time.py).

Imported by the scripts next to it (`python benchmarks/X.py` puts this
directory on `sys.path`):

  compile_cache(workdir)        one XLA compile per program across runs
  meta(**fields)                machine, versions and command of the run
  tuned_arm(c, ...)             a server learning rate tuned on seed 0, then
                                the other seeds at it (fair tuning per arm)
  finish(out, path, plot, ...)  JSON and PNG written, headline as last line
  replot(path, plot)            redraw the PNG from the JSON
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import time
from typing import Any, Callable

import jax

from fedjax_eff.experiment.defaults import load_config_module


def quiet_config(name: str, *, rounds: int, eval_every: int):
  """`configs/<name>.py` for a study's runs: `rounds` rounds, evaluated
  every `eval_every`, one checkpoint at the end, no device accounting,
  TensorBoard, progress bar or progress lines."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  c = load_config_module(os.path.join(root, 'configs', 'x.py'),
                         name).get_config()
  c.num_rounds, c.eval_every, c.checkpoint_every = rounds, eval_every, rounds
  c.accounting = c.tensorboard = c.progress = False
  c.log_every_seconds = 0.0
  return c


def common_flags(p, name: str, workdir: str, *, seeds: int = 3,
                 server_lrs: str = '0.5,1.0') -> None:
  """The flags every arm study takes: --quick, --seeds, --server_lrs,
  --workdir, --out (benchmarks/results/<name>), --replot."""
  results = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                         'results', name)
  p.add_argument('--quick', action='store_true',
                 help='1 seed, a few rounds; writes <out>_quick')
  p.add_argument('--seeds', type=int, default=seeds)
  p.add_argument('--server_lrs', default=server_lrs,
                 help='server learning rates tuned on seed 0')
  p.add_argument('--workdir', default=workdir)
  p.add_argument('--out', default=results)
  p.add_argument('--replot', action='store_true',
                 help='redraw the PNG from the JSON')


def compile_cache(workdir: str) -> None:
  """Seeds and arms share programs: compile each once (XLA's cache on
  disk; the executables are the same, only the waiting is saved)."""
  cache = os.path.join(workdir, 'jax_cache')
  shutil.rmtree(cache, ignore_errors=True)
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def meta(**fields) -> dict:
  return dict(fields, jax=jax.__version__, backend=jax.default_backend(),
              cpus=os.cpu_count(),
              machine=platform.processor() or platform.machine(),
              command=' '.join(sys.argv))


def tuned_arm(c, server_lrs: str, seeds: int, run: Callable[[Any, str], dict],
              score: str, workdir: str) -> dict:
  """`run(config, workdir) -> result` at every server lr of `server_lrs`
  on seed 0, the best by `score`, then seeds 1.. at it. Returns the arm's
  row: server_lr, tuning (score per lr) and seeds (results by seed)."""
  tuning = {}
  for lr in (float(x) for x in server_lrs.split(',')):
    c.server.learning_rate = lr
    c.seed = 0
    tuning[lr] = run(c, os.path.join(workdir, f'lr{lr:g}'))
  best = max(tuning, key=lambda lr: tuning[lr][score])
  c.server.learning_rate = best
  row = dict(server_lr=best, tuning={str(k): v[score]
                                     for k, v in tuning.items()},
             seeds={'0': tuning[best]})
  for seed in range(1, seeds):
    c.seed = seed
    row['seeds'][str(seed)] = run(c, os.path.join(workdir, f'seed{seed}'))
  return row


def mean_sd(row: dict, key: str) -> tuple[float, float]:
  v = [s[key] for s in row['seeds'].values()]
  return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def finish(out: dict, path: str, plot: Callable[[dict, str], None],
           headline: Callable[[dict], dict], t0: float) -> None:
  out['meta']['seconds'] = time.time() - t0
  out['headline'] = headline(out)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.json', 'w') as f:
    json.dump(out, f, indent=1)
  plot(out, path + '.png')
  print(f"wrote {path}.json and .png in {out['meta']['seconds']:.0f} s")
  print(json.dumps(out['headline']))


def replot(path: str, plot: Callable[[dict, str], None]) -> None:
  with open(path + '.json') as f:
    out = json.load(f)
  plot(out, path + '.png')
  print(json.dumps(out['headline']))
