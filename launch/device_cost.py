r"""What one device of a config pays per round, without training.

Builds the experiment of `--config` (data, model, techniques: the same
`Experiment` `launch/train.py` builds) and, for every distinct stage of the
technique's schedule and every device tier, compiles the program a device
runs (`accounting.client_cost`: the downloaded view and the batches in, the
packed upload out; nothing executes) and prints its cost:

  peak MB          XLA's peak memory of the local update (arguments +
                   outputs + temporaries - aliased)
  state MB         training state: gradients + optimizer state + activations
                   kept for the backward pass (analytic, one local step)
  GFLOPs           all local steps of one round
  up / down MB     what travels (exact message bits)
  sent MB          what the compiled program returns: the upload, packed

  python launch/device_cost.py --config=configs/layerwise_ssl.py
  python launch/device_cost.py --config=configs/caff_tiers.py \
      --config.client.batch_size=32

The last line is one JSON object: {"programs": [{stage, tier, first_round,
device_peak_bytes, training_state_bytes, ...}, ...]}; `--out=FILE` also
writes it to FILE.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedjax_eff.data.sources import DatasetNotPreparedError
from fedjax_eff.experiment import build
from fedjax_eff.experiment import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (configs/*.py).',
    lock_config=True)
flags.mark_flags_as_required(['config'])
_OUT = flags.DEFINE_string('out', None, 'Also write the JSON line here.')


def stage_rounds(exp: build.Experiment) -> list[int]:
  """The first round of every distinct stage of the schedule."""
  tech = exp.round_fns.technique
  if not tech.stage:
    return [0]
  first = {}
  for r in range(exp.config.num_rounds):
    first.setdefault(tech.stage(r), r)
  return sorted(first.values())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  try:
    exp = build.Experiment(_CONFIG.value)
  except (ValueError, DatasetNotPreparedError) as e:
    cli.fail(str(e))
  rows = []
  print(f'{"stage":<28}{"tier":>5}{"round":>7}{"peak MB":>10}'
        f'{"state MB":>10}{"GFLOPs":>10}{"up MB":>9}{"down MB":>9}'
        f'{"sent MB":>9}')
  for r in stage_rounds(exp):
    for t in range(exp.num_tiers):
      stage, _ = exp.program(r, t)
      cost = exp.program_cost(r, t).as_dict()
      row = dict(stage=repr(stage), tier=t, first_round=r, **cost)
      rows.append(row)
      mb = lambda k, d=1e6: (row[k] or 0) / d
      print(f'{row["stage"][:27]:<28}{t:>5}{r:>7}'
            f'{mb("device_peak_bytes"):>10.3f}'
            f'{mb("training_state_bytes"):>10.3f}'
            f'{mb("device_flops_per_round", 1e9):>10.4f}'
            f'{mb("upload_bits", 8e6):>9.3f}{mb("download_bits", 8e6):>9.3f}'
            f'{mb("device_sent_bytes"):>9.3f}', flush=True)
  line = json.dumps({'programs': rows})
  if _OUT.value:  # whole or not at all: written beside, then renamed
    tmp = _OUT.value + '.tmp'
    with open(tmp, 'w') as f:
      f.write(line + '\n')
    os.replace(tmp, _OUT.value)
  print(line)


if __name__ == '__main__':
  app.run(main)
