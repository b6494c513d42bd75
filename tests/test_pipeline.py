"""Pipeline parallelism (ar_jax/parallel/pipeline.py, through the shared layer stack) on 8
simulated devices, for every family: the pipelined train step against the unpipelined one,
where the stages' layers live, checkpoints across stage counts, and the configurations it
refuses."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from ar_jax import models, train
from ar_jax import run as run_lib
from ar_jax import state as state_lib
from ar_jax.errors import ConfigError
from ar_jax.parallel import pipeline
from ar_jax.workdir import checkpoint
from tests.helpers import family_config, one_step, write_corpus

FAMILIES = models.available()
WIDTH = 32  # every family's width fields (contract.Capabilities.width), for short compiles
# (mesh, pipeline_microbatches, pipeline_repeats, other config): GPipe over the issue's
# (stage, data) layouts and 1, 4 and 8 microbatches; the circular schedule; and the stages
# beside fsdp and tensor, with accumulation and remat; and in mixed precision.
CASES = {
  'stage4_data2_m4': ({'stage': 4, 'data': 2}, 4, 1, {}),
  'stage2_data4_m4_circular2': ({'stage': 2, 'data': 4}, 4, 2, {}),
  'stage4_data2_m1': ({'stage': 4, 'data': 2}, 1, 1, {}),
  'stage2_data4_m8': ({'stage': 2, 'data': 4}, 8, 1, {}),
  'stage8_m8': ({'stage': 8, 'data': 1}, 8, 1, {}),
  'stage4_data2_m4_circular2': ({'stage': 4, 'data': 2}, 4, 2, {}),
  'stage2_fsdp2_tensor2_accum2_remat': (
    {'stage': 2, 'data': 1, 'fsdp': 2, 'tensor': 2},
    2,
    1,
    {'grad_accum_steps': 2, 'model.remat': 'full'},
  ),
  'stage2_fsdp2_tensor2_m2_circular2': ({'stage': 2, 'data': 1, 'fsdp': 2, 'tensor': 2}, 2, 2, {}),
  'stage4_data2_m4_bf16': ({'stage': 4, 'data': 2}, 4, 1, {'model.dtype': 'bfloat16'}),
}
# Every family: both layouts, GPipe and circular; the transformer, every case.
PIPELINED = [(f, c) for f in FAMILIES for c in CASES if f == 'transformer' or c in list(CASES)[:2]]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp('corpus') / 'corpus.txt')


def depth(mesh=None, repeats=1) -> int:
  """Blocks in the stack: 4, or as many groups as the schedule needs."""
  return max(4, (mesh or {}).get('stage', 1) * repeats)


def config(corpus, family, mesh=None, microbatches=0, repeats=1, layers=0, **overrides):
  """The family's TINY model, WIDTH wide, with a scanned stack of `layers` blocks (default:
  depth(mesh, repeats))."""
  capabilities = models.capabilities(family)
  stack = {f'model.{capabilities.depth}': layers or depth(mesh, repeats), 'model.scan_layers': True}
  stack |= {f'model.{w}': WIDTH for w in capabilities.width}
  c = family_config(corpus, family, batch_size=32, **{**stack, **overrides})
  c.mesh.update({'data': 1, **(mesh or {})})
  c.pipeline_microbatches, c.pipeline_repeats = microbatches, repeats
  return c


_unpipelined: dict[tuple[str, str, int], tuple] = {}


def unpipelined(family, dtype, layers, corpus, tmp_path_factory):
  """(state after one step, its loss, the initial state) on one device, once per family,
  compute dtype and depth."""
  if (family, dtype, layers) not in _unpipelined:
    workdir = tmp_path_factory.mktemp(f'{family}_{dtype}_{layers}_unpipelined')
    cfg = config(corpus, family, layers=layers, **{'model.dtype': dtype})
    _unpipelined[family, dtype, layers] = one_step(cfg, workdir)
  return _unpipelined[family, dtype, layers]


def stacked(run) -> list[bool]:
  """For each parameter leaf, whether it is one of the stack's (leading axis 'layers')."""
  boxed = jax.eval_shape(run.model.init, jax.random.key(0), np.zeros((1, 4), np.int32))
  is_stacked = jax.tree.map(
    lambda x: isinstance(x, nn.Partitioned) and x.names[0] == 'layers',
    boxed['params'],
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )
  return jax.tree.leaves(is_stacked)


@pytest.mark.parametrize('family, case', PIPELINED)
def test_the_pipelined_step_equals_the_unpipelined_one(
  family, case, corpus, tmp_path, tmp_path_factory
):
  """And, on the first layout: the devices of stage s hold layer s of every stacked parameter
  (and of its optimizer moments) and nothing of the other stages' layers; the state saved
  under four stages restores unpipelined with identical values."""
  mesh, microbatches, repeats, overrides = CASES[case]
  dtype = overrides.get('model.dtype', 'float32')
  layers = depth(mesh, repeats)
  base, base_loss, initial = unpipelined(family, dtype, layers, corpus, tmp_path_factory)
  cfg = config(corpus, family, mesh, microbatches, repeats, **overrides)
  state, loss, _ = one_step(cfg, tmp_path, initial)
  assert loss == pytest.approx(base_loss, rel=1e-5)
  rtol = 1e-4 if cfg.grad_accum_steps > 1 else 2e-5
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-6), state.params, base.params
  )
  if case != 'stage4_data2_m4':
    return
  run = run_lib.setup(cfg, str(tmp_path))
  stage_of = {d: s for s, devices in enumerate(run.mesh.devices) for d in devices.flat}
  mu = state.opt_state[1][0].mu  # AdamW's first moments, after the gradient clip
  leaves = [
    x
    for tree in (state.params, mu)
    for x, is_stacked in zip(jax.tree.leaves(tree), stacked(run), strict=True)
    if is_stacked
  ]
  assert len(leaves) >= 4
  for x in leaves:
    for shard in x.addressable_shards:
      s = stage_of[shard.device]
      assert shard.index[0] == slice(s, s + 1), (x.shape, shard.index)

  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=1) as saver:
    saver.save(1, state, {'next_index': 1}, {})
  other = config(corpus, family, layers=layers)
  run = run_lib.setup(other, str(tmp_path))
  abstract, _ = state_lib.abstract_state(run.model, run.tx, run.mesh, other)
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=1) as reader:
    restored, _, _ = reader.restore(1, abstract)
  assert jax.tree.leaves(restored.params)[0].sharding.mesh.shape['stage'] == 1
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, restored.opt_state, state.opt_state)


def test_a_checkpoint_saved_unpipelined_restores_under_stages(corpus, tmp_path):
  state, _, _ = one_step(config(corpus, 'transformer'), tmp_path)
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=1) as saver:
    saver.save(1, state, {'next_index': 1}, {})
  other = config(corpus, 'transformer', {'stage': 4, 'data': 2})
  run = run_lib.setup(other, str(tmp_path))
  abstract, _ = state_lib.abstract_state(run.model, run.tx, run.mesh, other)
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=1) as reader:
    restored, _, _ = reader.restore(1, abstract)
  assert restored.params['blocks']['mlp_in']['kernel'].sharding.mesh.shape['stage'] == 4
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)


def test_compile_only_reports_each_stage(corpus, tmp_path):
  """Each stage's devices hold a quarter of the layers: less than half of what one device
  holds unpipelined (the embedding and head are on every stage)."""
  staged = train.compile_only(config(corpus, 'transformer', {'stage': 4}), str(tmp_path / 's'))
  whole = train.compile_only(config(corpus, 'transformer'), str(tmp_path / 'w'))
  held = [staged[f'memory/stage_{s}/params_and_state_bytes'] for s in range(4)]
  assert len(set(held)) == 1
  assert held[0] < whole['memory/params_and_state_bytes'] / 2


@pytest.mark.parametrize(
  'family, mesh, microbatches, repeats, overrides, message',
  [
    ('transformer', {'stage': 4}, 0, 1, {'layers': 6}, '6 layers do not split'),
    ('transformer', {'stage': 2}, 0, 1, {'model.scan_layers': False}, 'model.scan_layers=True'),
    ('transformer', {'stage': 4}, 2, 2, {}, 'needs pipeline_microbatches >= mesh.stage'),
    ('transformer', {'stage': 4, 'data': 2}, 32, 1, {}, 'does not split into 32 pipeline'),
    ('transformer', {'stage': 4}, 4, 1, {'eval_batch_size': 6}, r'6 rows \(eval_batch_size\)'),
    ('rnn', {'stage': 2}, 0, 1, {'model.d_embed': 16}, 'd_embed=16 must equal'),
  ],
)
def test_bad_pipelines_are_refused(
  family, mesh, microbatches, repeats, overrides, message, corpus, tmp_path
):
  with pytest.raises(ConfigError, match=message):
    cfg = config(corpus, family, mesh, microbatches, repeats, **overrides)
    train.compile_only(cfg, str(tmp_path))


def test_the_bubble_formula():
  assert pipeline.Pipeline(4, 4).bubble == pytest.approx(3 / 7)
  assert pipeline.Pipeline(4, 8, repeats=2).bubble == pytest.approx(3 / 19)
