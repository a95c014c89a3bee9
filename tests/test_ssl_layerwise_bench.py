"""benchmarks/ssl_layerwise.py --quick end to end on a tiny Fashion-MNIST
written here (IDX files in tmp: no download, no Debian package needed):
every arm trains, is probed and costed, and the JSON holds the headline
figures with sane values."""

import importlib.util
import json
import os

import pytest

from tests import helpers

pytestmark = pytest.mark.usefixtures('fast_compiles')


def _load():
  return helpers.load_benchmark('ssl_layerwise')


def _tiny_fashion(directory):
  helpers.tiny_fashion_mnist(directory, n_train=160)


def test_quick_run_writes_the_headline(tmp_path):
  bench = _load()
  data = tmp_path / 'fashion'
  data.mkdir()
  _tiny_fashion(str(data))
  # Two arms (end to end and layer-wise + depth dropout, which runs
  # layer-wise's stages and adds the variants): each compiles its own
  # programs, the cost of this test.
  out = bench.main(['--quick', '--data_dir', str(data),
                    '--workdir', str(tmp_path / 'work'),
                    '--arms', 'end_to_end,layerwise_dd'])
  path = tmp_path / 'work' / 'ssl_layerwise_quick.json'
  with open(path) as f:
    saved = json.load(f)
  head = saved['headline']
  assert head == json.loads(json.dumps(out['headline']))
  assert set(head['arms']) == {'end_to_end', 'layerwise_dd'}
  for arm, a in head['arms'].items():
    assert 0.0 <= a['probe_accuracy']['mean'] <= 1.0
    assert len(a['probe_accuracy_per_seed']) == len(head['seeds'])
    assert a['peak_mb'] > 0 and a['training_state_mb'] > 0
    assert a['upload_mbit'] > 0 and a['download_mbit'] > 0
  e2e = head['arms']['end_to_end']
  assert e2e['peak_memory_ratio'] == pytest.approx(1.0)
  a = head['arms']['layerwise_dd']
  # One block of two trained at a time: less memory, less upload.
  assert a['peak_memory_ratio'] > 1.0
  assert a['training_state_ratio'] > 1.0
  assert a['upload_mbit'] < e2e['upload_mbit']
  # Every variant measured on its own: the stage with a frozen block has
  # the program that skips it (cheaper than the one that runs it), and the
  # mean over draws lies below the largest program.
  programs = saved['costs']['layerwise_dd']['programs']
  assert [p['variant'] for p in programs] == [0, 0, 1]
  assert programs[2]['device_flops_per_round'] < programs[1][
      'device_flops_per_round']
  assert sum(p['share'] for p in programs) == pytest.approx(1.0)
  dd = saved['summary']['arms']['layerwise_dd']
  assert dd['mean_peak_bytes'] <= dd['peak_bytes']
  base = head['baselines']
  assert 0.0 <= base['raw_pixels'] <= 1.0
  assert 0.0 <= base['random_init']['mean'] <= 1.0
  assert set(head['goal']['holds']) == {'layerwise_dd'}
  assert os.path.exists(tmp_path / 'work' / 'ssl_layerwise_quick.png') or \
      importlib.util.find_spec('matplotlib') is None
