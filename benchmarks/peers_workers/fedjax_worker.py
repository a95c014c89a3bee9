"""FedJAX 0.0.17's side of `benchmarks/peers.py` (runs in its own venv).

FedJAX's own FedAvg (`fed_avg.federated_averaging`) on its default jit
`for_each_client` backend, with the shims of `benchmarks/fedjax_shims.py`,
and FedJAX's own haiku CNN module (`emnist.ConvDropoutModule`: conv3x3(32),
conv3x3(64), maxpool 2x2, dropout .25, dense 128, dropout .5, dense), which
is layer for layer pfl-research's `simple_cnn`, here on 32x32x3 inputs and
10 classes. Speaks `common.Channel`'s protocol on stdout.
"""

from __future__ import annotations

import os
import platform
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402
import fedjax_shims  # noqa: E402


def build(args):
  shims = fedjax_shims.apply_shims()
  import importlib.metadata as md
  import haiku as hk
  import jax
  import fedjax
  from fedjax.algorithms import fed_avg
  from fedjax.core import metrics
  from fedjax.models import emnist

  def forward_pass(batch, is_train=True):
    return emnist.ConvDropoutModule(common.NUM_CLASSES)(batch['x'], is_train)

  model = fedjax.create_model_from_haiku(
      transformed_forward_pass=hk.transform(forward_pass),
      sample_batch={'x': np.zeros((1,) + common.IMAGE_SHAPE, np.float32),
                    'y': np.zeros((1,), np.int32)},
      train_loss=lambda b, p: metrics.unreduced_cross_entropy_loss(b['y'], p),
      eval_metrics={'loss': metrics.CrossEntropyLoss()},
      train_kwargs={'is_train': True}, eval_kwargs={'is_train': False})
  clients = {}
  for i in range(args.num_clients):
    x, y = common.client_data(i, args.examples_per_client, args.seed)
    clients[common.client_id(i)] = {'x': x, 'y': y}
  fd = fedjax.InMemoryFederatedData(clients)
  algorithm = fed_avg.federated_averaging(
      grad_fn=fedjax.model_grad(model),
      client_optimizer=fedjax.optimizers.sgd(args.client_lr),
      server_optimizer=fedjax.optimizers.sgd(args.server_lr),
      client_batch_hparams=fedjax.ShuffleRepeatBatchHParams(
          batch_size=args.batch_size, num_epochs=args.epochs,
          seed=args.seed))
  sampler = fedjax.client_samplers.UniformGetClientSampler(
      fd, num_clients=args.clients_per_round, seed=args.seed)
  state = [algorithm.init(model.init(jax.random.PRNGKey(args.seed)))]

  def run_round(r):
    sampler.set_round_num(r)
    state[0], _ = algorithm.apply(state[0], sampler.sample())
    jax.block_until_ready(state[0].params)

  def info():
    leaves = jax.tree.leaves(state[0].params)
    return dict(
        framework='fedjax',
        backend=type(fedjax.get_for_each_client_backend()).__name__,
        shims=shims, python=platform.python_version(),
        versions={p: md.version(p) for p in (
            'fedjax', 'dm-haiku', 'jax', 'jaxlib', 'optax', 'numpy')},
        params_finite=all(bool(np.all(np.isfinite(np.asarray(x))))
                          for x in leaves),
        num_params=int(sum(np.size(x) for x in leaves)))

  return run_round, info


def main():
  args = common.worker_parser(__doc__.splitlines()[0]).parse_args()
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
