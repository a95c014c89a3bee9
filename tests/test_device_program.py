"""The device program is what a device runs (issue 15, item 1).

`accounting.client_cost` compiles `build_device_program`: the downloaded
view and the client's batches in, only the packed upload out (and the
client state it keeps, in place). Checked here:

1. `codecs.pack_bits` writes the little-endian bit stream NumPy's
   `packbits` writes, and `unpack_bits` reads it back;
2. for every registered technique and pair of the contract suite, every
   device tier: the compiled program's output bytes (less XLA's output
   tuple table and the client state) equal the upload: Σ over the
   message's Wires of ceil(count x bits / 8), plus the fp32 feedback;
3. the program's model argument is the view the device downloads
   (federated dropout: the sub-model), not the server model;
4. depth dropout is charged for the gates each client drew: FLOPs fall by
   the same amount for every layer skipped, the round reports each
   client's skipped layers, and the per-round metric is the mean of the
   drawn programs' costs.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_eff import accounting, core
from fedjax_eff.accounting import program as program_lib
from fedjax_eff.core import codecs
from fedjax_eff.core import technique as technique_lib
from fedjax_eff.data import pack
from fedjax_eff.experiment.build import Experiment
from fedjax_eff.models import get_model
from fedjax_eff.techniques import layerwise as lw
from tests import helpers
from tests.test_contract import CASES, MODELS, technique_of

pytestmark = pytest.mark.usefixtures('fast_compiles')

BATCH = {'x': jax.ShapeDtypeStruct((4, 6, 6, 1), jnp.float32),
         'y': jax.ShapeDtypeStruct((4,), jnp.int32)}


@pytest.mark.parametrize('bits', [1, 3, 4, 7, 8, 9, 12, 16, 17, 32])
def test_pack_bits_is_the_little_endian_bit_stream(bits):
  rng = np.random.default_rng(bits)
  dtype = np.uint8 if bits <= 8 else (np.uint16 if bits <= 16 else np.uint32)
  for n in (1, 31, 33, 257):
    x = rng.integers(0, 2 ** bits, n, dtype=np.uint64).astype(dtype)
    stream = np.asarray(jax.jit(codecs.pack_bits, static_argnums=1)(
        jnp.asarray(x), bits))
    bit_array = (x.astype(np.uint64)[:, None] >> np.arange(
        bits, dtype=np.uint64)) & 1
    expected = np.packbits(bit_array.astype(np.uint8).reshape(-1),
                           bitorder='little')
    assert stream.dtype == np.uint8 and stream.shape == (-(-n * bits // 8),)
    np.testing.assert_array_equal(stream, expected)
    np.testing.assert_array_equal(
        np.asarray(codecs.unpack_bits(jnp.asarray(stream), bits, n, dtype)),
        x)
  with pytest.raises(ValueError, match='cannot travel at 8 bits'):
    codecs.pack_bits(jnp.zeros(3, jnp.float32), 8)


def _setup(name):
  spec = CASES[name]
  model, params, tech = technique_of(spec)
  stage = tech.stage(0) if tech.stage else None
  programs = [technique_lib.device_program(
      tech.specialize(stage, t) if tech.specialize else tech)
              for t in range(spec.tiers)]
  return model, params, programs


def _wire_bytes(tech, params, ctx) -> int:
  """Σ ceil(count x bits / 8) over the sent Wires of `tech`'s message, and
  the fp32 feedback: what the device uploads, in whole bytes per Wire."""
  found = {}

  def probe(server_params):
    c = technique_lib.with_initial_state(tech, server_params, ctx)
    if tech.chunk_plan:
      c = dict(c, chunk=tech.chunk_plan(jax.random.key(1), jnp.int32(0)))
    plan = tech.plan(jax.random.key(0), jnp.int32(0), c)
    view = tech.view(server_params, plan)
    msg = technique_lib.encode_upload(
        tech, jax.tree.map(jnp.zeros_like, view), tech.trainable(view, plan),
        plan, jax.random.key(2))
    wires = [w for w in jax.tree.leaves(
        msg, is_leaf=lambda x: isinstance(x, codecs.Wire))
             if isinstance(w, codecs.Wire) and w.sent]
    found['bytes'] = sum(-(-int(w.num_bits()) // 8) for w in wires)
    found['wires'] = len(wires)
    return 0
  jax.eval_shape(probe, params)
  feedback = 0
  if technique_lib.stateful(tech):
    feedback = accounting.tree_bytes(
        jax.eval_shape(tech.init, params).feedback)
  return found['bytes'] + feedback, found['wires']


@pytest.mark.parametrize('name', sorted(CASES))
def test_device_program_outputs_exactly_the_upload(name):
  model, params, programs = _setup(name)
  for tier, program in enumerate(programs):
    tech = technique_lib.chain(program)
    ctx = {'client_index': np.int32(0), 'tier': np.int32(tier)}
    cost = accounting.client_cost(model, core.classification(), program,
                                  optax.adam(0.1), params, BATCH, 2, ctx,
                                  analytic=False)
    expected, wires = _wire_bytes(tech, params, ctx)
    assert cost.sent_bytes == expected, (name, tier)
    # Whole bytes per Wire: within a byte per Wire of the exact bits.
    assert 0 <= 8 * cost.sent_bytes - cost.upload_bits < 8 * max(wires, 1)


def test_device_program_takes_the_downloaded_view():
  """Federated dropout's device gets its sub-model: the program's model
  argument is that view, the size of what travels down, smaller than the
  server model; a full-model technique's is the server model."""
  for name in ('federated_dropout', 'identity'):
    model, params, programs = _setup(name)
    for tier, program in enumerate(programs):
      tech = technique_lib.chain(program)
      ctx = {'client_index': np.int32(0), 'tier': np.int32(tier)}
      view = program_lib.device_arguments(tech, params, BATCH, 2, ctx)[0]
      down = technique_lib.trace_plan(tech, params, ctx)['download_bits']
      assert accounting.tree_bytes(view) * 8 == down
      if name == 'federated_dropout':
        assert accounting.tree_bytes(view) < accounting.tree_bytes(params)
      else:
        assert accounting.tree_bytes(view) == accounting.tree_bytes(params)


@pytest.fixture(scope='module')
def depth_dropout():
  """A 3-layer tiny ViT at its last layer-wise stage (2 frozen layers
  below the active one), depth dropout p = 0.5 per client."""
  m = get_model('vit', 5, **dict(MODELS['vit'][1], num_layers=3))
  params = jax.jit(m.init)(jax.random.key(0),
                           np.zeros((1, 6, 6, 1), np.float32))['params']
  sched = lw.LayerSchedule.make(3, 1)
  tech = core.chain(lw.layerwise(m, sched),
                    lw.depth_dropout(m, sched, 0.5, 'client'))
  return m, params, tech, tech.stage(2)


def test_depth_dropout_flops_fall_by_one_layer_per_layer_skipped(
    depth_dropout):
  m, params, tech, stage = depth_dropout
  program = tech.specialize(stage, 0)
  flops = [accounting.client_cost(
      m, core.classification(), technique_lib.device_program(program, k),
      optax.sgd(0.1), params, BATCH, 2, analytic=False).flops_per_round
           for k in range(3)]
  saved = np.diff(flops)
  assert (saved < 0).all(), flops
  np.testing.assert_allclose(saved[0], saved[1], rtol=0.01)


def test_depth_dropout_round_reports_the_gates_drawn(depth_dropout):
  m, params, tech, stage = depth_dropout
  data = helpers.ragged_clients()
  ids = np.arange(data.num_clients)
  cohort = pack(data, np.concatenate([ids] * 9), steps=1, batch_size=4,
                seed=0, round_num=2)
  fns = core.build_round(**helpers.round_kw(m, tech), chunk_size=1,
                         donate=False)
  _, metrics = fns.round_step(fns.init(params), cohort, jax.random.key(3),
                              round_num=2)
  skipped = np.asarray(metrics.client_variant)
  k = len(ids) * 9
  assert skipped.shape == (k,) and set(skipped) <= {0, 1, 2}
  # Binomial(2, 0.5) per client: mean 1, sd of the mean 0.71 / sqrt(63).
  assert abs(skipped.mean() - 1.0) < 4 * 0.71 / np.sqrt(k)

  # Each client is charged its own program: the per-round FLOPs are the
  # mean over clients of the FLOPs of the program that skips its layers.
  costs = {v: types.SimpleNamespace(peak_bytes=100 + v,
                                    training_state_bytes=10 + v,
                                    flops_per_round=1000.0 * (3 - v))
           for v in range(3)}
  exp = types.SimpleNamespace(
      num_tiers=1, config=types.SimpleNamespace(accounting=True),
      program_cost=lambda r, t, v=None: costs[int(v)])
  out = Experiment.device_metrics(exp, 2, np.zeros(k, int), metrics)
  assert out['device_flops_per_round'] == pytest.approx(
      np.mean([1000.0 * (3 - v) for v in skipped]))
  assert out['device_peak_bytes'] == pytest.approx(100 + skipped.mean())
  assert out['device_training_state_bytes'] == pytest.approx(
      10 + skipped.mean())
