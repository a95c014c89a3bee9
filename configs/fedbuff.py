"""FedBuff (Nguyen et al. 2022) on Fashion-MNIST over simulated phones.

Asynchronous buffered aggregation in simulated time: 40 clients train at
once; the server steps on every 10 updates that arrive, each weighted by
1/sqrt(1 + staleness). The clients run on the documented parametric device
classes (`fedjax_eff/devices/profiles.py`: low/mid/high-end phones and IoT
boards; throughput, bandwidth and memory drawn per client from (seed,
client id)). Each client's time is its bits over its bandwidths plus the
compiled program's FLOPs over its throughput. metrics.jsonl records
`sim_hours`, and `launch/plot.py` draws accuracy against it.

The data: Fashion-MNIST (Debian's dataset-fashion-mnist; `make data`) over
500 clients (Dirichlet 0.5), an MLP (784-128-10), 5 local steps of 20,
client SGD 0.05.

  python launch/train.py --config=configs/fedbuff.py --workdir=runs/fedbuff
  # synchronous FedAvg on the same devices, with 30% over-selection:
  python launch/train.py --config=configs/fedbuff.py --workdir=runs/sync \\
      --config.mode=federated --config.devices.over_selection=0.3
"""

from fedjax_eff.experiment.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, 'fashion_mnist')
  c.mode = 'fedbuff'
  c.num_rounds = 300              # server steps
  c.clients_per_round = 20        # synchronous runs: K
  c.model.name = 'mlp'
  c.model.kwargs.hidden = (128,)
  c.client.learning_rate = 0.05
  c.client.local_steps = 5
  c.client.batch_size = 20
  c.fedbuff.concurrency = 40
  c.fedbuff.buffer_size = 10
  c.fedbuff.staleness = 'sqrt'
  c.devices.profiles = 'parametric'
  c.devices.availability = 'always'
  c.devices.jitter = 0.2
  c.eval_every = 10
  c.checkpoint_every = 50
  return c
