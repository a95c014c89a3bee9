"""FedAvg on your own arrays (`data.source='npz'`, `sources.load_npz`).

`--config.data.data_dir` names either a directory with one
`<client id>.npz` per client (arrays `x`, `y` and any other per-example
features, equal length; an optional `test.npz` is the central test set) or
one `.npz` with a `client_id` array beside `x`, `y`, ... (optional
`x_test`, `y_test`). Every client in the files trains (`data.num_clients`
caps them); `--config.data.heldout_clients=N` holds the last N ids out for
evaluation. The model is an MLP, which flattens any input; images
[n, H, W, C] may use `--config.model.name=cnn`.

  python launch/train.py --config=configs/npz.py --workdir=runs/mine \
      --config.data.data_dir=mydata
"""

from fedjax_eff.experiment.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, 'default')  # FedAvg, 10 clients x 4 steps
  c.num_rounds = 100
  c.data.source = 'npz'
  c.data.num_clients = 1_000_000  # a cap: every client in the files
  c.data.heldout_clients = 0
  c.model.name = 'mlp'
  c.client.batch_size = 16
  return c
