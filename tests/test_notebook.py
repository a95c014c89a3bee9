"""The quickstart notebook runs top to bottom, learns and shows what a
device pays."""

import ast
import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _result(cell):
  return [o for o in cell.outputs if o.output_type == 'execute_result'][0][
      'data']['text/plain']


def _has_image(cell):
  return any(o.output_type == 'display_data' and 'image/png' in o['data']
             for o in cell.outputs)


def test_quickstart_notebook_executes(monkeypatch, tmp_path):
  monkeypatch.setenv('QUICKSTART_ROUNDS', '25')
  nb = nbformat.read(os.path.join(ROOT, 'notebooks', 'quickstart.ipynb'), 4)
  NotebookClient(nb, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': str(tmp_path)}}).execute()
  cell = {name: next(c for c in nb.cells if c.cell_type == 'code'
                     and marker in c.source)
          for name, marker in (('install', 'REPO_DIR'),
                               ('accuracy', 'final_accuracy'),
                               ('cost', 'device_peak_bytes'))}
  assert 'fedjax_eff 0.1.0' in ''.join(
      o.get('text', '') for o in cell['install'].outputs)
  assert float(_result(cell['accuracy'])) > 0.5  # 25 rounds; chance is 0.1
  assert _has_image(cell['accuracy'])
  # Upload relative to the full fp32 model: 1 for it, ~4x less for 8 bits,
  # less for the partial model.
  ratios = ast.literal_eval(_result(cell["cost"]))
  assert ratios['full model, fp32 (this run)'] == 1.0
  assert 3.5 < ratios['8-bit quantized upload'] < 4.1
  assert ratios['train dense1 + head only'] > 1.2
  assert _has_image(cell['cost'])
