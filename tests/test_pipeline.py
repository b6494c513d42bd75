"""Pipeline parallelism (ar_jax/pipeline.py) on 8 simulated devices: the pipelined train step
against the unpipelined one, where the stages' layers live, checkpoints across stage counts,
and the configurations it refuses."""

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

LAYERS = 8
# Every family with a pipelined stack: the transformer, and the rnn family, whose first TINY
# model is an LSTM.
FAMILIES = [name for name in models.available() if models.pipelined(name)]
# (mesh, pipeline_microbatches, pipeline_repeats, other config): GPipe over the issue's
# (stage, data) layouts and 1, 4 and 8 microbatches; the circular schedule; and the stages
# beside fsdp and tensor, with accumulation and remat; and in mixed precision.
CASES = {
  'stage4_data2_m1': ({'stage': 4, 'data': 2}, 1, 1, {}),
  'stage4_data2_m4': ({'stage': 4, 'data': 2}, 4, 1, {}),
  'stage2_data4_m8': ({'stage': 2, 'data': 4}, 8, 1, {}),
  'stage8_m8': ({'stage': 8, 'data': 1}, 8, 1, {}),
  'stage4_data2_m4_circular2': ({'stage': 4, 'data': 2}, 4, 2, {}),
  'stage2_data4_m4_circular4': ({'stage': 2, 'data': 4}, 4, 4, {}),
  'stage2_fsdp2_tensor2_accum2_remat': (
    {'stage': 2, 'data': 1, 'fsdp': 2, 'tensor': 2},
    2,
    1,
    {'grad_accum_steps': 2, 'model.remat': 'full'},
  ),
  'stage2_fsdp2_tensor2_m2_circular2': ({'stage': 2, 'data': 1, 'fsdp': 2, 'tensor': 2}, 2, 2, {}),
  'stage4_data2_m4_bf16': ({'stage': 4, 'data': 2}, 4, 1, {'model.dtype': 'bfloat16'}),
}


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp('corpus') / 'corpus.txt')


def config(corpus, family, mesh=None, microbatches=0, repeats=1, **overrides):
  """The family's TINY model with LAYERS scanned layers (where it has a layer stack)."""
  stack = {'model.num_layers': LAYERS, 'model.scan_layers': True} if family in FAMILIES else {}
  c = family_config(corpus, family, batch_size=32, **{**stack, **overrides})
  c.mesh.update({'data': 1, **(mesh or {})})
  c.pipeline_microbatches, c.pipeline_repeats = microbatches, repeats
  return c


_unpipelined: dict[tuple[str, str], tuple] = {}


def unpipelined(family, dtype, corpus, tmp_path_factory):
  """(state after one step, its loss, the initial state) on one device, once per family and
  compute dtype."""
  if (family, dtype) not in _unpipelined:
    workdir = tmp_path_factory.mktemp(f'{family}_{dtype}_unpipelined')
    cfg = config(corpus, family, **{'model.dtype': dtype})
    _unpipelined[family, dtype] = one_step(cfg, workdir)
  return _unpipelined[family, dtype]


# Every case for every family but one: the circular regrouping beside fsdp and tensor moves
# whole layers whatever they hold, so the transformer's (which tensor splits) checks it.
PIPELINED = [
  (f, c)
  for f in FAMILIES
  for c in CASES
  if f == 'transformer' or c != 'stage2_fsdp2_tensor2_m2_circular2'
]


@pytest.mark.parametrize('family, case', PIPELINED)
def test_the_pipelined_step_equals_the_unpipelined_one(
  family, case, corpus, tmp_path, tmp_path_factory
):
  mesh, microbatches, repeats, overrides = CASES[case]
  dtype = overrides.get('model.dtype', 'float32')
  base, base_loss, initial = unpipelined(family, dtype, corpus, tmp_path_factory)
  cfg = config(corpus, family, mesh, microbatches, repeats, **overrides)
  state, loss, _ = one_step(cfg, tmp_path, initial)
  assert loss == pytest.approx(base_loss, rel=1e-5)
  rtol = 1e-4 if cfg.grad_accum_steps > 1 else 2e-5
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-6), state.params, base.params
  )


@pytest.mark.parametrize('family', FAMILIES)
def test_each_stage_holds_its_own_layers(family, corpus, tmp_path):
  """Under stage=4, data=2 the devices of stage s hold layers 2s and 2s + 1 of every stacked
  parameter (and of its optimizer moments), and nothing of the other stages' layers."""
  cfg = config(corpus, family, {'stage': 4, 'data': 2}, 4)
  state, _, _ = one_step(cfg, tmp_path)
  run = run_lib.setup(cfg, str(tmp_path))
  stage_of = {d: s for s, devices in enumerate(run.mesh.devices) for d in devices.flat}
  boxed = jax.eval_shape(run.model.init, jax.random.key(0), np.zeros((1, 4), np.int32))
  is_stacked = jax.tree.map(
    lambda x: isinstance(x, nn.Partitioned) and x.names[0] == 'layers',
    boxed['params'],
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )
  mu = state.opt_state[1][0].mu  # AdamW's first moments, after the gradient clip
  stacked_leaves = [
    x
    for tree in (state.params, mu)
    for x, stacked in zip(jax.tree.leaves(tree), jax.tree.leaves(is_stacked), strict=True)
    if stacked
  ]
  assert len(stacked_leaves) >= 6
  for x in stacked_leaves:
    for shard in x.addressable_shards:
      s = stage_of[shard.device]
      assert shard.index[0] == slice(2 * s, 2 * s + 2), (x.shape, shard.index)


def test_a_checkpoint_restores_across_stage_counts(corpus, tmp_path):
  """Saved under stage=4 it restores under stage=1 with identical values, and the other way."""
  meshes = {4: {'stage': 4, 'data': 2}, 1: {'data': 1}}
  for saved, restored_under in ((4, 1), (1, 4)):
    workdir = tmp_path / f'saved_under_{saved}'
    state, _, _ = one_step(config(corpus, 'transformer', meshes[saved]), workdir)
    with checkpoint.Checkpointer(str(workdir), max_to_keep=1) as saver:
      saver.save(1, state, {'next_index': 1}, {})
    other = config(corpus, 'transformer', meshes[restored_under])
    run = run_lib.setup(other, str(workdir))
    abstract, _ = state_lib.abstract_state(run.model, run.tx, run.mesh, other)
    with checkpoint.Checkpointer(str(workdir), max_to_keep=1) as reader:
      restored, _, _ = reader.restore(1, abstract)
    kernel = restored.params['blocks']['mlp_in']['kernel']
    assert kernel.sharding.mesh.shape['stage'] == restored_under
    jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, restored.opt_state, state.opt_state)


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
    ('transformer', {'stage': 4}, 0, 1, {'model.num_layers': 6}, '6 layers do not split'),
    ('transformer', {'stage': 2}, 0, 1, {'model.scan_layers': False}, 'model.scan_layers=True'),
    ('transformer', {'stage': 4}, 2, 2, {}, 'needs pipeline_microbatches >= mesh.stage'),
    ('transformer', {'stage': 4, 'data': 2}, 32, 1, {}, 'does not split into 32 pipeline'),
    ('transformer', {'stage': 4}, 4, 1, {'eval_batch_size': 6}, r'6 rows \(eval_batch_size\)'),
    ('conv', {'stage': 2}, 0, 1, {}, "model.name='conv' has no pipelined layer stack"),
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
