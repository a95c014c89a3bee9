"""FedJAX 0.0.17's side of `benchmarks/peers.py` (runs in its own venv).

FedJAX's own FedAvg (`fed_avg.federated_averaging`) on its default jit
`for_each_client` backend, with the shims of `benchmarks/fedjax_shims.py`,
and FedJAX's own haiku CNN module (`emnist.ConvDropoutModule`: conv3x3(32),
conv3x3(64), maxpool 2x2, dropout .25, dense 128, dropout .5, dense), which
is layer for layer pfl-research's `simple_cnn`, here on 32x32x3 inputs and
10 classes. With `--workload femnist`: FedJAX's own EMNIST dense model
(`emnist.create_dense_model(hidden_units=200)`: McMahan et al.'s 2NN,
784-200-200-62) over 3,400 FEMNIST-shaped clients. Speaks `common.Channel`'s protocol on stdout.
"""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402
import fedjax_shims  # noqa: E402


def build(args):
  shims = fedjax_shims.apply_shims()
  import haiku as hk
  import fedjax
  from fedjax.core import metrics
  from fedjax.models import emnist

  if args.workload == 'femnist':
    w = common.WORKLOADS['femnist']
    assert w['num_classes'] == 62 and w['mlp_hidden'] == (200, 200), w
    model = emnist.create_dense_model(only_digits=False, hidden_units=200)
  else:
    def forward_pass(batch, is_train=True):
      return emnist.ConvDropoutModule(common.NUM_CLASSES)(batch['x'],
                                                          is_train)

    model = fedjax.create_model_from_haiku(
        transformed_forward_pass=hk.transform(forward_pass),
        sample_batch={'x': np.zeros((1,) + common.IMAGE_SHAPE, np.float32),
                      'y': np.zeros((1,), np.int32)},
        train_loss=lambda b, p: metrics.unreduced_cross_entropy_loss(b['y'],
                                                                     p),
        eval_metrics={'loss': metrics.CrossEntropyLoss()},
        train_kwargs={'is_train': True}, eval_kwargs={'is_train': False})
  clients = {}
  for i in range(args.num_clients):
    x, y = common.client_data(i, args.examples_per_client, args.seed,
                              args.workload)
    clients[common.client_id(i)] = {'x': x, 'y': y}
  return fedjax_shims.fedavg_runner(model, clients, args, shims)


def main():
  args = common.parse_worker_args(__doc__.splitlines()[0])
  channel = common.Channel()
  try:
    run_round, info = build(args)
  except Exception as e:  # pylint: disable=broad-except
    channel.fail(e)
    return
  channel.set_info(info)
  channel.serve(run_round)


if __name__ == '__main__':
  main()
