"""The model contract (ar_jax/models/contract.py), checked once for every family in
FAMILIES (models.available()): a family added as one module gets all of it without editing a
test, and a module of one's own runs the same suite over itself by importing it with its own
FAMILIES (tests/test_new_family.py).

Per TINY variant: causality by gradients, cached decoding against the full forward, and of
packed documents: no gradient across them, each one's logits those it gets alone. Per
family (its first TINY variant): a scanned stack against the unrolled one, FLOPs against
XLA's count, remat against none, and through the real trainer the sharded step on two meshes
against one device, with every large array actually split, and gradient accumulation against
the whole batch.
"""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ar_jax import models
from ar_jax.errors import ConfigError
from ar_jax.models import contract
from tests.helpers import family_config, one_step, position_jacobian, random_model, write_corpus

V = 13
T = 12
FAMILIES = models.available()
# (data, fsdp, tensor): fsdp 8 wide alone (every large array split), and all three axes at
# once. Data parallelism alone adds nothing the third does not check: its batch split and
# gradient all-reduce are in it (and the multi-process tests run it across processes).
MESHES = [(1, 8, 1), (2, 2, 2)]
LARGE = 1024  # elements: a parameter larger than this must be split under fsdp=8
DOCUMENTS = (5, 4, 3)  # lengths of the documents packed into a row of T positions
DOCUMENT_STARTS = np.cumsum((0, *DOCUMENTS))[:-1]


def pytest_generate_tests(metafunc):
  """Parametrizes over the FAMILIES of the module the tests are collected in: `family` (each
  family), `variant` (each TINY variant, with `name`), `packed_variant` (those of families
  that pack documents) and `whole_family` (the families that take whole examples instead)."""
  families = metafunc.module.FAMILIES
  packs = lambda n: models.capabilities(n).packs_documents
  variants = [(n, v) for n in families for v in models.tiny_configs(n)]
  ids = lambda pairs: [f'{n}-{v}' for n, v in pairs]
  if 'variant' in metafunc.fixturenames:
    metafunc.parametrize('name, variant', variants, ids=ids(variants))
  elif 'packed_variant' in metafunc.fixturenames:
    packed = [(n, v) for n, v in variants if packs(n)]
    metafunc.parametrize('name, packed_variant', packed, ids=ids(packed))
  elif 'whole_family' in metafunc.fixturenames:
    metafunc.parametrize('whole_family', [n for n in families if not packs(n)])
  elif 'family' in metafunc.fixturenames:
    metafunc.parametrize('family', families)


def tokens_BT(batch: int, length: int, seed: int = 0) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, V)


def packed_segments_BT(batch: int) -> jax.Array:
  """Segment ids of DOCUMENTS packed into rows of T positions. The first is not 0: a window
  may start anywhere in the stream."""
  ids_T = np.repeat(2 + np.arange(len(DOCUMENTS)), DOCUMENTS)
  assert ids_T.size == T
  return jnp.asarray(np.broadcast_to(ids_T, (batch, T)), jnp.int32)


def test_causal_by_gradients(name, variant):
  """d logits_t / d embedding_s is zero for every s > t, and every position after the first
  depends on some input."""
  model, params = random_model(name, V, variant)
  seen_TT = position_jacobian(model, params, tokens_BT(1, T)) > 0
  t, s = np.indices(seen_TT.shape)
  assert not seen_TT[s > t].any(), f'positions see later inputs: {np.argwhere(seen_TT & (s > t))}'
  assert seen_TT[1:].any(axis=1).all(), f'positions that see no input: {seen_TT.any(axis=1)}'


def test_cached_steps_equal_the_full_forward(name, variant):
  """Two prefills (the first shorter than some caches' buffers), then one token at a time
  past every buffer's length, give the full forward's logits."""
  model, params = random_model(name, V, variant)
  tokens = tokens_BT(3, T)
  full = model.apply({'params': params}, tokens)
  step = jax.jit(lambda t, c: model.apply({'params': params}, t, c, method=model.step))
  cache, pieces = model.init_cache(3, T), []
  for start, stop in [(0, 3), (3, 6), *((t, t + 1) for t in range(6, T))]:
    logits, cache = step(tokens[:, start:stop], cache)
    pieces.append(logits)
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=3e-5, rtol=1e-5)


def test_no_gradient_across_documents(name, packed_variant):
  """d logits_t / d embedding_s is exactly zero for t and s in different packed documents,
  and each document's last position depends on its first."""
  model, params = random_model(name, V, packed_variant)
  segments_BT = packed_segments_BT(2)  # two rows: a ReLU dead in one does not hide a path
  seen_TT = position_jacobian(model, params, tokens_BT(2, T), segments_BT) > 0
  ids_T = np.asarray(segments_BT[0])
  across_TT = ids_T[:, None] != ids_T[None, :]
  assert not seen_TT[across_TT].any(), f'seen across documents: {np.argwhere(seen_TT & across_TT)}'
  lasts = DOCUMENT_STARTS + np.array(DOCUMENTS) - 1
  assert seen_TT[lasts, DOCUMENT_STARTS].all(), f'first positions unseen: {seen_TT[lasts]}'


def test_a_packed_document_equals_the_document_alone(name, packed_variant):
  """Each document's logits inside a packed row are those it gets alone at the start of a
  row: nothing crosses a boundary, and positions restart at each document."""
  model, params = random_model(name, V, packed_variant)
  packed_BT = tokens_BT(1, T)
  # Row d: document d first; the documents after it follow, which it never reads.
  alone_DT = jnp.concatenate([jnp.roll(packed_BT, -start, axis=1) for start in DOCUMENT_STARTS])

  @jax.jit
  def logits(p):
    packed = model.apply({'params': p}, packed_BT, None, packed_segments_BT(1))
    return packed[0], model.apply({'params': p}, alone_DT)

  packed_TV, alone_DTV = logits(params)
  for d, (start, length) in enumerate(zip(DOCUMENT_STARTS, DOCUMENTS, strict=True)):
    np.testing.assert_allclose(
      packed_TV[start : start + length],
      alone_DTV[d, :length],
      atol=1e-5,
      rtol=1e-5,
      err_msg=f'document {d}',
    )


def test_whole_example_families_refuse_packed_documents(whole_family):
  model, params = random_model(whole_family, V)
  with pytest.raises(ConfigError, match="packed documents .* data.sampling='examples'"):
    model.apply({'params': params}, tokens_BT(1, T), None, packed_segments_BT(1))


def test_a_scanned_stack_equals_the_unrolled_one(family):
  """The same blocks' parameters stacked on a 'layers' axis give the same logits, and the
  same cached steps, through one scanned block as through the unrolled stack."""
  name, fields = next(iter(models.tiny_configs(family).items()))
  unrolled, params = random_model(family, V, name, scan_layers=False)
  scanned = models.get_model(ml_collections.ConfigDict({**fields, 'scan_layers': True}), V)
  shapes = nn.unbox(jax.eval_shape(scanned.init, jax.random.key(0), tokens_BT(1, 4))['params'])
  blocks = sorted(k for k in params if k.startswith('block_'))
  assert len(blocks) > 1 and 'blocks' in shapes and not any(k.startswith('block_') for k in shapes)
  stacked = {k: v for k, v in params.items() if k not in blocks}
  stacked['blocks'] = jax.tree.map(lambda *a: jnp.stack(a), *[params[b] for b in blocks])
  jax.tree.map(lambda a, s: np.testing.assert_equal(a.shape, s.shape), stacked, shapes)
  tokens = tokens_BT(2, T)
  np.testing.assert_allclose(
    scanned.apply({'params': stacked}, tokens),
    unrolled.apply({'params': params}, tokens),
    atol=1e-5,
    rtol=1e-5,
  )
  step = lambda m, p: m.apply({'params': p}, tokens, m.init_cache(2, T), method=m.step)[0]
  np.testing.assert_allclose(step(scanned, stacked), step(unrolled, params), atol=1e-5, rtol=1e-5)


def test_flops_per_token_match_xla(family):
  """flops_per_token against XLA's count of the compiled forward, which adds the elementwise
  work the matmul count leaves out. XLA counts a loop's body once, so a sequential model
  (a loop over time) is measured on one position (and a scanned layer stack would be
  undercounted: the first TINY variant is not one)."""
  model, params = random_model(family, V)
  length = 1 if model.sequential else T
  tokens = tokens_BT(4, length)
  compiled = jax.jit(lambda p, t: model.apply({'params': p}, t)).lower(params, tokens).compile()
  xla = compiled.cost_analysis()['flops']
  ours = model.flops_per_token(length) * tokens.size
  assert 0.95 * ours <= xla <= 1.15 * ours, (ours, xla)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp('corpus') / 'corpus.txt')


_single_device: dict[str, tuple] = {}


def single_device(family, corpus, tmp_path_factory):
  """(state after one step, its loss, the initial state) of a family on one device, computed
  once for the tests that compare with it."""
  if family not in _single_device:
    workdir = tmp_path_factory.mktemp(f'{family}_one_device')
    _single_device[family] = one_step(family_config(corpus, family), workdir)
  return _single_device[family]


def assert_close(a, b, rtol=2e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize('mesh', MESHES, ids=lambda m: 'x'.join(map(str, m)))
def test_the_sharded_step_equals_one_device(family, mesh, corpus, tmp_path, tmp_path_factory):
  base, base_loss, initial = single_device(family, corpus, tmp_path_factory)
  data, fsdp, tensor = mesh
  cfg = family_config(
    corpus, family, **{'mesh.data': data, 'mesh.fsdp': fsdp, 'mesh.tensor': tensor}
  )
  # The same initial parameters, placed on this mesh (sharded initialisation is tested by
  # tests/test_distributed.py, which samples from a run initialised under fsdp=8).
  state, loss, _ = one_step(cfg, tmp_path, initial)
  assert loss == pytest.approx(base_loss, rel=1e-5)
  assert_close(state.params, base.params)
  if fsdp == 8:  # every large parameter, and its optimizer moments, split over devices
    large = [
      (jax.tree_util.keystr(path), x)
      for path, x in jax.tree_util.tree_leaves_with_path((state.params, state.opt_state))
      if x.size > LARGE
    ]
    assert len(large) >= 6, f'only {len(large)} arrays of more than {LARGE} elements'
    whole = [path for path, x in large if x.addressable_shards[0].data.size == x.size]
    assert not whole, f'replicated under fsdp=8: {whole}'


def test_gradient_accumulation_equals_the_whole_batch(family, corpus, tmp_path, tmp_path_factory):
  whole, loss, initial = single_device(family, corpus, tmp_path_factory)
  cfg = family_config(corpus, family, grad_accum_steps=4)
  accumulated, accum_loss, _ = one_step(cfg, tmp_path, initial)
  assert accum_loss == pytest.approx(loss, rel=1e-5)
  assert_close(accumulated.params, whole.params, rtol=1e-4)


def test_remat_equals_no_remat(family):
  """The same loss and gradients, and the backward pass really recomputes (a checkpoint in
  its program)."""
  model, params = random_model(family, V)
  remat, _ = random_model(family, V, remat='full')
  tokens = tokens_BT(2, T)

  def grad(m):
    return jax.jit(jax.value_and_grad(lambda p: (m.apply({'params': p}, tokens) ** 2).mean()))

  (loss, grads), (remat_loss, remat_grads) = grad(model)(params), grad(remat)(params)
  assert remat_loss == pytest.approx(float(loss), rel=1e-6)
  assert_close(remat_grads, grads, rtol=1e-5)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: remat.apply({'params': p}, tokens).sum()))(params))
  assert 'checkpoint' in jaxpr or 'remat' in jaxpr


def test_a_family_missing_part_of_the_contract_is_named():
  module = types.ModuleType('ar_jax.models.half_done')
  module.Config, module.RULES, module.TINY = object, (), {'tiny': {}}
  module.CAPABILITIES = contract.Capabilities()

  class Model:  # no config or deterministic field, no step, no sequential
    def __call__(self, tokens_BT, embeddings_BTE=None, segment_ids_BT=None): ...

    embed = init_cache = flops_per_token = __call__
    max_len, cache_batch_axis = 0, 0

  module.Model = Model
  members = 'Model.config, Model.deterministic, Model.sequential, Model.step'
  with pytest.raises(TypeError, match=f'half_done .* missing {members}$'):
    contract.check_family(module)
  del module.TINY
  with pytest.raises(TypeError, match='missing TINY'):
    contract.check_family(module)
