"""Flower's side of `benchmarks/peers.py` (runs in its own venv).

Flower's Ray-based simulation engine, `flwr.simulation.start_simulation`
(the virtual client engine; deprecated in favour of `flwr run` but still
shipped), with Flower's `FedAvg` strategy: 1,000 virtual clients,
`fraction_fit = clients_per_round / num_clients` (50 per round), no
evaluation (`fraction_evaluate=0`, no `evaluate_fn`), examples-weighted
aggregation (FedAvg's `num_examples`), server step = the average (SGD 1.0).
Each client is a `NumPyClient` training pfl-research's `simple_cnn` for one
epoch at batch 10 with `torch.optim.SGD` on its `common.client_data`
examples; client resources are Flower's default (1 CPU per virtual client,
so Ray runs as many clients at once as there are cores). The strategy's
`aggregate_fit` reports each round to the parent and waits for the next
request (`common.Channel`). With `--workload femnist`: 3,400 virtual
clients of 20 FEMNIST-shaped examples training `torch_cnn.mlp_2nn`,
`fraction_fit` set for the parent's cohort size.
"""

from __future__ import annotations

import os
import platform
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

def make_client_fn(args):
  import flwr
  import torch
  import torch_cnn

  class TrainClient(flwr.client.NumPyClient):

    def __init__(self, index):
      self.index = index

    def fit(self, parameters, config):
      net = torch_cnn.cached_model(args.workload)
      with torch.no_grad():
        for p, v in zip(net.parameters(), parameters):
          p.copy_(torch.from_numpy(v))
      x, y = common.client_data(self.index, args.examples_per_client,
                                args.seed, args.workload)
      x, y = torch.from_numpy(x), torch.from_numpy(y)
      opt = torch.optim.SGD(net.parameters(), lr=args.client_lr)
      g = torch.Generator().manual_seed(args.seed * 100003 + self.index)
      for _ in range(args.epochs):
        order = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), args.batch_size):
          idx = order[s:s + args.batch_size]
          opt.zero_grad()
          net.loss(x[idx], y[idx]).backward()
          opt.step()
      return ([p.detach().numpy().copy() for p in net.parameters()],
              len(x), {})

  def client_fn(context):
    return TrainClient(int(context.node_config['partition-id'])).to_client()

  return client_fn


def main():
  args = common.parse_worker_args(__doc__.splitlines()[0])
  channel = common.Channel()
  try:
    import importlib.metadata as md
    import logging
    import flwr
    import ray
    import torch
    from flwr.server.strategy import FedAvg
    import torch_cnn

    logging.getLogger('flwr').setLevel(logging.WARNING)
    torch.manual_seed(args.seed)
    init = [p.detach().numpy().copy() for p in
            torch_cnn.model_for(args.workload).parameters()]
    latest = {'params': init}

    class ReportingFedAvg(FedAvg):

      def aggregate_fit(self, server_round, results, failures):
        if failures:
          raise RuntimeError(f'{len(failures)} clients failed: '
                             f'{failures[0]!r}')
        if len(results) != args.clients_per_round:
          raise RuntimeError(f'{len(results)} clients trained, expected '
                             f'{args.clients_per_round}')
        params, metrics = super().aggregate_fit(server_round, results,
                                                failures)
        latest['params'] = flwr.common.parameters_to_ndarrays(params)
        if not channel.round_done():
          ray.shutdown()
          os._exit(0)  # pylint: disable=protected-access
        return params, metrics

    def info():
      return dict(
          framework='flower', python=platform.python_version(),
          engine='flwr.simulation.start_simulation (Ray)',
          ray_cpus=ray.cluster_resources().get('CPU')
          if ray.is_initialized() else None,
          versions={p: md.version(p) for p in ('flwr', 'ray', 'torch',
                                               'numpy', 'protobuf')},
          params_finite=all(bool(np.all(np.isfinite(a)))
                            for a in latest['params']),
          num_params=int(sum(a.size for a in latest['params'])))

    channel.set_info(info)
    fraction = args.clients_per_round / args.num_clients
    strategy = ReportingFedAvg(
        fraction_fit=fraction, fraction_evaluate=0.0,
        min_fit_clients=args.clients_per_round, min_evaluate_clients=0,
        min_available_clients=args.num_clients,
        initial_parameters=flwr.common.ndarrays_to_parameters(init))
    client_fn = make_client_fn(args)
  except Exception as e:  # pylint: disable=broad-except
    channel.fail(e)
    return
  if not channel.begin():
    return
  # Ray's workers import `common` and `torch_cnn` by name.
  os.environ['PYTHONPATH'] = os.pathsep.join(
      [HERE] + [p for p in [os.environ.get('PYTHONPATH')] if p])
  try:
    flwr.simulation.start_simulation(
        client_fn=client_fn, num_clients=args.num_clients,
        config=flwr.server.ServerConfig(num_rounds=args.max_rounds),
        strategy=strategy,
        ray_init_args={'ignore_reinit_error': True,
                       'include_dashboard': False})
  except Exception as e:  # pylint: disable=broad-except
    channel.fail(e)
  finally:
    if ray.is_initialized():
      ray.shutdown()


if __name__ == '__main__':
  main()
