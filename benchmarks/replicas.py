"""Seconds per replica-round: R replicas in one program vs R sequential runs.

Issue 22 item 4. For each model (MLP 784-200-200-62, EMNIST CNN) and each
replica count R (`--replicas`, default 1,4,16), two contenders train the
same R runs, replica i with seed `--seed + i`: its own initial parameters
(`model.init` from that seed), its own cohort draw (`CohortSampler` and
`pack_index` from that seed) and its own round keys, as
`experiment/replicas.train_replicas` gives each replica its own
`Experiment`:

* `replicas_R<R>`: `RoundFns.replica_step`, the round vmapped over a
  leading replica axis of (state, cohort, key), one jitted program per
  round for all R (`stack_replicas`);
* `sequential_R<R>`: R calls of `RoundFns.round_step` per round, one per
  replica, each blocking before the next (what R separate runs in one
  process would do).

Workload (defaults): synthetic EMNIST as `scaling.py` makes it
(`fedjax_shims.synthetic_emnist`: uniform float32 28x28x1 pixels, 62
labels), `--num_clients` 100 clients x 20 examples resident on the device
(`ResidentData`; every replica gathers its rows from the one shared copy),
K = 10 clients per round, S = 1 local step of batch B = 20, chunk size
C = 1, client SGD 0.1, server FedAvg (SGD 1.0). A timed round is end to end
for all R replicas: each replica's cohort draw and `pack_index` (host),
the stacking (replicas only), the round(s), blocking on the new
parameters; its host part (draws, packing, stacking) is also reported
apart (`host s`). Round 0 (compilation) is timed apart (`compile s` = round 0
minus the median), then `--rounds` rounds per contender, round-robin over
all contenders of a model with the order rotated every round
(`round_throughput.time_variants`), so that a slow spell of a shared
machine hits every contender alike; the median is reported. One
`build_round` per model serves every contender, as in one process running
R seeds: the sequential contenders share one compiled round program (its
compile time shows in the first one only), each R compiles its own
replica program.
`seconds per replica-round` = median round / R; `speedup_vs_sequential` =
sequential / replicas at the same R (> 1: one program is faster). Nothing
here asserts a timing.

Memory: `accounting.compiled.measure` of the replica program at R and of
the single round program (compiled only, never run; each wrapped in one
outer jit so that neither's donation applies and both count alike):
`argument + output + temp` bytes (alias 0 without donation), the replica
program's divided by R against the single round's. The resident data set
is an argument of both, shared by the replicas, so its share per replica
shrinks with R; `memory_per_replica_without_data_bytes` takes it out
((total - data) / R, and the single round's total - data).

Run:

  python benchmarks/replicas.py                       # mlp,cnn x R=1,4,16
  python benchmarks/replicas.py --models mlp --replicas 1,8 --rounds 3
  python benchmarks/replicas.py --quick               # R=1,2, 2 rounds

Prints a table, then as its last line one JSON object (`benchmark`,
`backend`, `speedup_vs_sequential`, `seconds_per_replica_round`,
`host_seconds_per_replica_round`, `memory_per_replica_bytes`, compile
seconds, config, machine), also
written to `--out` (default benchmarks/results/replicas.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from fedjax_eff import core
from fedjax_eff import data as data_lib
from fedjax_eff import models
from fedjax_eff.accounting.compiled import measure
from fedjax_eff.core.round import stack_replicas

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fedjax_shims  # noqa: E402  (benchmarks/ helpers)
import round_throughput  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, 'results', 'replicas.json')


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', default='mlp,cnn',
                 help='comma-separated: mlp (200-200), cnn (EMNIST CNN).')
  p.add_argument('--replicas', default='1,4,16',
                 help='comma-separated replica counts R.')
  p.add_argument('--rounds', type=int, default=5,
                 help='timed rounds per contender, after round 0.')
  p.add_argument('--clients_per_round', type=int, default=10, help='K.')
  p.add_argument('--steps', type=int, default=1, help='local steps S.')
  p.add_argument('--batch_size', type=int, default=20, help='B.')
  p.add_argument('--chunk_size', type=int, default=1, help='C.')
  p.add_argument('--replica_mode', default='auto',
                 choices=('auto', 'vmap', 'map'),
                 help="Replicas as a vmap or a lax.map inside the program; "
                      "'auto': build_round's per-backend default (map on "
                      "CPU, vmap elsewhere).")
  p.add_argument('--num_clients', type=int, default=100,
                 help='clients in the data (each replica draws K of them).')
  p.add_argument('--examples_per_client', type=int, default=20)
  p.add_argument('--client_lr', type=float, default=0.1)
  p.add_argument('--server_lr', type=float, default=1.0)
  p.add_argument('--seed', type=int, default=0,
                 help='replica i uses seed + i.')
  p.add_argument('--quick', action='store_true',
                 help='R = 1,2 and 2 rounds (for tests).')
  p.add_argument('--out', default=DEFAULT_OUT,
                 help='also write the JSON here ("" not to).')
  args = p.parse_args(argv)
  if args.quick:
    args.replicas, args.rounds = '1,2', 2
  return args


def ints(spec: str) -> list[int]:
  return [int(t) for t in spec.split(',') if t.strip()]


class Setup:
  """One model's data (resident, shared) and per-seed host decisions."""

  def __init__(self, args, model_name: str):
    self.args = args
    if model_name == 'cnn':
      self.model = models.get_model('cnn', fedjax_shims.NUM_CLASSES,
                                    use_im2col=True)
    else:
      self.model = models.get_model('mlp', fedjax_shims.NUM_CLASSES,
                                    hidden=(200, 200))
    data = data_lib.FederatedData(fedjax_shims.synthetic_emnist(
        args.num_clients, args.examples_per_client, args.seed))
    self.num_clients = data.num_clients
    self.resident = data_lib.ResidentData.of(data)
    self.examples = jax.device_put(dict(self.resident.examples))
    jax.block_until_ready(self.examples)
    self.samplers: dict[int, data_lib.CohortSampler] = {}

  def build(self):
    a = self.args
    return core.build_round(
        self.model, core.classification(), core.identity(),
        core.make_optimizer('sgd', a.client_lr),
        core.make_optimizer('fedavg', a.server_lr), chunk_size=a.chunk_size,
        donate=True, vmap_replicas={'auto': None, 'vmap': True,
                                    'map': False}[a.replica_mode])

  def params(self, seed: int):
    return self.model.init({'params': jax.random.key(seed)},
                           jnp.zeros((1, 28, 28, 1), jnp.float32))['params']

  def cohort(self, seed: int, r: int):
    """Replica `seed`'s own draw and packing of round r."""
    if seed not in self.samplers:
      self.samplers[seed] = data_lib.CohortSampler(
          self.num_clients, self.args.clients_per_round, seed)
    ids = self.samplers[seed].sample(r)
    return data_lib.pack_index(
        self.resident, ids, steps=self.args.steps,
        batch_size=self.args.batch_size, seed=seed, round_num=r,
        policy_small='repeat')

  @staticmethod
  def key(seed: int, r: int):
    return jax.random.fold_in(jax.random.key(seed + 1), r)


def replicas_variant(setup: Setup, fns, seeds: list[int], rounds: int,
                     host: list[float]):
  """`host` collects each round's host part: draws, packing, stacking."""
  states = [stack_replicas([fns.init(setup.params(s)) for s in seeds])]

  def run_round(r):
    t0 = time.perf_counter()
    cohorts = stack_replicas([setup.cohort(s, r) for s in seeds])
    keys = stack_replicas([setup.key(s, r) for s in seeds])
    jax.block_until_ready((cohorts, keys))
    host.append(time.perf_counter() - t0)
    states[0], m = fns.replica_step(states[0], cohorts, keys, round_num=r,
                                    examples=setup.examples)
    jax.block_until_ready((states[0].params, m))

  return round_throughput.Variant(
      f'replicas_R{len(seeds)}', run_round, rounds,
      finite=lambda: round_throughput._finite(states[0].params))


def sequential_variant(setup: Setup, fns, seeds: list[int], rounds: int,
                       host: list[float]):
  """`host` collects each round's host part: the R draws and packings."""
  states = [fns.init(setup.params(s)) for s in seeds]

  def run_round(r):
    spent = 0.0
    for i, s in enumerate(seeds):
      t0 = time.perf_counter()
      cohort = setup.cohort(s, r)
      spent += time.perf_counter() - t0
      states[i], m = fns.round_step(states[i], cohort, setup.key(s, r),
                                    round_num=r, examples=setup.examples)
      jax.block_until_ready((states[i].params, m))
    host.append(spent)

  return round_throughput.Variant(
      f'sequential_R{len(seeds)}', run_round, rounds,
      finite=lambda: round_throughput._finite([s.params for s in states]))


def program_bytes(cost) -> dict:
  parts = dict(argument_bytes=cost.argument_bytes,
               output_bytes=cost.output_bytes, temp_bytes=cost.temp_bytes,
               alias_bytes=cost.alias_bytes)
  total = (None if cost.argument_bytes is None else
           cost.argument_bytes + cost.output_bytes + cost.temp_bytes
           - cost.alias_bytes)
  return dict(parts, total_bytes=total)


def single_memory(setup: Setup, fns, seed: int) -> dict:
  """Compiled bytes of one replica's round program (`round_step`)."""
  return program_bytes(measure(
      lambda st, c, k, e: fns.round_step(st, c, k, round_num=0, examples=e),
      fns.init(setup.params(seed)), setup.cohort(seed, 0),
      setup.key(seed, 0), setup.examples, unroll_scans=False))


def replica_memory(setup: Setup, fns, seeds: list[int]) -> dict:
  """Compiled bytes of the R-replica program (`replica_step`)."""
  return program_bytes(measure(
      lambda st, c, k, e: fns.replica_step(st, c, k, round_num=0,
                                           examples=e),
      stack_replicas([fns.init(setup.params(s)) for s in seeds]),
      stack_replicas([setup.cohort(s, 0) for s in seeds]),
      stack_replicas([setup.key(s, 0) for s in seeds]), setup.examples,
      unroll_scans=False))


def main(argv=None):
  args = parse_args(argv)
  model_names = [m.strip() for m in args.models.split(',') if m.strip()]
  rs = ints(args.replicas)
  log = lambda m: print(m, flush=True)
  log(f'models={model_names} R={rs} K={args.clients_per_round} '
      f'S={args.steps} B={args.batch_size} C={args.chunk_size} '
      f'rounds={args.rounds} data {args.num_clients} clients x '
      f'{args.examples_per_client} backend={jax.default_backend()} '
      f'nproc={os.cpu_count()}')

  speedup, per_round, compile_s, mem_per_replica = {}, {}, {}, {}
  mem_single, mem_programs, finite, errors = {}, {}, {}, {}
  mem_no_data, host_s = {}, {}
  rows = []
  for m in model_names:
    setup = Setup(args, m)
    # One build per model, as one process running R seeds would have: the
    # sequential runs share one compiled round program (its compile shows
    # in the first sequential contender only); each R compiles its own
    # replica program.
    fns = setup.build()
    seeds_of = {r: [args.seed + i for i in range(r)] for r in rs}
    variants, hosts = [], {}
    for r in rs:
      hosts[f'replicas_R{r}'], hosts[f'sequential_R{r}'] = [], []
      variants.append(replicas_variant(setup, fns, seeds_of[r], args.rounds,
                                       hosts[f'replicas_R{r}']))
      variants.append(sequential_variant(setup, fns, seeds_of[r],
                                         args.rounds,
                                         hosts[f'sequential_R{r}']))
    log(f'[{m}] timing {", ".join(v.name for v in variants)}')
    results = round_throughput.time_variants(variants)
    errors.update({f'{m}_{v.name}': v.error for v in variants if v.error})
    finite[m] = {n: res['params_finite'] for n, res in results.items()}

    single = single_memory(setup, fns, args.seed)
    mem_programs[m] = {str(r): replica_memory(setup, fns, seeds_of[r])
                       for r in rs}
    mem_programs[m]['single_round'] = single
    mem_programs[m]['data_bytes'] = data_bytes = int(setup.resident.nbytes)
    mem_single[m] = single['total_bytes']
    per = lambda b, r, less=0: None if b is None else (b - less) / r
    mem_per_replica[m] = {str(r): per(mem_programs[m][str(r)]['total_bytes'],
                                      r) for r in rs}
    mem_no_data[m] = dict(
        {str(r): per(mem_programs[m][str(r)]['total_bytes'], r, data_bytes)
         for r in rs}, single_round=per(mem_single[m], 1, data_bytes))

    speedup[m], compile_s[m] = {}, {'replicas': {}, 'sequential': {}}
    per_round[m] = {'replicas': {}, 'sequential': {}}
    host_s[m] = {'replicas': {}, 'sequential': {}}
    for r in rs:
      rep, seq = (results.get(f'{kind}_R{r}')
                  for kind in ('replicas', 'sequential'))
      for kind, res in (('replicas', rep), ('sequential', seq)):
        if res is not None:
          per_round[m][kind][str(r)] = res['seconds_per_round'] / r
          # Round 0 (compilation) left out, as in the round times.
          host_s[m][kind][str(r)] = statistics.median(
              hosts[f'{kind}_R{r}'][1:]) / r
          compile_s[m][kind][str(r)] = res['compile_seconds']
      ratio = (seq['seconds_per_round'] / rep['seconds_per_round']
               if rep is not None and seq is not None else None)
      speedup[m][str(r)] = ratio
      rows.append((m, r, per_round[m]['replicas'].get(str(r)),
                   per_round[m]['sequential'].get(str(r)), ratio,
                   host_s[m]['replicas'].get(str(r)),
                   host_s[m]['sequential'].get(str(r)),
                   compile_s[m]['replicas'].get(str(r)),
                   compile_s[m]['sequential'].get(str(r)),
                   mem_per_replica[m][str(r)], mem_single[m]))

  fmt = lambda v, f: '-' if v is None else format(v, f)
  print()
  print(f'{"model":5s} {"R":>3s} {"s/replica-round":>16s} {"sequential":>11s} '
        f'{"speedup":>8s} {"host s":>8s} {"seq host":>9s} '
        f'{"compile s":>10s} {"seq compile":>12s} '
        f'{"MiB/replica":>12s} {"MiB 1 round":>12s}')
  for m, r, rep, seq, ratio, h_rep, h_seq, c_rep, c_seq, mem, mem1 in rows:
    print(f'{m:5s} {r:3d} {fmt(rep, "16.4f")} {fmt(seq, "11.4f")} '
          f'{fmt(ratio, "7.2f")}x {fmt(h_rep, "8.4f")} {fmt(h_seq, "9.4f")} '
          f'{fmt(c_rep, "10.2f")} '
          f'{fmt(c_seq, "12.2f")} '
          f'{fmt(None if mem is None else mem / 2**20, "12.2f")} '
          f'{fmt(None if mem1 is None else mem1 / 2**20, "12.2f")}')
  print('speedup = sequential s/replica-round / replicas s/replica-round '
        '(> 1: one program is faster); host s = the host part of it '
        '(draws, packing, stacking; per replica-round, median); compile s = '
        'round 0 minus the median round; MiB = compiled argument + output + '
        'temp bytes, per replica')

  summary = dict(
      benchmark='replicas', backend=jax.default_backend(),
      speedup_vs_sequential=speedup,
      seconds_per_replica_round=per_round,
      host_seconds_per_replica_round=host_s,
      memory_per_replica_bytes=mem_per_replica,
      memory_single_round_bytes=mem_single,
      memory_per_replica_without_data_bytes=mem_no_data,
      memory_programs=mem_programs,
      compile_seconds=compile_s,
      params_finite=finite, errors=errors,
      config=dict(models=model_names, replicas=rs,
                  replica_mode=args.replica_mode,
                  clients_per_round=args.clients_per_round,
                  local_steps=args.steps, batch_size=args.batch_size,
                  chunk_size=args.chunk_size, rounds=args.rounds,
                  num_clients=args.num_clients,
                  examples_per_client=args.examples_per_client,
                  client_lr=args.client_lr, server_lr=args.server_lr,
                  seed=args.seed, quick=args.quick),
      machine=round_throughput.machine_info(),
      command=' '.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]))
  round_throughput.emit_json(summary, args.out or None)


if __name__ == '__main__':
  main()
