"""The typed model-technique contract (`fedjax_eff.models.structure`):
forward plans merge with an error on conflicting keys, models declare the
forward keys their `__call__` takes, and models import nothing from
techniques."""

import ast
import copy
import importlib
import inspect
import pathlib
import pickle
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_eff import models
from fedjax_eff.models import structure
from fedjax_eff.models.structure import (ForwardPlan, check_forward,
                                         forward_keys, merge_forward,
                                         supported_forward)

MODELS_DIR = pathlib.Path(models.__file__).parent


def test_plan_is_an_immutable_mapping():
  p = ForwardPlan(depth=2, stop_below=None)
  assert p == {'depth': 2, 'stop_below': None}
  assert dict(p) == {'depth': 2, 'stop_below': None}
  assert sorted(p) == ['depth', 'stop_below'] and len(p) == 2
  assert (lambda **kw: kw)(**p) == {'depth': 2, 'stop_below': None}
  with pytest.raises(TypeError):
    p['depth'] = 3  # pylint: disable=unsupported-assignment-operation
  with pytest.raises(AttributeError):
    p.depth = 3
  assert p.without('stop_below') == {'depth': 2}
  assert 'depth=2' in repr(p)
  assert copy.deepcopy(p) == p and pickle.loads(pickle.dumps(p)) == p


def test_merge_disjoint_and_equal_values():
  a = ForwardPlan(depth=2, widths=(('dense0', 4),))
  b = {'layer_gates': np.array([True, False]), 'depth': 2}
  merged = a | b
  assert isinstance(merged, ForwardPlan)
  assert set(merged) == {'depth', 'widths', 'layer_gates'}
  assert merged['depth'] == 2
  # Equal values of other kinds: tuples, None, concrete arrays.
  assert (ForwardPlan(widths=(('a', 1),)) | {'widths': (('a', 1),)}) == {
      'widths': (('a', 1),)}
  assert (ForwardPlan(stop_below=None) | ForwardPlan(stop_below=None)) == {
      'stop_below': None}
  g = np.array([True, False, True])
  merged = ForwardPlan(layer_gates=g) | ForwardPlan(layer_gates=g.copy())
  np.testing.assert_array_equal(merged['layer_gates'], g)
  merged = ForwardPlan(layer_gates=jnp.asarray(g)) | {'layer_gates': g}
  np.testing.assert_array_equal(merged['layer_gates'], g)
  # dict | plan works too, and merge_forward returns a plain dict.
  assert ({'task': 1} | ForwardPlan(depth=3)) == {'task': 1, 'depth': 3}
  out = merge_forward([{'depth': 2}, None, ForwardPlan(depth=2, task=0), {}])
  assert type(out) is dict and out == {'depth': 2, 'task': 0}
  assert merge_forward([]) == {}


@pytest.mark.parametrize('a, b', [
    (2, 3), (None, 2), ((('dense0', 4),), (('dense0', 5),)),
    (np.array([True, False]), np.array([True, True])),
    (np.array([1.0, 0.0]), np.array([1.0, 0.0, 0.0]))])
def test_conflicting_values_raise_naming_the_key(a, b):
  with pytest.raises(ValueError, match="'stop_below'"):
    ForwardPlan(stop_below=a) | ForwardPlan(stop_below=b)
  with pytest.raises(ValueError, match="'stop_below'.*'last_2'.*'partial'"):
    merge_forward([{'depth': 1}, {'stop_below': a}, {'stop_below': b}],
                  names=['layerwise', 'last_2', 'partial'])


def test_traced_values_merge_only_with_themselves():
  def f(g1, g2):
    same = merge_forward([{'layer_gates': g1}, {'layer_gates': g1}])
    assert same['layer_gates'] is g1
    with pytest.raises(ValueError, match="'layer_gates'"):
      merge_forward([{'layer_gates': g1}, {'layer_gates': g2}])
    return g1
  jax.jit(f)(jnp.ones(3, bool), jnp.ones(3, bool))


def test_model_rejects_an_unknown_key():
  mlp = models.get_model('mlp', 5, hidden=(8,))
  check_forward(mlp, ForwardPlan(widths=(('dense0', 4),)))
  with pytest.raises(ValueError, match=r"MLP.*\['depth'\]"):
    check_forward(mlp, ForwardPlan(depth=1, widths=()))
  with pytest.raises(ValueError, match='stop_below'):
    merge_forward([{'stop_below': 1}], model=mlp)
  logreg = models.get_model('logreg', 5)
  with pytest.raises(ValueError, match='widths'):
    check_forward(logreg, {'widths': ()})
  vit = models.get_model('vit', 10)
  with pytest.raises(ValueError, match='stop_gradient'):
    check_forward(vit, {'depth': 1, 'stop_gradient': 1})
  # An optional saving is dropped where the model lacks it (last_n and
  # partial_training's `stop_below` on the small classifiers), None too.
  assert supported_forward(mlp, stop_below=1, widths=None) == {}
  assert supported_forward(vit, stop_below=1, depth=None) == {'stop_below': 1}


def _forward_params(cls) -> set[str]:
  """`__call__`'s parameters besides self, the input and `train`."""
  params = list(inspect.signature(cls.__call__).parameters)
  return set(params[2:]) - {'train'}


def _model_classes():
  """Every top-level model: the registry, plus any class in
  fedjax_eff.models that declares FORWARD_KEYS (its own or inherited) and
  has a `__call__` (abstract bases like `_LayerStack` have none)."""
  found = set(models.MODELS.values())
  for info in pkgutil.iter_modules([str(MODELS_DIR)]):
    mod = importlib.import_module(f'fedjax_eff.models.{info.name}')
    for obj in vars(mod).values():
      if (inspect.isclass(obj) and hasattr(obj, 'FORWARD_KEYS')
          and any('__call__' in vars(c) for c in obj.__mro__[:-1])):
        found.add(obj)
  return sorted(found, key=lambda c: c.__name__)


@pytest.mark.parametrize('cls', _model_classes(), ids=lambda c: c.__name__)
def test_every_model_declares_its_forward_keys(cls):
  """Fails when someone adds a kwarg to a model's `__call__` without
  declaring it in FORWARD_KEYS (or declares one `__call__` lacks)."""
  assert hasattr(cls, 'FORWARD_KEYS'), cls
  keys = cls.FORWARD_KEYS
  assert isinstance(keys, tuple) and len(set(keys)) == len(keys)
  assert set(keys) == _forward_params(cls), cls.__name__


def test_registry_models_forward_keys():
  expect = {'logreg': set(), 'mlp': {'widths'}, 'cnn': {'widths'},
            'lstm_lm': {'stop_below', 'features', 'widths'}}
  stack = {'depth', 'layer_gates', 'stop_below', 'features',
           'layer_drop_rate', 'task', 'widths'}
  # LMs whose output layer may be the token embedding: `train_output`.
  expect.update({n: stack | {'train_output'}
                 for n in ('transformer', 'conformer_lm')})
  for name, cls in models.MODELS.items():
    assert set(cls.FORWARD_KEYS) == expect.get(name, stack), name


def test_an_undeclared_model_accepts_no_keys():
  class Bare:
    def __call__(self, x, train=False, depth=None):
      return x
  assert forward_keys(Bare()) == frozenset()
  with pytest.raises(ValueError, match='depth'):
    check_forward(Bare(), {'depth': 1})


def test_models_import_nothing_from_techniques_or_core():
  for path in MODELS_DIR.glob('*.py'):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module]
      for n in names:
        assert not n.startswith(('fedjax_eff.techniques', 'fedjax_eff.core',
                                 'fedjax_eff.experiment')), (path.name, n)


def test_types_live_with_the_models_and_old_imports_work():
  from fedjax_eff.techniques import federated_dropout as fd
  from fedjax_eff.techniques import structure as tstructure
  assert fd.WidthGroup is structure.WidthGroup
  assert tstructure.LayerStructure is structure.LayerStructure
  assert tstructure.structure_of is structure.structure_of
  for name in ('mlp', 'cnn', 'transformer', 'lstm_lm'):
    m = models.get_model(name, 10)
    assert all(isinstance(g, structure.WidthGroup) for g in m.width_groups)


def test_techniques_forward_plans_fit_their_models():
  """The plans the techniques build are ForwardPlans the model accepts."""
  from fedjax_eff.techniques import federated_dropout as fd
  from fedjax_eff.techniques import last_n, partial
  mlp = models.get_model('mlp', 5, hidden=(8, 4))
  params = mlp.init(jax.random.key(0), jnp.zeros((1, 6)))['params']
  t = fd.federated_dropout(mlp, params, rate=0.5)
  plan = t.forward(None)
  assert isinstance(plan, ForwardPlan)
  check_forward(mlp, plan)
  _, sub_plan = fd.submodel(mlp, params, 0.5)
  check_forward(mlp, sub_plan)
  # stop_below is dropped for the MLP, kept for the ViT.
  assert last_n.last_n(mlp, 1).specialize(None, 0).forward(None) == {}
  vit = models.get_model('vit', 10, num_layers=3)
  plan = partial.partial_training(vit, layers=(2,)).forward(None)
  assert plan == {'stop_below': 2}
  check_forward(vit, plan)
