"""The quickstart notebook runs top to bottom and learns."""

import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_executes(monkeypatch, tmp_path):
  monkeypatch.setenv('QUICKSTART_ROUNDS', '25')
  nb = nbformat.read(os.path.join(ROOT, 'notebooks', 'quickstart.ipynb'), 4)
  NotebookClient(nb, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': str(tmp_path)}}).execute()
  last = nb.cells[-1].outputs
  value = float([o for o in last if o.output_type == 'execute_result'][0]
                ['data']['text/plain'])
  assert value > 0.5  # 25 rounds: well above chance (0.1)
  assert any(o.output_type == 'display_data' and 'image/png' in o['data']
             for o in last)
