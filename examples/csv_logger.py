"""A callback of the user's own: every round's metrics into a CSV file.

    python launch/train.py --config=configs/default.py --workdir=runs/x \
        --callbacks=examples/csv_logger.py:CsvLogger

writes runs/x/rounds.csv (one row per round; columns are every key seen so
far, a new key adds a column and rewrites the header) without touching the
library. The same shape serves a W&B-style logger: call `wandb.log(metrics,
step=round_num)` in `on_round_end` and `wandb.summary.update(summary)` in
`on_run_end`.
"""

import csv
import os


class CsvLogger:
  """`on_round_end` appends a row; columns grow as new keys appear."""

  def __init__(self, workdir, config):
    del config
    self.path = os.path.join(workdir, 'rounds.csv')
    self.rows = []
    if os.path.exists(self.path):  # a resumed run keeps earlier rows
      with open(self.path, newline='') as f:
        self.rows = list(csv.DictReader(f))

  def on_round_end(self, round_num, metrics):
    self.rows = [r for r in self.rows if int(r['round']) < round_num]
    self.rows.append({'round': round_num, **metrics})
    columns = list(dict.fromkeys(k for r in self.rows for k in r))
    tmp = self.path + '.tmp'
    with open(tmp, 'w', newline='') as f:
      writer = csv.DictWriter(f, columns)
      writer.writeheader()
      writer.writerows(self.rows)
    os.replace(tmp, self.path)
