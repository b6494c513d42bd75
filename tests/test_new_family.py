"""A new model family written in this file alone, and everything it gets without an edit
anywhere else: the contract suite (causality, cached decoding, packed documents, a scanned
stack, FLOPs, sharded steps, accumulation, remat), training and decoding through the real
trainer and decoder, and pipeline stages.

The family is a moving average: each block keeps m_t = (m_{t-1} + y_t) / 2 of its normalised
input y (m restarting at a document start) and adds x + W_o ReLU(W_i [y_t, m_{t-1}]). It is
this module, named by its import path: config.model.name = 'tests.test_new_family'.

Dimension legend: B batch, T time, D model width, V vocab.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ar_jax import decode, models, train
from ar_jax.errors import check
from ar_jax.models import contract, layers, numerics, stack

RULES = (('mlp', 'tensor'),)
TINY = {'shift': dict(num_layers=2, d_model=64)}
CAPABILITIES = contract.Capabilities()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(stack.StackConfig, numerics.NumericsConfig):
  vocab_size: int  # decided by the tokenizer
  eos_id: int | None = None  # decided by the tokenizer: a document starts after it
  num_layers: int = 2
  d_model: int = 64

  def __post_init__(self):
    check(self.d_model > 0, f'model.d_model must be positive, got {self.d_model}')
    self.check_numerics()
    self.check_stack(self.num_layers)


class Block(nn.Module):
  config: Config
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, m_BD, ctx):
    p = self.config.policy
    y_BTD = layers.layer_norm(p.activations, name='ln')(x_BTD).astype(jnp.float32)
    start_BD = jnp.zeros_like(y_BTD[:, 0]) if m_BD is None else m_BD

    def average(m_BD, inputs):
      y_BD, keep_B = inputs
      before_BD = jnp.where(keep_B[:, None], m_BD, 0)  # a document starts: no past
      return (before_BD + y_BD) / 2, before_BD

    last_BD, before_TBD = jax.lax.scan(
      average, start_BD, (jnp.swapaxes(y_BTD, 0, 1), ctx['keep'].T)
    )
    h = layers.Dense((4 * self.config.d_model,), ('embed', 'mlp'), policy=p, name='in')(
      jnp.concatenate([y_BTD, jnp.swapaxes(before_TBD, 0, 1)], axis=-1)
    )
    x_BTD = x_BTD + layers.Dense((self.config.d_model,), ('mlp', 'embed'), policy=p, name='out')(
      jax.nn.relu(h)
    )
    return x_BTD, None if m_BD is None else last_BD

  @staticmethod
  def layer_cache(cfg: Config, batch_size: int, max_len: int, layer: int | None):
    return jnp.zeros((batch_size, cfg.d_model), jnp.float32)


class Model(nn.Module):
  config: Config
  deterministic: bool = True

  def setup(self):
    cfg = self.config
    self.token_embed = layers.token_embedding(cfg.vocab_size, cfg.d_model, stddev=1.0)
    self.stack = stack.Stack(Block, cfg, cfg.num_layers, self.deterministic)
    self.head = layers.Dense((cfg.vocab_size,), ('embed', 'vocab'), policy=cfg.policy)

  def embed(self, tokens_BT, segment_ids_BT=None):
    return self.token_embed(tokens_BT)

  def _run(self, tokens_BT, caches, x_BTD, keep_BT):
    x_BTD = self.embed(tokens_BT) if x_BTD is None else x_BTD
    x_BTD, caches = self.stack(x_BTD, caches, {'keep': keep_BT})
    return self.head(x_BTD).astype(jnp.float32), caches

  def __call__(self, tokens_BT, embeddings_BTD=None, segment_ids_BT=None):
    keep_BT = self._keep(tokens_BT, segment_ids_BT)
    return self._run(tokens_BT, None, embeddings_BTD, keep_BT)[0]

  def _keep(self, tokens_BT, segment_ids_BT=None):
    if segment_ids_BT is not None:
      return ~layers.segment_starts(segment_ids_BT)
    eos = self.config.eos_id
    return jnp.ones(tokens_BT.shape, bool) if eos is None else tokens_BT != eos

  def step(self, tokens_BT, cache):
    return self._run(tokens_BT, cache, None, self._keep(tokens_BT))

  def init_cache(self, batch_size, max_len=0):
    cfg = self.config
    return stack.init_cache(Block, cfg, cfg.num_layers, batch_size, max_len)

  max_len = 0

  @property
  def cache_batch_axis(self):
    return stack.cache_batch_axis(self.config)

  sequential = False

  def flops_per_token(self, seq_len):
    D = self.config.d_model
    return float(
      self.config.num_layers * 2 * (2 * D * 4 * D + 4 * D * D) + 2 * D * self.config.vocab_size
    )


# The contract suite, run over this module's family (its FAMILIES, set after the import).
from tests.helpers import family_config, one_step, random_model, write_corpus  # noqa: E402
from tests.test_contract import *  # noqa: E402, F403
from tests.test_contract import V  # noqa: E402
from tests.test_pipeline import CASES, config, unpipelined  # noqa: E402

FAMILIES = [__name__]


def test_it_is_found_by_its_import_path():
  assert models.capabilities(__name__) is CAPABILITIES
  assert set(models.default_config(__name__)) >= {'name', 'num_layers', 'd_model', 'numerics'}


def test_it_trains_evaluates_and_samples_through_the_real_trainer(tmp_path):
  corpus = write_corpus(tmp_path / 'corpus.txt')
  packed = {'data.packing': 'documents', 'data.tokenizer': 'byte', 'data.seq_len': 8}
  c = family_config(corpus, __name__, num_train_steps=4, **packed)
  metrics = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert np.isfinite(metrics['eval/loss'])
  assert (tmp_path / 'run' / 'final.json').exists()


@pytest.mark.parametrize('case', list(CASES)[:2])
def test_it_pipelines(case, tmp_path, tmp_path_factory):
  corpus = write_corpus(tmp_path / 'corpus.txt')
  mesh, microbatches, repeats, overrides = CASES[case]
  base, base_loss, initial = unpipelined(__name__, 'float32', 4, corpus, tmp_path_factory)
  state, loss, _ = one_step(
    config(corpus, __name__, mesh, microbatches, repeats), tmp_path, initial
  )
  assert loss == pytest.approx(base_loss, rel=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), state.params, base.params
  )


def test_it_decodes_greedily_as_the_full_forward():
  model, params = random_model(__name__, V)
  prompts = jnp.array([[1, 2, 3], [4, 5, 6]])
  out = decode.generate(model, params, prompts, 6, jax.random.key(0), temperature=0.0)
  tokens = np.asarray(out.tokens)
  logits = model.apply({'params': params}, jnp.asarray(tokens[:, :-1]))
  np.testing.assert_array_equal(tokens[:, 3:], np.asarray(logits.argmax(-1))[:, 2:])
