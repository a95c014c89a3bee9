"""Small things of the command line: did-you-mean for a misspelt config key
or config file, and `--help` that keeps the usage text's line breaks."""

import os
import subprocess
import sys

from fedjax_eff.experiment import cli
from fedjax_eff.experiment import validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, 'launch', 'train.py')


def train(*args, cwd=ROOT):
  return subprocess.run([sys.executable, TRAIN, *args], cwd=cwd,
                        capture_output=True, text=True, timeout=120)


def error_line(r):
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith('error: ')
  return lines[0]


def test_misspelt_key_suggests_the_closest(tmp_path):
  r = train('--config=configs/default.py', f'--workdir={tmp_path / "w"}',
            '--config.client.lerning_rate=0.1')
  assert r.returncode == 2
  assert ('unknown config key config.client.lerning_rate (did you mean '
          'config.client.learning_rate?)') in error_line(r)
  assert not (tmp_path / 'w').exists()


def test_misspelt_config_file_suggests_the_closest(tmp_path):
  r = train('--config=configs/defualt.py', f'--workdir={tmp_path / "w"}')
  assert r.returncode == 2
  assert error_line(r) == ('error: --config=configs/defualt.py: no such '
                           'config file (did you mean '
                           '--config=configs/default.py?)')
  # A config of configs/lm/ named without its folder; the ':spec' is kept.
  r = train('--config=configs/stdlib.py:lstm', f'--workdir={tmp_path / "w"}')
  assert r.returncode == 2
  assert '(did you mean --config=configs/lm/stdlib.py:lstm?)' in error_line(r)


def test_help_keeps_the_usage_line_breaks():
  r = train('--help')  # absl's --help exits 1 after printing
  out = r.stdout + r.stderr
  assert ('--workdir=runs/default \\\n      [--config.num_rounds=50'
          in out), out[:600]


def test_suggestions_in_process():
  config = validation.dotted_keys({'client': {'learning_rate': 0.1},
                                   'techniques': [{'rounds_per_layer': 2}]})
  assert 'client.learning_rate' in config
  assert 'techniques[0].rounds_per_layer' in config
  assert validation.suggest('techniques[0].rounds_per_layr',
                            config) == 'techniques[0].rounds_per_layer'
  assert validation.suggest('zzz', config) is None
  path = os.path.join(ROOT, 'configs', 'default.py')
  assert validation.unknown_overrides(
      ['train', f'--config={path}', '--config.num_round=3',
       '--config.num_rounds=3', '--config.qqqqqq=1']) == [
           ('num_round', 'num_rounds'), ('qqqqqq', None)]
  assert cli.suggest_config_file('/nonexistent/dir/x.py') is None
  assert cli.suggest_config_file(
      os.path.join(ROOT, 'configs', 'fashion_mnst.py')) == os.path.join(
          ROOT, 'configs', 'fashion_mnist.py')


def test_multi_host_examples_parse_and_use_real_flags():
  """launch/slurm_example.sbatch and launch/tpu_vm_example.sh are valid
  bash and pass launch/train.py only flags it defines."""
  import re
  with open(TRAIN) as f:
    defined = set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", f.read()))
  assert {'distributed', 'coordinator_address', 'workdir'} <= defined
  for name in ('slurm_example.sbatch', 'tpu_vm_example.sh'):
    path = os.path.join(ROOT, 'launch', name)
    subprocess.run(['bash', '-n', path], check=True)
    with open(path) as f:
      text = f.read()
    call = text[text.rindex('launch/train.py'):]
    used = set(re.findall(r'--(\w+)[=\s]', call)) - {'config'}
    assert 'distributed' in used, name
    assert used <= defined, (name, used - defined)
    assert '--config.mesh_clients=-1' in call
