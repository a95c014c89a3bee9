"""Device accounting: compiled memory/FLOPs, the analytic breakdown, bits.

The model is a plain 8-layer MLP (512 wide, batch 1024): large enough that
XLA's buffer sizes are not dominated by alignment padding, small enough to
compile in well under a second. Everything is accounted from
ShapeDtypeStructs; nothing runs.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_eff import accounting, core
from fedjax_eff.accounting import compiled as compiled_lib
from fedjax_eff.models import get_model

WIDTH, DEPTH, BATCH, CLASSES = 512, 8, 1024, 10
LAST = f'dense_{DEPTH - 1}'
F32 = jnp.float32


def sds(shape, dtype=F32):
  return jax.ShapeDtypeStruct(shape, dtype)


def mlp_params():
  params = {}
  for i in range(DEPTH):
    out = CLASSES if i == DEPTH - 1 else WIDTH
    params[f'dense_{i}'] = {'w': sds((WIDTH, out)), 'b': sds((out,))}
  return params


def loss_fn(params, x, y):
  for i in range(DEPTH):
    layer = params[f'dense_{i}']
    x = x @ layer['w'] + layer['b']
    if i < DEPTH - 1:
      x = jax.nn.relu(x)
  return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


def sgd_step(params, x, y, trained=None):
  """One SGD step; `trained`: the layer names differentiated (None: all)."""
  if trained is None:
    grads = jax.grad(loss_fn)(params, x, y)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  sub = {k: params[k] for k in trained}
  grads = jax.grad(lambda s: loss_fn({**params, **s}, x, y))(sub)
  return jax.tree.map(lambda p, g: p - 0.1 * g, sub, grads)


def batch(steps=None):
  lead = () if steps is None else (steps,)
  return sds(lead + (BATCH, WIDTH)), sds(lead + (BATCH,), jnp.int32)


def layer_mask(trained):
  return {k: k in trained for k in mlp_params()}


@pytest.fixture(scope='module')
def full_and_last():
  x, y = batch()
  full = accounting.measure(sgd_step, mlp_params(), x, y)
  last = accounting.measure(lambda p, x, y: sgd_step(p, x, y, [LAST]),
                            mlp_params(), x, y)
  return full, last


def test_last_layer_training_needs_far_less_memory_and_compute(full_and_last):
  full, last = full_and_last
  # Same inputs (the whole model and the batch) ...
  assert full.argument_bytes == last.argument_bytes == (
      accounting.tree_bytes(mlp_params()) + accounting.tree_bytes(batch()))
  # ... but no backward pass below the last layer: no saved activations and
  # no gradients for 7 of 8 layers (measured on CPU: temp 28 MiB vs 4 MiB,
  # peak 44 MiB vs 13 MiB, 10.8 vs 3.8 GFLOP).
  assert last.temp_bytes < 0.5 * full.temp_bytes
  assert last.peak_bytes < 0.5 * full.peak_bytes
  assert last.flops < 0.5 * full.flops
  # The forward pass alone is a floor for both: 2 * B * (fan-in x fan-out).
  forward = 2 * BATCH * WIDTH * (WIDTH * (DEPTH - 1) + CLASSES)
  assert forward <= last.flops < 1.1 * forward
  assert full.flops > 2.5 * forward


def test_peak_is_arguments_plus_outputs_plus_temp_minus_alias(full_and_last):
  for c in full_and_last:
    assert c.peak_bytes == (c.argument_bytes + c.output_bytes + c.temp_bytes
                            - c.alias_bytes)
    assert c.alias_bytes == 0  # nothing donated
  # A jitted function keeps its own options: donating the parameters lets
  # the new parameters overwrite them in place.
  x, y = batch()
  donated = accounting.measure(jax.jit(sgd_step, donate_argnums=0),
                               mlp_params(), x, y)
  params_bytes = accounting.tree_bytes(mlp_params())
  assert donated.alias_bytes == params_bytes
  assert donated.peak_bytes == (donated.argument_bytes + donated.output_bytes
                                + donated.temp_bytes - params_bytes)


def local_training(params, xs, ys):
  """S local SGD steps as a scan, like `core.round`'s client update."""
  def step(p, xy):
    return sgd_step(p, *xy), None
  return jax.lax.scan(step, params, (xs, ys))[0]


def test_scan_flops_count_every_step():
  one = accounting.measure(local_training, mlp_params(), *batch(steps=1))
  four = accounting.measure(local_training, mlp_params(), *batch(steps=4))
  # XLA's own count sees the loop body once (verified on CPU, JAX 0.10.2);
  # if this starts failing XLA learned trip counts, and the unrolled twin
  # is no longer needed (but still correct).
  assert four.xla_flops < 1.01 * one.xla_flops
  # The unrolled twin counts every step.
  assert four.flops == pytest.approx(4 * one.flops, rel=0.05)
  assert one.flops == pytest.approx(one.xla_flops, rel=0.01)
  assert one.loops_counted_once == four.loops_counted_once == 0
  # Without the correction, flops is XLA's raw count.
  raw = accounting.measure(local_training, mlp_params(), *batch(steps=4),
                           unroll_scans=False)
  assert raw.flops == raw.xla_flops == four.xla_flops


def test_while_loops_are_reported_not_unrolled():
  def f(x):
    return jax.lax.while_loop(lambda c: c[0] < 3,
                              lambda c: (c[0] + 1, c[1] @ c[1]), (0, x))[1]
  cost = accounting.measure(f, sds((256, 256)))
  assert cost.loops_counted_once == 1
  assert cost.flops == cost.xla_flops  # nothing to unroll


def test_analytic_breakdown():
  params = mlp_params()
  x, y = batch()
  total = accounting.tree_bytes(params)
  last_bytes = accounting.tree_bytes(params[LAST])
  act_bytes = BATCH * WIDTH * 4  # one [B, 512] float32 activation

  full = accounting.analytic_cost(loss_fn, params, None, optax.adam(1e-3),
                                  x, y)
  last = accounting.analytic_cost(loss_fn, params, layer_mask([LAST]),
                                  optax.adam(1e-3), x, y)
  for cost in (full, last):
    assert cost.weights_bytes == total
    assert cost.data_bytes == accounting.tree_bytes((x, y))
    assert cost.total_bytes == sum(cost[:5])
  assert full.gradient_bytes == total
  assert last.gradient_bytes == last_bytes
  # Adam: two moments per trainable value, plus an int32 step counter.
  assert full.optimizer_state_bytes == 2 * total + 4
  assert last.optimizer_state_bytes == 2 * last_bytes + 4
  # Full training saves, per hidden layer, its input (f32) and its ReLU mask
  # (bool); the last layer alone only its input (17.5 MiB vs 2.05 MiB).
  assert full.activation_bytes >= 7 * (act_bytes + act_bytes // 4)
  assert act_bytes <= last.activation_bytes < 1.1 * act_bytes
  assert last.activation_bytes < 0.2 * full.activation_bytes

  # Training the first layer alone still backpropagates through the frozen
  # layers above it. That needs their weights and ReLU masks but not their
  # inputs (no weight gradient): 7 bool masks, 3.5 MiB.
  first = accounting.analytic_cost(loss_fn, params, layer_mask(['dense_0']),
                                   optax.sgd(0.1), x, y)
  masks = 7 * act_bytes // 4
  assert masks <= first.activation_bytes < masks + 0.1 * act_bytes
  assert first.optimizer_state_bytes == 0  # plain SGD keeps no state
  assert first.gradient_bytes == accounting.tree_bytes(params['dense_0'])


def test_analytic_masks():
  params = mlp_params()
  x, y = batch()
  # A prefix mask, a per-leaf mask and 0/1 ints agree.
  per_leaf = {k: {'w': k == LAST, 'b': k == LAST} for k in params}
  as_ints = {k: int(k == LAST) for k in params}
  costs = [accounting.analytic_cost(loss_fn, params, m, optax.sgd(0.1), x, y)
           for m in (layer_mask([LAST]), per_leaf, as_ints)]
  assert costs[0] == costs[1] == costs[2]
  # Nothing trainable: nothing but weights and data.
  frozen = accounting.analytic_cost(loss_fn, params, False, optax.adam(1e-3),
                                    x, y)
  assert frozen[1:4] == (0, 0, 0)
  # has_aux: only the loss is differentiated.
  def with_aux(p, x, y):
    return loss_fn(p, x, y), {'n': x.shape[0]}
  aux = accounting.analytic_cost(with_aux, params, layer_mask([LAST]),
                                 optax.sgd(0.1), x, y, has_aux=True)
  assert aux == costs[0]


def test_leaf_bits_counts_exactly():
  tree = {'a': np.zeros((3, 5), np.float32), 'b': sds((7,), jnp.bfloat16),
          'c': {'d': np.zeros((2, 2), np.int8), 'e': 1.0}}
  assert accounting.leaf_bits(tree) == 32 * (15 + 7 + 4 + 1)
  assert accounting.leaf_bits(tree, bits_per_value=None) == (
      15 * 32 + 7 * 16 + 4 * 8 + 32)
  mask = {'a': True, 'b': False, 'c': {'d': 1, 'e': 0}}
  assert accounting.leaf_bits(tree, mask) == 32 * (15 + 4)
  assert accounting.leaf_bits(tree, mask, bits_per_value=1) == 19
  # A prefix mask covers a whole subtree.
  assert accounting.leaf_bits(tree, {'a': False, 'b': False, 'c': True},
                              bits_per_value=8) == 8 * 5
  # An array mask counts the values it selects (broadcast to the leaf).
  row = np.array([[1], [0], [1]])
  assert accounting.leaf_bits({'a': tree['a']}, {'a': row}) == 32 * 10
  # Exact beyond 2**53: a (2**31) x (2**31) float32 leaf.
  huge = sds((2**31, 2**31))
  assert accounting.leaf_bits(huge) == 32 * 2**62
  assert accounting.bits_to_bytes(32 * 2**62) == 2**64
  assert [accounting.bits_to_bytes(b) for b in (0, 1, 8, 9)] == [0, 1, 1, 2]
  assert accounting.tree_bytes(tree) == 60 + 14 + 4 + 4


def test_leaf_bits_rejects_traced_masks():
  with pytest.raises(TypeError, match='concrete mask'):
    jax.jit(lambda m: accounting.leaf_bits(np.zeros(3), m))(np.ones(3))


def test_shape_dtype_structs_allocate_nothing():
  # 64 GiB in and out: more than this machine has, so this only works if
  # nothing is allocated or run.
  before = len(jax.live_arrays())
  x = sds((2**17, 2**17))
  cost = accounting.measure(lambda x: jnp.tanh(x) * 2.0, x)
  assert cost.argument_bytes == cost.output_bytes == 2**36
  assert cost.flops >= 2**34
  assert len(jax.live_arrays()) == before


def test_backends_without_analyses():
  class NoAnalyses:
    def cost_analysis(self):
      raise NotImplementedError

    def memory_analysis(self):
      return None

  class ListCost:
    def cost_analysis(self):  # the pre-0.4.30 form: one dict per module
      return [{'flops': 3.0}, {'flops': 4.0, 'bytes accessed': 1.0}, {}]

  assert compiled_lib.compiled_flops(NoAnalyses()) is None
  assert compiled_lib._memory(NoAnalyses()) == (None,) * 6
  assert compiled_lib.compiled_flops(ListCost()) == 7.0
  cost = accounting.DeviceCost(None, None, 10, 20)
  assert cost.as_dict() == {
      'device_peak_bytes': None, 'device_flops_per_round': None,
      'upload_bits': 10, 'download_bits': 20, 'analytic_weights_bytes': None,
      'analytic_gradient_bytes': None, 'analytic_optimizer_bytes': None,
      'analytic_activation_bytes': None, 'device_sent_bytes': None,
      'training_state_bytes': None}


def test_device_cost_of_the_simulators_client_update():
  """The real single-client update, steps S=1 and S=4, from shapes only."""
  model = get_model('mlp', 5)  # the CNN's convolutions compile 3x slower
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jnp.zeros((1, 6, 6, 1)))
  params = variables['params']
  update = core.build_client_update(model, core.classification(),
                                    core.identity(), optax.sgd(0.1))
  key = jax.random.key(0)

  def client_args(steps, batch=16):
    return (params,
            {'x': sds((steps, batch, 6, 6, 1)),
             'y': sds((steps, batch), jnp.int32)},
            sds((steps, batch)), {'client_index': sds((), jnp.int32)},
            sds(key.shape, key.dtype), sds((), jnp.int32))

  bits = accounting.leaf_bits(params)
  # One step has no loop to correct: skip the unrolled twin's compile.
  costs = {s: accounting.device_cost(update, *client_args(s),
                                     upload_bits=bits, download_bits=bits,
                                     unroll_scans=False)
           for s in (1, 4)}
  # S steps run in a loop of dynamic trip count (steps without examples
  # are skipped), whose body XLA counts once; the run's accounting is one
  # step's FLOPs times S (`client_cost`, the device program alone).
  assert costs[4].flops_per_round < 1.1 * costs[1].flops_per_round
  four = accounting.client_cost(
      model, core.classification(), core.identity(), optax.sgd(0.1), params,
      {'x': sds((16, 6, 6, 1)), 'y': sds((16,), jnp.int32)}, 4,
      analytic=False)
  # Per-step work dominates: 4 steps cost about 4 times 1 step.
  assert 3.5 < four.flops_per_round / costs[1].flops_per_round <= 4.0
  d = costs[4].as_dict()
  assert d['upload_bits'] == d['download_bits'] == bits
  assert d['device_peak_bytes'] > accounting.tree_bytes(params)
  json.dumps(d)
