"""pfl-research 0.6's side of `benchmarks/peers.py` (runs in its own venv).

pfl's own simulation: `FederatedAveraging().run(...)` with a
`SimulatedBackend` over a `FederatedDataset` of 1,000 users (each made on
demand by `make_dataset_fn` from `common.client_data`), a `PyTorchModel`
(pfl-research's `simple_cnn`, local `torch.optim.SGD`, central
`torch.optim.SGD(lr=server_lr)`: FedAvg) on CPU, cohort size 50, one local
epoch at batch 10, updates weighted by data points (`WeightByDatapoints`),
no privacy, no evaluation. With `--workload femnist`: 3,400 users of 20
FEMNIST-shaped examples, `torch_cnn.mlp_2nn`, the parent's cohort size.
pfl owns the training loop: a callback's
`after_central_iteration` reports each round to the parent and waits for
the next request (`common.Channel`).
"""

from __future__ import annotations

import os
import platform
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402


def main():
  args = common.parse_worker_args(__doc__.splitlines()[0])
  channel = common.Channel()
  try:
    import importlib.metadata as md
    import torch
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel
    import torch_cnn

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    net = torch_cnn.model_for(args.workload)
    model = PyTorchModel(
        model=net, local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(net.parameters(),
                                          lr=args.server_lr))
    user_ids = [common.client_id(i) for i in range(args.num_clients)]
    np.random.default_rng(args.seed).shuffle(user_ids)

    def make_dataset_fn(user_id):
      x, y = common.client_data(int(user_id), args.examples_per_client,
                                args.seed, args.workload)
      return Dataset(raw_data=[x, y], user_id=user_id)

    train_data = FederatedDataset(
        make_dataset_fn, get_user_sampler('minimize_reuse', user_ids))
    backend = SimulatedBackend(training_data=train_data, val_data=None,
                               postprocessors=[WeightByDatapoints()])
    algorithm_params = NNAlgorithmParams(
        central_num_iterations=args.max_rounds,
        evaluation_frequency=10 ** 9,
        train_cohort_size=args.clients_per_round, val_cohort_size=0)
    train_params = NNTrainHyperParams(
        local_learning_rate=args.client_lr, local_num_epochs=args.epochs,
        local_batch_size=args.batch_size)
    eval_params = NNEvalHyperParams(local_batch_size=args.batch_size)

    def info():
      return dict(
          framework='pfl', device=str(next(net.parameters()).device),
          torch_threads=torch.get_num_threads(),
          python=platform.python_version(),
          versions={p: md.version(p) for p in ('pfl', 'torch', 'numpy')},
          params_finite=torch_cnn.params_finite(net),
          num_params=torch_cnn.num_params(net))

    channel.set_info(info)

    class Report(TrainingProcessCallback):

      def after_central_iteration(self, aggregate_metrics, model, *,
                                  central_iteration):
        return not channel.round_done(), Metrics()

  except Exception as e:  # pylint: disable=broad-except
    channel.fail(e)
    return
  if not channel.begin():
    return
  try:
    FederatedAveraging().run(
        algorithm_params=algorithm_params, backend=backend, model=model,
        model_train_params=train_params, model_eval_params=eval_params,
        callbacks=[Report()], send_metrics_to_platform=False)
  except Exception as e:  # pylint: disable=broad-except
    channel.fail(e)


if __name__ == '__main__':
  main()
