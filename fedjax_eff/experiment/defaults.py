"""The base config every `configs/*.py` starts from and overrides.

Every key a run reads exists here, so `--config.KEY=VALUE` overrides are
type-checked by ml_collections and a misspelt key is an error naming it.
"""

from __future__ import annotations

import ml_collections

from fedjax_eff.data import registry as data_registry
from fedjax_eff.privacy import setup as privacy_setup
from fedjax_eff.ssl import augment as ssl_augment


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_rounds = 100
  c.clients_per_round = 10
  # Clients per vmapped chunk; 0 = per-backend default (1 on CPU, where a
  # scan over clients is fastest; up to 128 on GPU/TPU); -1 = autotune:
  # time a few rounds of the first cohort per candidate width, keep the
  # fastest (cached per model/backend/shape in
  # ~/.cache/fedjax_eff/chunk_autotune.json; core/autotune.py).
  c.chunk_size = 0
  # Run the cohort on chunk_size lanes, each training several clients back
  # to back, instead of chunks of clients that each run to their longest
  # client (core.build_round(lanes=True)): on cohorts of uneven step
  # counts (client.epochs, heavy-tailed sizes) nearly every step computed
  # is real. Techniques that are the same for every client only (plain
  # FedAvg/FedAdam/FedProx, static last-n or partial training), one
  # device; results equal the chunked round's up to float summation order.
  c.lanes = False
  # Techniques with per-client state (error feedback, SCAFFOLD) keep one
  # state per training client (N x model size for both): refused above
  # this many GiB (on the device with device-resident data, else in host
  # memory; summary.json reports client_state_bytes).
  c.client_state_limit_gib = 4.0
  # Where the training examples live: 'device' (all clients' examples on
  # the accelerator once; a round gathers its cohort inside the program and
  # only indices cross from the host), 'host' (each cohort packed on the
  # host one round ahead, in a background thread) or 'auto' ('device' when
  # they take at most a quarter of the device's memory). Same results.
  c.data_placement = 'auto'
  # Shard each cohort over a Mesh of this many devices ('clients' axis):
  # 0 = no mesh, -1 = every device (of every process under
  # jax.distributed; see launch/train.py for multi-host flags).
  c.mesh_clients = 0
  # Replicas of one program (experiment/replicas.py: a sweep's seeds and
  # learning rates) sharded over a Mesh of this many devices ('replicas'
  # axis; 0 = none, -1 = every device): each device runs R / n replicas.
  # With mesh_clients n as well, an r x n mesh ('replicas', 'clients'):
  # each block of n devices runs R / r replicas, its cohort split n ways.
  c.mesh_replicas = 0
  # 'federated' (the rounds above) or 'local': every client trains only on
  # its own data, nothing is averaged or communicated (experiment/local.py;
  # FedYolo's baseline). local.num_clients: clients simulated, drawn once
  # from the training clients (0 = clients_per_round).
  c.mode = 'federated'
  c.local = ml_collections.ConfigDict(dict(num_clients=0))
  # config.mode='fedbuff' (experiment/fedbuff.py): asynchronous buffered
  # aggregation in simulated time (needs devices.profiles). num_rounds
  # counts server steps; each steps on buffer_size arrived updates, each
  # weighted by its staleness ('sqrt': 1/sqrt(1+tau); 'none').
  c.fedbuff = ml_collections.ConfigDict(dict(
      concurrency=20, buffer_size=10, staleness='sqrt'))

  c.data = data_registry.default_config()  # the data contract, one place

  c.model = ml_collections.ConfigDict(dict(
      name='cnn',             # logreg | mlp | cnn
      kwargs=ml_collections.ConfigDict(),
  ))

  c.client = ml_collections.ConfigDict(dict(
      optimizer='sgd',
      learning_rate=0.1,
      optimizer_kwargs=ml_collections.ConfigDict(),
      local_steps=4,          # S: local steps per round
      batch_size=16,          # B
      # > 0: E local epochs instead of S steps: a client runs
      # E x ceil(min(n, max_examples) / B) steps (TFF / FedJAX clients),
      # weight min(n, max_examples); S is the largest client's count.
      epochs=0,
      max_examples=0,         # with epochs: examples per client (0: all)
      policy_large='subsample',  # clients with > S*B examples
      policy_small='pad',     # clients with < S*B examples: pad | repeat
      weighting='num_examples',  # aggregation weight: num_examples | uniform
      prox_mu=0.0,            # FedProx proximal term (0 = off)
  ))

  c.server = ml_collections.ConfigDict(dict(
      optimizer='fedavg',     # fedavg fedavgm fedadam fedyogi fedadagrad | optax
      learning_rate=1.0,
      optimizer_kwargs=ml_collections.ConfigDict(),
      # The server learning rate against the cohort size K (Charles et al.
      # 2021, "On large-cohort training for federated learning"):
      # learning_rate x 1 ('none'), x sqrt(K / lr_reference_clients)
      # ('sqrt') or x K / lr_reference_clients ('linear').
      lr_scaling='none',
      lr_reference_clients=10,
  ))

  # What the model learns: 'classification' (labels), 'contrastive'
  # (SimCLR: two augmented views, NT-Xent; evaluated by a linear probe on
  # the labelled data with the features the current stage trains) or 'lm'
  # (next token: loss per non-pad token, accuracy without pad/eos/oov,
  # perplexity in the eval metrics) or 'ctc' (speech: CTC loss per label
  # character, exact-match accuracy, CER/WER of greedy decodes in eval).
  c.task = ml_collections.ConfigDict(dict(
      name='classification',
      pad_id=0, eos_id=2, oov_id=3,             # lm only
      temperature=0.1,                          # contrastive only
      # ssl.simclr_augment knobs, every one overridable from the CLI.
      augment=ml_collections.ConfigDict(dict(ssl_augment.DEFAULT_KNOBS)),
      probe_steps=300,                          # linear-probe optimizer steps
      probe_max_examples=5000,                  # labelled examples it reads
  ))

  # Techniques, composed in order (see fedjax_eff/techniques). Empty: FedAvg.
  c.techniques = []

  # How a round's cohort is drawn: 'fixed' (clients_per_round distinct
  # clients), 'poisson' (each client with probability clients_per_round /
  # N: a cohort of varying size in static shapes, the sampling DP
  # amplification assumes) or 'cyclic' (fixed blocks of the shuffled
  # population in turn: banded DP-FTRL's participation).
  c.sampling = 'fixed'
  # Client-level differential privacy (fedjax_eff/privacy/setup.py):
  # mechanism 'none' | 'gaussian' (DP-FedAvg) | 'banded' (DP-FTRL).
  c.privacy = privacy_setup.default_config()

  # Simulated device classes. Each client belongs to one tier, drawn once
  # from `tier_fractions` (seeded); techniques may run a different program
  # per tier (e.g. budgeted_last_n's budgets, one per tier). [] = one tier.
  c.devices = ml_collections.ConfigDict(dict(
      tier_fractions=[],
      # Devices in time (experiment/device_time.py, fedjax_eff/devices):
      # 'none' | 'parametric' (documented phone/IoT classes) | 'uniform'
      # (one device for all) | 'fedscale' (trace_path: FedScale's
      # client_device_capacity). Rounds then last what the devices take:
      # sim_round_seconds and sim_hours in metrics.jsonl.
      profiles='none',
      trace_path='',
      # When clients are online: 'always' | 'diurnal' | 'fedscale' |
      # 'flash' (availability_path: the behaviour trace).
      availability='always',
      availability_path='',
      jitter=0.0,              # log-normal sd of each client's time
      over_selection=0.0,      # o: sample K(1+o), aggregate the first K
      deadline_seconds=0.0,    # > 0: clients finishing later are dropped
      failure_probability=0.0,  # a sampled client fails mid-round
      # Each client's tier: the largest program its memory holds (tiers
      # ordered from the smallest program up); else tier_fractions, and a
      # client whose memory cannot hold its program is never sampled.
      tiers_by_memory=False,
  ))

  # Per (stage, tier): compile the single-client update and record what a
  # device pays (device_peak_bytes, device_flops_per_round) in the metrics.
  c.accounting = True

  # Start from parameters exported by launch/pretrain.py (its workdir); ''
  # = a fresh initialisation.
  c.init_checkpoint = ''
  # Regex over checkpoint leaf paths not to load (e.g. '^head': fine-tune
  # with a fresh head); leaves the checkpoint lacks always start fresh.
  c.init_checkpoint_skip = ''
  # Central pretraining (launch/pretrain.py) on the pooled training clients.
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=500, batch_size=64, optimizer='adam', learning_rate=1e-3,
      log_every=50, checkpoint_every=100))

  # Nested sub-models (the first r of every width group's units, evaluated
  # alone) at the end of the run: these keep ratios; [] = [0.25, 0.5,
  # 0.75, 1.0] when federated_dropout is on, none otherwise.
  c.submodel_keeps = []
  c.eval_every = 10
  c.eval_batch_size = 256
  c.checkpoint_every = 10
  c.checkpoint_keep = 3
  # Stop (exit 1, one line) after this many rounds in a row that changed
  # nothing: every client update non-finite and dropped, or the server
  # step non-finite and skipped (0 = never stop).
  c.max_failed_rounds = 5
  # A progress bar on a terminal; elsewhere (logs, notebooks' captured
  # output, progress=False) a line every log_every_seconds (0 = none).
  c.progress = True
  c.log_every_seconds = 30.0
  c.tensorboard = True
  return c


def sibling_config(config_file: str, name: str,
                   arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config()` (or `get_config(arg)`) of `configs/.../<name>.py` next
  to `config_file`.

  Variants import their base this way (config files are loaded by path, so
  `configs` is not an importable package):
  `c = sibling_config(__file__, 'fedssl_vit')`.
  """
  return load_config_module(config_file, name).get_config(
      *(() if arg is None else (arg,)))


def load_config_module(config_file: str, name: str):
  """The module `<name>.py` next to `config_file`, loaded by path."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)),
                      name + '.py')
  spec = importlib.util.spec_from_file_location(f'_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
