"""Central pretraining, then federated training from its checkpoint."""

import pytest

from fedjax_eff.experiment import train_and_evaluate
from fedjax_eff.experiment.pretrain import load_params, pretrain
from fedjax_eff.experiment.train import Experiment, params_sha256
from tests.test_experiment import override, tiny_config


def pre_config(**overrides):
  c = tiny_config()
  c.pretrain.update(steps=40, batch_size=32, learning_rate=3e-3,
                    log_every=10, checkpoint_every=10)
  return override(c, **overrides)


def test_pretrain_then_federated_from_its_params(tmp_path):
  wd = str(tmp_path / 'pre')
  c = pre_config()
  init = Experiment(c).eval_metrics(Experiment(c).init_params, 0)
  summary = pretrain(c, wd)
  assert summary['test_accuracy'] > init['test_accuracy'] + 0.2
  fed = pre_config(num_rounds=1, init_checkpoint=wd,
                   **{'client.learning_rate': 1e-6})
  exp = Experiment(fed)
  assert params_sha256(exp.init_params) == params_sha256(
      load_params(wd, exp.init_params))
  out = train_and_evaluate(fed, str(tmp_path / 'fed'))
  assert abs(out['final_metrics']['test_accuracy']
             - summary['test_accuracy']) < 0.02


def test_pretrain_resumes_to_the_same_params(tmp_path):
  pretrain(pre_config(), str(tmp_path / 'a'))
  pretrain(pre_config(**{'pretrain.steps': 20}), str(tmp_path / 'b'))
  resumed = pretrain(pre_config(), str(tmp_path / 'b'))
  assert resumed['resumed_from_step'] == 20
  like = Experiment(pre_config()).init_params
  assert params_sha256(load_params(str(tmp_path / 'a'), like)) == (
      params_sha256(load_params(str(tmp_path / 'b'), like)))


def test_init_checkpoint_errors_name_the_key(tmp_path):
  with pytest.raises(ValueError, match='init_checkpoint.*does not exist'):
    Experiment(pre_config(init_checkpoint=str(tmp_path / 'nowhere')))
  wd = str(tmp_path / 'pre')
  pretrain(pre_config(**{'pretrain.steps': 2}), wd)
  with pytest.raises(ValueError, match='init_checkpoint'):
    Experiment(pre_config(init_checkpoint=wd,
                          **{'model.kwargs.hidden': (8,)}))
