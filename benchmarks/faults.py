"""Fault probes of `launch/train.py`: the whole matrix from the command line.

Each probe runs the real command line (`launch/train.py --config=... --workdir=
DIR`) in its own directory under `--root`, breaks something, and checks what
the run did about it. Every run is tiny (digits, CNN, 4 clients per round, 1
local step, 6 rounds, a checkpoint every round) so the full matrix fits in
about ten minutes on 2 CPU cores (525 s on a loaded 2-core machine: 42
probes, 10 of them kill -9). The unbroken runs the probes compare with (6, 8
and 40 rounds) are computed once.

Probes, and what "handled" means for each:

* `kill9/i` (`--kill9 N` of them, default 10): SIGKILL at a random moment of
  the run (uniform over the unbroken run's duration; every other one
  instead a random moment of its rounds phase after the first metrics
  line; every third one killed twice in a row), then the same command to completion: exit 0,
  `params_sha256` equal to the unbroken run's, rounds 1..6 in metrics.jsonl
  exactly once.
* `corrupt/*`, on a copy of the finished 6-round run, rerun with 8 rounds:
  `delete_newest` (newest checkpoint step directory removed), `truncate`
  (its biggest file cut to half), `flip` (64 bytes flipped in the middle of
  its biggest file, the parameters): exit 0, a warning line naming the
  checkpoint, the unbroken 8-round sha, rounds 1..8 once. `torn_line` (the
  newest checkpoint deleted and the last metrics line cut in half) and
  `metrics_cut` (metrics.jsonl cut in the middle), rerun with 6 rounds: exit
  0, rounds 1..6 once, the unbroken sha.
* `config/*`, on a copy of the finished run: one key changed (client
  learning rate, data.num_clients, clients_per_round, local_steps, model,
  server optimizer) with more rounds: exit 2, one stderr line `error: ...`
  naming the key and its old and new values, no `checkpoints_unreadable`,
  metrics.jsonl and config.json byte-identical. `num_rounds_raised` and
  `eval_every_changed`: exit 0 (and the unbroken 8-round sha, rounds 1..8
  once). `fewer_rounds` (3 after 6): exit 0 or 2, the output says the run
  has 6 rounds, metrics.jsonl unchanged. `allow_change`
  (`--allow_config_change=client.learning_rate`): exit 0, rounds 1..8 once.
* `signal/sigterm`, `signal/sigint` (40 rounds, the signal after the first
  metrics line): non-zero exit, no traceback, a line saying 'saved' or
  'resume', the newest checkpoint at the last metrics round; a rerun ends
  with the unbroken 40-round sha.
* `twoproc`: two processes on one workdir: one exits 0, the other 2 with
  one `error:` line naming the lock holder; each round once.
* `diskfull` (root only, tmpfs mountable; otherwise skipped): a 1 MB tmpfs
  workdir with TensorBoard on: ends within 60 s, non-zero exit, no traceback,
  one `error:` line naming a path; a copy on a normal disk then resumes (exit
  0).
* `nan/device`, `nan/host`, `nan/same_sha`: one example of the first
  training client is NaN (`--config.data.nan_clients=1`; 40 rounds of 10
  clients x 4 steps): exit 0, every train_loss finite, at most one client
  dropped a round, final test accuracy > 0.5; both placements give the same
  sha.
* `badinput/*`: missing config file, workdir that is a file,
  checkpoint_keep=0, server lr nan / -1, client lr 1e38, a misspelt key, the
  speech config without espeak-ng (HOME pointed at the probe directory so
  no cached speech set is found): exit 2 and exactly one stderr line
  `error: ...`; `oom` (a cohort of 100 x 100,000 x 100,000 examples on the
  host): non-zero exit within 60 s, one `error:` line about memory naming
  chunk_size, batch_size or local_steps.
* `dropped/lr1000` (client learning rate 1000) and `dropped/all_nan`
  (every client trains on a NaN example: `data.nan_clients=100`, batch
  100), 20 rounds: a non-zero exit with an `error:` line saying 'dropped' or
  'non-finite', or exit 0 where a round with every client dropped has
  train_loss null (not a fake 0.0).

Run:

  python benchmarks/faults.py                  # everything (~9 min on 2 cores)
  python benchmarks/faults.py --only badinput  # probes whose name has it
  python benchmarks/faults.py --only kill9 --kill9 2 --keep

Prints one table row per probe as it finishes (probe, handled yes/no/skipped,
detail) and as its last line one JSON object: `probes` (run, skipped ones
excluded), `handled`, `skipped`, `failed`, `kill9_runs`, `kill9_identical`,
`group_seconds`; the full matrix also writes it to
benchmarks/results/faults.json (`--out PATH` to choose; with `--only`, only
where `--out` says).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import round_throughput  # noqa: E402  (benchmarks/: the JSON-line emitter)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TRAIN = os.path.join(REPO, 'launch', 'train.py')
DEFAULT_CONFIG = os.path.join(REPO, 'configs', 'default.py')

# The tiny run every probe starts from.
BASE = {
    'num_rounds': 6, 'eval_every': 3, 'checkpoint_every': 1,
    'clients_per_round': 4, 'client.local_steps': 1, 'tensorboard': False,
    'accounting': False, 'progress': False,
}
RUN_TIMEOUT = 240     # seconds, any one training run (the machine is shared)
QUICK_TIMEOUT = 60    # runs that must end within a minute
SIGNAL_ROUNDS = 40    # long enough to signal while rounds run
RAISED_ROUNDS = 8     # corruption and config probes rerun with this many


class ProbeError(Exception):
  """A probe could not be carried out (e.g. its reference run failed)."""


class Run(NamedTuple):
  rc: int | None        # None: killed at the timeout
  out: str
  err: str
  seconds: float

  @property
  def text(self) -> str:
    return self.out + '\n' + self.err

  def brief(self) -> str:
    """The exit status and the last stderr line, for a table's detail."""
    rc = 'timeout' if self.rc is None else f'rc {self.rc}'
    lines = [l for l in self.err.splitlines() if l.strip()]
    return f'{rc}, {len(lines)} stderr lines' + (
        f', last: {lines[-1][:150]!r}' if lines else '')


# ------------------------------------------------------------- running ----

def train_cmd(workdir: str, overrides: dict[str, Any] | None = None, *,
              config: str = DEFAULT_CONFIG, flags=()) -> list[str]:
  """launch/train.py on `config` with BASE, then `overrides`, each key once."""
  merged = dict(BASE, **(overrides or {}))
  return ([sys.executable, TRAIN, f'--config={config}',
           f'--workdir={workdir}'] +
          [f'--config.{k}={v}' for k, v in merged.items()] + list(flags))


def start(cmd, env=None) -> subprocess.Popen:
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          start_new_session=True)


def finish(proc: subprocess.Popen, t0: float, timeout: float) -> Run:
  """Waits for `proc` (started at `t0`); kills its group at the timeout."""
  try:
    out, err = proc.communicate(timeout=max(timeout - (time.time() - t0), 1))
    rc = proc.returncode
  except subprocess.TimeoutExpired:
    kill_group(proc, signal.SIGKILL)
    out, err = proc.communicate()
    rc = None
  return Run(rc, out, err, time.time() - t0)


def run(cmd, timeout: float = RUN_TIMEOUT, env=None) -> Run:
  t0 = time.time()
  return finish(start(cmd, env), t0, timeout)


def kill_group(proc: subprocess.Popen, sig) -> None:
  try:
    os.killpg(proc.pid, sig)
  except ProcessLookupError:
    pass


def wait_for(pred: Callable[[], bool], proc: subprocess.Popen,
             timeout: float) -> bool:
  """Polls `pred` while `proc` lives; True once it holds."""
  t0 = time.time()
  while time.time() - t0 < timeout and proc.poll() is None:
    if pred():
      return True
    time.sleep(0.02)
  return pred()


# ------------------------------------------------------- reading a run ----

def metric_lines(workdir: str) -> list[Any]:
  """metrics.jsonl parsed line by line (a line that does not parse: None)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      if line.strip():
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          out.append(None)
  return out


def rounds_once(workdir: str, n: int) -> tuple[bool, str]:
  """Whether metrics.jsonl holds rounds 1..n, each exactly once, in order."""
  lines = metric_lines(workdir)
  got = [l.get('round') if isinstance(l, dict) else None for l in lines]
  if got == list(range(1, n + 1)):
    return True, f'rounds 1..{n} once'
  shown = got if len(got) <= 14 else got[:6] + ['...'] + got[-6:]
  return False, f'metrics rounds {shown} (want 1..{n})'


def summary_sha(workdir: str) -> str | None:
  try:
    with open(os.path.join(workdir, 'summary.json')) as f:
      return json.load(f).get('params_sha256')
  except (OSError, ValueError):
    return None


def final_metrics(workdir: str) -> dict[str, Any]:
  try:
    with open(os.path.join(workdir, 'summary.json')) as f:
      return json.load(f).get('final_metrics') or {}
  except (OSError, ValueError):
    return {}


def checkpoint_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return []
  return sorted(int(s) for s in os.listdir(d) if s.isdigit())


def read_bytes(path: str) -> bytes | None:
  try:
    with open(path, 'rb') as f:
      return f.read()
  except OSError:
    return None


def stderr_lines(r: Run) -> list[str]:
  return [l for l in r.err.splitlines() if l.strip()]


def one_error_line(r: Run) -> tuple[bool, str]:
  """Exactly one non-empty stderr line, starting 'error:', no traceback."""
  lines = stderr_lines(r)
  ok = len(lines) == 1 and lines[0].startswith('error:') and (
      'Traceback' not in r.err)
  return ok, (repr(lines[0][:200]) if len(lines) == 1 else
              f'{len(lines)} stderr lines' + (
                  ', traceback' if 'Traceback' in r.err else '') +
              (f', last {lines[-1][:150]!r}' if lines else ''))


def verdict(checks: list[tuple[bool, str]]) -> tuple[str, str]:
  """('yes', details) when every check holds, else ('no', the failing
  checks first)."""
  bad = [d for ok, d in checks if not ok]
  good = [d for ok, d in checks if ok]
  if bad:
    return 'no', '; '.join(bad + (['ok: ' + ', '.join(good)] if good else []))
  return 'yes', '; '.join(good)


def sha_check(workdir: str, want: str, what: str = 'unbroken'
              ) -> tuple[bool, str]:
  got = summary_sha(workdir)
  if got == want:
    return True, f'sha = {what}'
  return False, f'sha {got and got[:12]} != {what} {want[:12]}'


def rc_check(r: Run, want, brief: bool = True) -> tuple[bool, str]:
  """The exit status is (one of) `want`; on failure, with the last stderr
  line when `brief` (other checks may already show it)."""
  wanted = want if isinstance(want, tuple) else (want,)
  if r.rc in wanted:
    return True, f'rc {r.rc}'
  return False, (r.brief() if brief else
                 f"rc {'timeout' if r.rc is None else r.rc}") + (
                     f" (want {' or '.join(map(str, wanted))})")


# ---------------------------------------------------------- the context ----

class Context:
  """What probes share: the root, the seed, and the unbroken reference runs
  (each computed once, on first use)."""

  def __init__(self, root: str, seed: int, keep: bool):
    self.root, self.keep = root, keep
    self.rng = random.Random(seed)
    self._refs: dict[tuple, dict[str, Any]] = {}
    self.cache: dict[str, Any] = {}
    self.kill9_runs = 0
    self.kill9_identical = 0

  def reference(self, overrides: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """The unbroken run of BASE + `overrides`: workdir, sha, duration and
    when its first metrics line appeared."""
    key = tuple(sorted((k, v) for k, v in (overrides or {}).items()
                       if BASE.get(k) != v))
    if key not in self._refs:
      name = '_'.join(f'{k}-{v}' for k, v in key).replace('.', '')
      wd = os.path.join(self.root, 'ref_' + (name or 'base'))
      t0 = time.time()
      proc = start(train_cmd(wd, overrides))
      metrics = os.path.join(wd, 'metrics.jsonl')
      wait_for(lambda: os.path.exists(metrics) and os.path.getsize(metrics),
               proc, RUN_TIMEOUT)
      first = time.time() - t0
      r = finish(proc, t0, RUN_TIMEOUT)
      sha = summary_sha(wd)
      if r.rc != 0 or not sha:
        raise ProbeError(f'reference run {dict(key)} failed: {r.brief()}')
      self._refs[key] = dict(workdir=wd, sha=sha, seconds=r.seconds,
                             first_metrics=min(first, r.seconds))
    return self._refs[key]

  def finished_copy(self, dst: str) -> str:
    """A copy of the finished 6-round reference run's workdir."""
    shutil.copytree(self.reference()['workdir'], dst)
    return dst


# -------------------------------------------------------------- kill -9 ----

def kill9_probe(i: int) -> Callable[[Context, str], tuple[str, str]]:
  def probe(ctx: Context, d: str):
    ref = ctx.reference()
    ctx.kill9_runs += 1
    wd = os.path.join(d, 'w')
    twice = i % 3 == 2
    notes = []
    for attempt in range(2 if twice else 1):
      t0 = time.time()
      proc = start(train_cmd(wd))
      if i % 2 == 1 and attempt == 0:  # inside the rounds phase
        n0 = len(metric_lines(wd))
        wait_for(lambda: len(metric_lines(wd)) > n0, proc, RUN_TIMEOUT)
        delay = time.time() - t0 + ctx.rng.uniform(
            0, ref['seconds'] - ref['first_metrics'])
      else:                            # anywhere in the run
        delay = ctx.rng.uniform(0.2, ref['seconds'])
      wait_for(lambda: time.time() - t0 >= delay, proc, delay + 1)
      if proc.poll() is None:
        kill_group(proc, signal.SIGKILL)
        r = finish(proc, t0, 30)
        notes.append(f'killed at {delay:.1f}s (round '
                     f'{len(metric_lines(wd))}, checkpoints '
                     f'{checkpoint_steps(wd)[-1:] or "none"})')
      else:
        r = finish(proc, t0, 30)
        notes.append(f'run ended (rc {r.rc}) before the kill at {delay:.1f}s')
    r = run(train_cmd(wd))
    checks = [(True, ', then '.join(notes)), rc_check(r, 0),
              sha_check(wd, ref['sha']), rounds_once(wd, BASE['num_rounds'])]
    status, detail = verdict(checks)
    if summary_sha(wd) == ref['sha']:
      ctx.kill9_identical += 1
    return status, detail
  return probe


# ---------------------------------------------------------- corruption ----

def newest_step_dir(wd: str) -> str:
  steps = checkpoint_steps(wd)
  if not steps:
    raise ProbeError('the reference run left no checkpoint')
  return os.path.join(wd, 'checkpoints', str(steps[-1]))


def biggest_file(directory: str) -> str:
  files = [os.path.join(dp, f) for dp, _, fs in os.walk(directory)
           for f in fs]
  return max(files, key=os.path.getsize)


def delete_newest(wd: str) -> str:
  step = newest_step_dir(wd)
  shutil.rmtree(step)
  return f'deleted step {os.path.basename(step)}'


def truncate_newest(wd: str) -> str:
  path = biggest_file(newest_step_dir(wd))
  size = os.path.getsize(path)
  os.truncate(path, size // 2)
  return f'truncated {os.path.relpath(path, wd)} {size} -> {size // 2} B'


def flip_newest(wd: str) -> str:
  path = biggest_file(newest_step_dir(wd))
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    mid = max(len(data) // 2 - 32, 0)
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    f.seek(0)
    f.write(data)
  return f'flipped 64 B at {mid} of {os.path.relpath(path, wd)}'


def tear_last_line(wd: str) -> str:
  step = delete_newest(wd)
  path = os.path.join(wd, 'metrics.jsonl')
  data = read_bytes(path)
  body = data.rstrip(b'\n')
  start_last = body.rfind(b'\n') + 1
  cut = start_last + (len(body) - start_last) // 2
  with open(path, 'wb') as f:
    f.write(data[:cut])
  return f'{step}, last metrics line cut at byte {cut - start_last}'


def cut_metrics(wd: str) -> str:
  path = os.path.join(wd, 'metrics.jsonl')
  size = os.path.getsize(path)
  os.truncate(path, size // 2)
  return f'metrics.jsonl cut {size} -> {size // 2} B'


def corrupt_probe(corrupt: Callable[[str], str], raised: bool):
  """Corrupt a copy of the finished run, rerun (with RAISED_ROUNDS when
  `raised`, then a warning naming the checkpoint is expected)."""
  def probe(ctx: Context, d: str):
    n = RAISED_ROUNDS if raised else BASE['num_rounds']
    want = ctx.reference({'num_rounds': n} if raised else None)['sha']
    wd = ctx.finished_copy(os.path.join(d, 'w'))
    what = corrupt(wd)
    r = run(train_cmd(wd, {'num_rounds': n}))
    checks = [(True, what), rc_check(r, 0), sha_check(wd, want),
              rounds_once(wd, n)]
    if raised:
      warned = [l for l in r.text.splitlines()
                if 'checkpoint' in l.lower() and 'warn' in l.lower()]
      checks.append((bool(warned), repr(warned[0][:120]) if warned else
                     'no warning line naming the checkpoint'))
    return verdict(checks)
  return probe


# ------------------------------------------------------- config change ----

CHANGES = [  # key, value of the reference run, the changed value
    ('client.learning_rate', 0.05, 0.1),
    ('data.num_clients', 100, 50),
    ('clients_per_round', 4, 5),
    ('client.local_steps', 1, 2),
    ('model.name', 'cnn', 'mlp'),
    ('server.optimizer', 'fedavg', 'fedadam'),
]


def snapshot(wd: str) -> dict[str, bytes | None]:
  return {f: read_bytes(os.path.join(wd, f))
          for f in ('metrics.jsonl', 'config.json')}


def unchanged(wd: str, before: dict[str, bytes | None],
              files=('metrics.jsonl', 'config.json')) -> tuple[bool, str]:
  after = snapshot(wd)
  changed = [f for f in files if after[f] != before[f]]
  return not changed, ('changed: ' + ', '.join(changed) if changed else
                       ' and '.join(files) + ' unchanged')


def changed_key_probe(key: str, old, new):
  def probe(ctx: Context, d: str):
    wd = ctx.finished_copy(os.path.join(d, 'w'))
    before = snapshot(wd)
    r = run(train_cmd(wd, {key: new, 'num_rounds': RAISED_ROUNDS}))
    one, line = one_error_line(r)
    names = all(s in r.err for s in (key, str(old), str(new)))
    quarantined = os.path.exists(os.path.join(wd, 'checkpoints_unreadable'))
    return verdict([
        rc_check(r, 2, brief=False), (one, line),
        (names, f'names {key}, {old}, {new}' if names else
         f'stderr does not name all of {key}, {old}, {new}'),
        (not quarantined, 'checkpoints_unreadable appeared' if quarantined
         else 'no checkpoints_unreadable'),
        unchanged(wd, before)])
  return probe


def accepted_probe(overrides: dict[str, Any], flags=(),
                   same_params: bool = True):
  """A change a resumed run must accept: exit 0, each round once, and
  (when the change leaves training alone: `same_params`) the unbroken sha."""
  def probe(ctx: Context, d: str):
    n = overrides.get('num_rounds', BASE['num_rounds'])
    wd = ctx.finished_copy(os.path.join(d, 'w'))
    r = run(train_cmd(wd, overrides, flags=flags))
    checks = [rc_check(r, 0), rounds_once(wd, n)]
    if same_params:
      checks.append(sha_check(wd, ctx.reference({'num_rounds': n})['sha']))
    return verdict(checks)
  return probe


def fewer_rounds_probe(ctx: Context, d: str):
  wd = ctx.finished_copy(os.path.join(d, 'w'))
  before = snapshot(wd)
  r = run(train_cmd(wd, {'num_rounds': 3}))
  says = [l for l in r.text.splitlines() if re.search(r'\b6\b', l) and
          'round' in l.lower()]
  return verdict([rc_check(r, (0, 2)),
                  (bool(says), repr(says[0][:150]) if says else
                   'no line says the run has 6 rounds'),
                  unchanged(wd, before, ('metrics.jsonl',))])


# ------------------------------------------------------------- signals ----

def signal_probe(sig):
  def probe(ctx: Context, d: str):
    ref = ctx.reference({'num_rounds': SIGNAL_ROUNDS})
    wd = os.path.join(d, 'w')
    cmd = train_cmd(wd, {'num_rounds': SIGNAL_ROUNDS})
    t0 = time.time()
    proc = start(cmd)
    if not wait_for(lambda: len(metric_lines(wd)) >= 1, proc, RUN_TIMEOUT):
      r = finish(proc, t0, 30)
      return 'no', f'no metrics line before the run ended: {r.brief()}'
    os.kill(proc.pid, sig)
    r = finish(proc, t0, QUICK_TIMEOUT + (time.time() - t0))
    lines = metric_lines(wd)
    last = lines[-1].get('round') if lines and lines[-1] else None
    steps = checkpoint_steps(wd)
    said = [l for l in r.text.splitlines()
            if re.search(r'resume|saved', l, re.I)]
    checks = [
        (r.rc not in (0, None), r.brief() if r.rc in (0, None)
         else f'rc {r.rc} at round {last}'),
        ('Traceback' not in r.err, 'traceback on stderr'
         if 'Traceback' in r.err else 'no traceback'),
        (bool(said), repr(said[0][:120]) if said else
         "no line says 'saved' or 'resume'"),
        (bool(steps) and steps[-1] == last,
         f'newest checkpoint {steps[-1:]} = last metrics round {last}'
         if steps and steps[-1] == last else
         f'newest checkpoint {steps[-1:]} != last metrics round {last}')]
    rerun = run(cmd)
    checks += [(rerun.rc == 0, 'rerun ' + rerun.brief()),
               sha_check(wd, ref['sha'], f'unbroken {SIGNAL_ROUNDS}-round'),
               rounds_once(wd, SIGNAL_ROUNDS)]
    return verdict(checks)
  return probe


# ------------------------------------------------------- two processes ----

def two_processes_probe(ctx: Context, d: str):
  wd = os.path.join(d, 'w')
  t0 = time.time()
  procs = [start(train_cmd(wd)) for _ in range(2)]
  runs = [finish(p, t0, RUN_TIMEOUT) for p in procs]
  codes = sorted(r.rc if r.rc is not None else -999 for r in runs)
  loser = [r for r in runs if r.rc != 0]
  checks = [(codes == [0, 2], f'exit codes {codes}')]
  if len(loser) == 1:
    one, line = one_error_line(loser[0])
    names = bool(re.search(r'pid|\d', loser[0].err, re.I))
    checks += [(one, line), (names, 'names the lock holder' if names else
                             'does not name the lock holder')]
  return verdict(checks + [rounds_once(wd, BASE['num_rounds'])])


# ----------------------------------------------------------- disk full ----

DISK_MB = 1  # each checkpoint of the tiny CNN is ~0.28 MB: fills at ~step 3


def disk_full_probe(ctx: Context, d: str):
  if os.geteuid() != 0:
    return 'skipped', 'not root: cannot mount a tmpfs'
  mnt = os.path.join(d, 'mnt')
  os.makedirs(mnt)
  m = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={DISK_MB}M',
                      'tmpfs', mnt], capture_output=True, text=True,
                     timeout=30)
  if m.returncode != 0:
    return 'skipped', f'mount failed: {(m.stderr or m.stdout).strip()[:120]}'
  try:
    wd = os.path.join(mnt, 'w')
    overrides = {'num_rounds': 12, 'tensorboard': True}
    r = run(train_cmd(wd, overrides), timeout=QUICK_TIMEOUT)
    errors = [l for l in stderr_lines(r) if l.startswith('error:')]
    copy = os.path.join(d, 'copy')
    if os.path.isdir(wd):
      shutil.copytree(wd, copy)
  finally:
    if subprocess.run(['umount', mnt], capture_output=True).returncode:
      subprocess.run(['umount', '-l', mnt], capture_output=True)
  checks = [
      (r.rc is not None, f'ended in {r.seconds:.0f}s' if r.rc is not None
       else f'still running after {QUICK_TIMEOUT}s (hang)'),
      (r.rc != 0, f'rc {r.rc}' if r.rc != 0 else
       f'rc 0: the {DISK_MB} MB disk did not stop it'),
      ('Traceback' not in r.err, 'traceback on stderr' if 'Traceback' in r.err
       else 'no traceback'),
      (len(errors) == 1 and '/' in errors[0],
       repr(errors[0][:150]) if len(errors) == 1 else
       f'{len(errors)} error: lines' + (f', last stderr {r.brief()}'
                                       if not errors else ''))]
  rerun = run(train_cmd(copy, overrides))
  checks.append((rerun.rc == 0, 'copy resumes: ' + rerun.brief()))
  return verdict(checks)


# ------------------------------------------------------------ NaN data ----

# Client 0's first example is NaN (`data.nan_clients`: the first N training
# clients). Reaches ~0.76 test accuracy unpoisoned (0.54 with 8 clients x 2
# steps x 30 rounds); client 0 is in ~4 of the 40 cohorts.
NAN_RUN = {'num_rounds': 40, 'clients_per_round': 10, 'client.local_steps': 4,
           'eval_every': 10, 'checkpoint_every': 10, 'data.nan_clients': 1}

def nan_run(ctx: Context, placement: str) -> tuple[Run, str]:
  """The NaN run on `placement` (once; both nan/ probes read it)."""
  key = f'nan_{placement}'
  if key not in ctx.cache:
    wd = os.path.join(ctx.root, 'shared_' + key)  # outlives probe dirs
    r = run(train_cmd(wd, dict(NAN_RUN, data_placement=placement)))
    ctx.cache[key] = (r, wd)
  return ctx.cache[key]


def nan_probe(placement: str):
  def probe(ctx: Context, d: str):
    r, wd = nan_run(ctx, placement)
    if r.rc != 0:
      return 'no', r.brief()
    lines = [l for l in metric_lines(wd) if isinstance(l, dict)]
    bad_loss = [l['round'] for l in lines if l.get('train_loss') is None]
    dropped = [l['round'] for l in lines if (l.get('num_dropped') or 0) > 1]
    acc = final_metrics(wd).get('test_accuracy')
    return verdict([
        rc_check(r, 0),
        (not bad_loss, f'train_loss null in rounds {bad_loss[:8]}' if
         bad_loss else 'every train_loss finite'),
        (not dropped, f'> 1 dropped in rounds {dropped[:8]}' if dropped
         else f'<= 1 dropped a round ({sum(l.get("num_dropped") or 0 for l in lines):g} in all)'),
        (acc is not None and acc > 0.5, f'test_accuracy {acc}'),
        rounds_once(wd, NAN_RUN['num_rounds'])])
  return probe


def nan_same_sha_probe(ctx: Context, d: str):
  shas = {p: summary_sha(nan_run(ctx, p)[1]) for p in ('device', 'host')}
  ok = shas['device'] is not None and shas['device'] == shas['host']
  return verdict([(ok, 'device sha = host sha' if ok else
                   'shas ' + ', '.join(f'{p} {s and s[:12]}'
                                       for p, s in shas.items()))])


# ----------------------------------------------------------- bad input ----

def bad_input_probe(overrides=None, *, config=DEFAULT_CONFIG, workdir_file=False,
                    env=None):
  """Exit 2 and exactly one stderr line 'error: ...'."""
  def probe(ctx: Context, d: str):
    wd = os.path.join(d, 'w')
    if workdir_file:
      with open(wd, 'w') as f:
        f.write('a file, not a directory\n')
    cfg = config(d) if callable(config) else config
    r = run(train_cmd(wd, overrides, config=cfg),
            env=env(d) if callable(env) else env)
    return verdict([rc_check(r, 2, brief=False), one_error_line(r)])
  return probe


def no_espeak_env(d: str) -> dict[str, str]:
  """PATH without espeak-ng's directory, HOME without a cached speech set."""
  env = dict(os.environ, HOME=d)
  found = shutil.which('espeak-ng')
  if found:
    hidden = os.path.dirname(found)
    env['PATH'] = os.pathsep.join(p for p in env.get('PATH', '').split(
        os.pathsep) if p and os.path.abspath(p) != hidden)
  return env


def oom_probe(ctx: Context, d: str):
  r = run(train_cmd(os.path.join(d, 'w'), {
      'clients_per_round': 100, 'client.local_steps': 100000,
      'client.batch_size': 100000, 'data_placement': 'host'}),
          timeout=QUICK_TIMEOUT)
  errors = [l for l in stderr_lines(r) if l.startswith('error:')]
  line = errors[0] if len(errors) == 1 else ''
  return verdict([
      (r.rc not in (0, None), f'rc {r.rc} in {r.seconds:.0f}s'),
      ('Traceback' not in r.err, 'traceback on stderr' if 'Traceback' in r.err
       else 'no traceback'),
      (len(errors) == 1, repr(line[:150]) if line else
       f'{len(errors)} error: lines; {r.brief()}'),
      ('memory' in line.lower() and any(
          k in line for k in ('chunk_size', 'batch_size', 'local_steps')),
       'names memory and a knob' if line else 'no error line to read')])


# -------------------------------------------------------- all dropped ----

def all_dropped_probe(overrides: dict[str, Any]):
  """Every client may drop: a non-zero exit saying so, or exit 0 with a
  null train_loss in each round that dropped every client."""
  def probe(ctx: Context, d: str):
    wd = os.path.join(d, 'w')
    return all_dropped_verdict(
        run(train_cmd(wd, dict(overrides, num_rounds=20))), wd)
  return probe


def all_dropped_verdict(r: Run, wd: str):
  lines = [l for l in metric_lines(wd) if isinstance(l, dict)]
  if r.rc != 0:
    errors = [l for l in stderr_lines(r) if l.startswith('error:')]
    said = [l for l in errors if re.search(r'dropped|non-finite', l, re.I)]
    return verdict([
        (r.rc is not None, f'rc {r.rc} after {len(lines)} rounds'),
        ('Traceback' not in r.err, 'traceback on stderr'
         if 'Traceback' in r.err else 'no traceback'),
        (bool(said), repr(said[0][:150]) if said else
         f"no error: line saying 'dropped' or 'non-finite'; {r.brief()}")])
  all_dropped = [l for l in lines if l.get('num_clients') and
                 l.get('num_dropped') == l.get('num_clients')]
  fake = [l['round'] for l in all_dropped if l.get('train_loss') is not None]
  nulls = sum(l.get('train_loss') is None for l in lines)
  return verdict([
      (True, f'exit 0, {len(all_dropped)} of {len(lines)} rounds dropped '
       f'every client ({sum(l.get("num_dropped") or 0 for l in lines):g} '
       f'clients dropped in all, {nulls} null train_loss)'),
      (not fake, f'train_loss {[l.get("train_loss") for l in all_dropped][:3]}'
       f' in all-dropped rounds {fake[:8]}' if fake
       else 'all-dropped rounds have train_loss null')])


# -------------------------------------------------------------- matrix ----

def probes(kill9: int) -> list[tuple[str, Callable[[Context, str], Any]]]:
  out = [(f'kill9/{i}', kill9_probe(i)) for i in range(kill9)]
  out += [
      ('corrupt/delete_newest', corrupt_probe(delete_newest, True)),
      ('corrupt/truncate', corrupt_probe(truncate_newest, True)),
      ('corrupt/flip', corrupt_probe(flip_newest, True)),
      ('corrupt/torn_line', corrupt_probe(tear_last_line, False)),
      ('corrupt/metrics_cut', corrupt_probe(cut_metrics, False)),
  ]
  out += [(f'config/{key}', changed_key_probe(key, old, new))
          for key, old, new in CHANGES]
  out += [
      ('config/num_rounds_raised',
       accepted_probe({'num_rounds': RAISED_ROUNDS})),
      ('config/eval_every_changed',
       accepted_probe({'num_rounds': RAISED_ROUNDS, 'eval_every': 2})),
      ('config/fewer_rounds', fewer_rounds_probe),
      ('config/allow_change', accepted_probe(
          {'num_rounds': RAISED_ROUNDS, 'client.learning_rate': 0.1},
          flags=['--allow_config_change=client.learning_rate'],
          same_params=False)),
      ('signal/sigterm', signal_probe(signal.SIGTERM)),
      ('signal/sigint', signal_probe(signal.SIGINT)),
      ('twoproc', two_processes_probe),
      ('diskfull', disk_full_probe),
      ('nan/device', nan_probe('device')),
      ('nan/host', nan_probe('host')),
      ('nan/same_sha', nan_same_sha_probe),
      ('badinput/missing_config', bad_input_probe(
          config=lambda d: os.path.join(d, 'does_not_exist.py'))),
      ('badinput/workdir_is_file', bad_input_probe(workdir_file=True)),
      ('badinput/checkpoint_keep_0', bad_input_probe({'checkpoint_keep': 0})),
      ('badinput/server_lr_nan',
       bad_input_probe({'server.learning_rate': 'nan'})),
      ('badinput/server_lr_negative',
       bad_input_probe({'server.learning_rate': -1})),
      ('badinput/client_lr_1e38',
       bad_input_probe({'client.learning_rate': 1e38})),
      ('badinput/misspelt_key',
       bad_input_probe({'client.lerning_rate': 0.1})),
      ('badinput/speech_no_espeak', bad_input_probe(
          {'num_rounds': 1}, config=os.path.join(REPO, 'configs',
                                                 'conformer_fd.py'),
          env=no_espeak_env)),
      ('badinput/oom', oom_probe),
      ('dropped/lr1000', all_dropped_probe({'client.learning_rate': 1000})),
      # Every client holds a NaN example it trains on (batch >= its size).
      ('dropped/all_nan', all_dropped_probe({
          'data.nan_clients': 100, 'client.batch_size': 100})),
  ]
  return out


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--kill9', type=int, default=10,
                 help='kill -9 runs (default 10).')
  p.add_argument('--only', default=None,
                 help='run only the probes whose name contains this.')
  p.add_argument('--keep', action='store_true',
                 help='keep the probes\' directories.')
  p.add_argument('--seed', type=int, default=0,
                 help='seed of the kill moments.')
  p.add_argument('--root', default=None,
                 help='directory for the probes (default: a fresh temp dir).')
  p.add_argument('--out', default=None,
                 help='also write the JSON here (default for the full '
                 'matrix: benchmarks/results/faults.json).')
  return p.parse_args(argv)


def row(name: str, status: str, detail: str) -> None:
  print(f'{name:<28} {status:<8} {detail}', flush=True)


def main(argv=None):
  args = parse_args(argv)
  root = args.root or tempfile.mkdtemp(prefix='faults-')
  os.makedirs(root, exist_ok=True)
  ctx = Context(root, args.seed, args.keep)
  chosen = [(n, p) for n, p in probes(args.kill9)
            if args.only is None or args.only in n]
  print(f'{len(chosen)} probes under {root}', flush=True)
  row('probe', 'handled', 'detail')
  results: dict[str, str] = {}
  group_seconds: dict[str, float] = {}
  t_all = time.time()
  for name, probe in chosen:
    d = os.path.join(root, name.replace('/', '_'))
    os.makedirs(d, exist_ok=True)
    t0 = time.time()
    try:
      status, detail = probe(ctx, d)
    except ProbeError as e:
      status, detail = 'no', f'could not probe: {e}'
    except Exception as e:  # pylint: disable=broad-except
      status, detail = 'no', f'probe error: {type(e).__name__}: {e}'
    seconds = time.time() - t0
    group = name.split('/')[0]
    group_seconds[group] = round(group_seconds.get(group, 0.0) + seconds, 1)
    results[name] = status
    row(name, status, f'[{seconds:.0f}s] {detail}')
    if not args.keep:
      shutil.rmtree(d, ignore_errors=True)
  if not args.keep and not args.root:
    shutil.rmtree(root, ignore_errors=True)
  run_names = [n for n, s in results.items() if s != 'skipped']
  summary = dict(
      probes=len(run_names),
      handled=sum(results[n] == 'yes' for n in run_names),
      skipped=[n for n, s in results.items() if s == 'skipped'],
      kill9_runs=ctx.kill9_runs, kill9_identical=ctx.kill9_identical,
      failed=[n for n in run_names if results[n] != 'yes'],
      group_seconds=group_seconds,
      total_seconds=round(time.time() - t_all, 1),
      root=root if args.keep else None,
  )
  out = args.out or (None if args.only else
                     os.path.join(HERE, 'results', 'faults.json'))
  round_throughput.emit_json(summary, out)


if __name__ == '__main__':
  main()
