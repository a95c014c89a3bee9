"""Federated training: sample, pack (prefetched), step, evaluate, record.

`train_and_evaluate(config, workdir)` is what `launch/train.py`, the tests
and the notebook all call; it runs the mode `config.mode` names (`MODES`:
'federated' here, 'local' in `local.py`). It holds no model, task or
technique logic: `build.Experiment` wires the data, model, task,
technique and optimizers named in the config into `core.build_round`, and
`run.run_rounds` runs rounds, writing

  workdir/metrics.jsonl       one JSON line per round
  workdir/tensorboard/        TensorBoard events
  workdir/checkpoints/        orbax checkpoints every `checkpoint_every`
  workdir/summary.json        final metrics, wall time, config, versions,
                              params_sha256

Re-running with the same workdir resumes from the newest readable checkpoint;
a resumed run ends with the same `params_sha256` as an unbroken one.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_eff import core
from fedjax_eff.experiment import local
from fedjax_eff.experiment import loop as loop_lib
from fedjax_eff.experiment import run as run_lib
from fedjax_eff.experiment.build import Experiment, RoundInput
from fedjax_eff.experiment.build import params_sha256, versions
from fedjax_eff.privacy import setup as privacy_setup

__all__ = ['Experiment', 'FederatedMode', 'MODES', 'params_sha256',
           'train_and_evaluate', 'train_federated', 'versions']


def real_clients(m: core.RoundMetrics, k: int) -> core.RoundMetrics:
  """Round metrics of a cohort's first `k` clients (the rest: absent
  slots of a Poisson draw): their count, their mean bits, their
  per-client arrays."""
  per_client = {f: np.asarray(getattr(m, f))[:k] for f in (
      'client_upload_bits', 'client_download_bits', 'client_variant')
                if not isinstance(getattr(m, f), tuple)}
  up, down = (per_client['client_upload_bits'],
              per_client['client_download_bits'])
  return m._replace(num_clients=np.float32(k),
                    upload_bits=np.float32(up.mean() if k else 0.0),
                    download_bits=np.float32(down.mean() if k else 0.0),
                    **per_client)


class FederatedMode:
  """Rounds of `core.build_round` on the server state (`run.RoundMode`)."""

  desc = 'rounds'

  def __init__(self, exp: Experiment):
    self.exp = exp
    self.current = {'state': exp.init_state()}
    # Rounds to run: fewer than config.num_rounds when privacy's
    # target_epsilon would be exceeded.
    self.num_rounds = exp.config.num_rounds
    if exp.privacy is not None:
      self.num_rounds = exp.privacy.rounds_allowed
      line = privacy_setup.stop_line(exp.privacy, exp.config.num_rounds)
      if line:
        print(line, flush=True)

  def restore(self, restored: dict[str, Any]) -> int:
    state = restored['state']
    if self.exp.privacy is not None:  # the accountant's state
      self.exp.privacy.check_restored(restored['privacy'],
                                      int(np.asarray(state.round)))
    if self.exp.device_time is not None:  # the simulated clock
      self.exp.device_time.restore(int(np.asarray(state.round)),
                                   float(restored['sim_clock'][0]))
    if self.exp.host_store is not None:  # the store back to host memory
      self.exp.host_store = self.exp.host_store._replace(
          states=jax.tree.map(np.array, state.clients))
      state = state._replace(clients=())
    self.current['state'] = jax.tree.map(jnp.asarray, state)
    return int(self.current['state'].round)

  def cohort(self, round_num: int) -> RoundInput:
    return self.exp.cohort(round_num)

  def step(self, r: int, this: RoundInput) -> tuple[dict[str, float], float]:
    """One round; the record holds the round's scalar metrics and the
    device costs (whose compiles are not the round's time)."""
    exp = self.exp
    cohort, store = this.cohort, exp.host_store
    if store is not None:  # this round's clients' states, as of now
      ids = cohort.ctx['client_index']
      cohort = cohort._replace(ctx=dict(cohort.ctx,
                                        client_state=store.rows(ids)))
    privacy = {}
    if exp.privacy is not None:  # the clip this round uses
      clip = privacy_setup.clip_norm(exp.config,
                                     self.current['state'].technique)
      if clip is not None:
        privacy['clip_norm'] = clip
    self.current['state'], m = exp.round_fns.round_step(
        self.current['state'], cohort, exp.round_key(r), round_num=r,
        examples=exp.examples, part_of=this.part_of)
    if store is not None:
      store.write(ids, m)
    tiers = this.tiers
    # Each device's own steps (a process's part of a split cohort: not
    # known here; its FLOPs are then counted at S steps).
    steps = cohort.steps_run if this.part_of is None else None
    if this.sampled < len(tiers):  # Poisson: the clients drawn, not the
      m, tiers = real_clients(m, this.sampled), tiers[:this.sampled]
      steps = None if steps is None else steps[:this.sampled]
    record = {k: float(v) for k, v in m._asdict().items()
              if not k.startswith('client_')}
    if this.overflow:
      record['sampling_overflow'] = float(this.overflow)
    if this.sim is not None:  # devices in time
      record.update(this.sim)
    if exp.privacy is not None:  # (epsilon after this round)
      privacy['epsilon'] = exp.privacy.epsilon(r + 1)
    record.update(privacy)
    t_acc = time.time()
    record.update(exp.device_metrics(r, tiers, m, steps))
    return record, time.time() - t_acc

  def evaluate(self, done: int) -> dict[str, float]:
    return self.exp.eval_metrics(self.current['state'].params, done)

  def checkpoint(self, done: int) -> dict[str, Any]:
    """The server state, with the client-state store wherever it lives
    (the same checkpoint for host and device placement)."""
    del done
    return self.state()

  def state(self) -> dict[str, Any]:
    state = self.current['state']
    if self.exp.host_store is not None:
      state = state._replace(clients=self.exp.host_store.states)
    out = {'state': state}
    done = int(np.asarray(state.round))
    if self.exp.privacy is not None:
      out['privacy'] = self.exp.privacy.checkpoint(done)
    if self.exp.device_time is not None:
      out['sim_clock'] = np.asarray(
          [self.exp.device_time.clock.get(done, 0.0)], np.float64)
    return out

  def finish(self, last: dict[str, Any], rounds: int,
             history: list[dict[str, Any]]) -> dict[str, Any]:
    """Evaluates the final model if the last round did not, adds the
    technique's report (`Technique.report`), and returns the federated
    summary fields."""
    exp, state = self.exp, self.current['state']
    if 'test_accuracy' not in last and 'heldout_accuracy' not in last:
      last.update(exp.eval_metrics(state.params, rounds))
    last.update(exp.technique_report(state.params))
    privacy = {}
    if exp.privacy is not None:
      privacy['privacy'] = exp.privacy.summary(
          rounds, privacy_setup.clip_norm(exp.config, state.technique))
    return {
        **privacy,
        'server_steps_skipped': int(sum(
            h.get('server_step_skipped') or 0 for h in history)),
        'failed_rounds': int(sum(loop_lib.failed_round(h)
                                 for h in history)),
        'params_sha256': params_sha256(state.params),
        'technique': exp.round_fns.technique.name,
        'chunk_size': exp.chunk_size,
        'chunk_autotune_seconds': exp.autotune_seconds,
        'data_placement': 'device' if exp.examples is not None else 'host',
        'mesh_devices': exp.mesh.size if exp.mesh else 0,
        'processes': jax.process_count(),
        'device_cost': exp.cost_table(),
        'client_state_bytes': exp.client_state_bytes(state),
        'num_params': int(sum(np.size(x)
                              for x in jax.tree.leaves(state.params))),
        # The model every client downloads once before its first round
        # (per round downloads are in metrics.jsonl).
        'initial_download_bits': core.technique.tree_bits(state.params),
    }


def train_federated(config: ml_collections.ConfigDict, workdir: str, *,
                    progress: bool | None = None,
                    allow_config_change: tuple[str, ...] = (),
                    callbacks: tuple[Any, ...] = ()) -> dict[str, Any]:
  """Runs (or resumes) federated training in `workdir`; returns the
  summary (`run.session`'s guarantees)."""
  return run_lib.session(
      config, workdir, lambda: run_lib.run_rounds(
          config, workdir, FederatedMode, progress=progress,
          callbacks=callbacks),
      allow_config_change=allow_config_change, callbacks=callbacks)


def train_fedbuff(config: ml_collections.ConfigDict, workdir: str, *,
                  progress: bool | None = None,
                  allow_config_change: tuple[str, ...] = (),
                  callbacks: tuple[Any, ...] = ()) -> dict[str, Any]:
  """Runs (or resumes) FedBuff (`experiment/fedbuff.py`) in `workdir`."""
  from fedjax_eff.experiment import fedbuff  # pylint: disable=g-import-not-at-top
  return run_lib.session(
      config, workdir, lambda: run_lib.run_rounds(
          config, workdir, fedbuff.FedBuffMode, progress=progress,
          callbacks=callbacks),
      allow_config_change=allow_config_change, callbacks=callbacks)


# config.mode -> the function that runs a config of that mode.
MODES = {'federated': train_federated, 'local': local.train_local,
         'fedbuff': train_fedbuff}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       *, progress: bool | None = None,
                       allow_config_change: tuple[str, ...] = (),
                       callbacks: tuple[Any, ...] = ()) -> dict[str, Any]:
  """Runs (or resumes) the experiment in `workdir`; returns the summary.

  `config.mode` picks the run (`MODES`). The workdir is locked for the run
  (`workdir_lib.RunLock`), its recorded config must match
  (`workdir_lib.check_config`; `allow_config_change` names trajectory keys
  the caller knowingly changes). Ends with `errors.RunRefused` (bad
  input), `RunFailed` (I/O, memory, a run that stopped learning) or
  `RunInterrupted` (a signal, after saving). `callbacks`: the user's hooks
  (`experiment/callbacks.py`).
  """
  run = MODES.get(config.get('mode'), train_federated)  # validated there
  return run(config, workdir, progress=progress,
             allow_config_change=allow_config_change, callbacks=callbacks)
