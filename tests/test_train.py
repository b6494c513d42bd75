import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ar_jax import evaluation, models, objectives, optim, platform, train
from ar_jax import run as run_lib
from ar_jax import state as state_lib
from ar_jax.data import batches
from ar_jax.errors import ConfigError
from tests.helpers import read_jsonl, tiny_config


def test_chunks_stop_at_every_log_eval_and_checkpoint_step():
  cfg = tiny_config(
    num_train_steps=25,
    steps_per_dispatch=4,
    log_every_steps=10,
    eval_every_steps=7,
    checkpoint_every_steps=100,
  )
  sizes = train.chunk_sizes(0, cfg)
  ends = np.cumsum(sizes).tolist()
  assert ends[-1] == 25 and max(sizes) == 4
  assert {7, 10, 14, 20, 21} <= set(ends)
  resumed = train.chunk_sizes(14, cfg)  # a resumed run cuts the rest the same way
  assert (14 + np.cumsum(resumed)).tolist() == [e for e in ends if e > 14]


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_token_loss_and_its_gradient_equal_optax_and_keep_the_logits_dtype(dtype):
  logits = (3 * jax.random.normal(jax.random.key(0), (3, 5, 17))).astype(dtype)
  targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 17)
  weights = jax.random.uniform(jax.random.key(2), (3, 5))

  def ours(x):
    return jnp.sum(objectives.token_nll(x, targets) * weights)

  def optax_(x):
    losses = optax.softmax_cross_entropy_with_integer_labels(x.astype(jnp.float32), targets)
    return jnp.sum(losses * weights)

  np.testing.assert_allclose(ours(logits), optax_(logits), rtol=1e-6)
  grad = jax.jit(jax.grad(ours))(logits)
  assert grad.dtype == logits.dtype
  np.testing.assert_allclose(
    grad.astype(np.float32), jax.grad(optax_)(logits).astype(np.float32), atol=1e-6
  )


def test_xla_defaults_add_cublas_matmuls_unless_the_user_chose(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  platform.set_xla_defaults()
  assert os.environ['XLA_FLAGS'].split() == [
    '--xla_force_host_platform_device_count=8',
    '--xla_gpu_enable_triton_gemm=false',
  ]
  monkeypatch.setenv('XLA_FLAGS', '--xla_gpu_enable_triton_gemm=true')
  platform.set_xla_defaults()
  assert os.environ['XLA_FLAGS'] == '--xla_gpu_enable_triton_gemm=true'


def test_weight_decay_skips_biases_norms_and_decay_rates():
  """Decayed: matrices. Not: biases, norm scales, and a linear recurrence's decay rates and
  skip (Mamba's A_log, dt_bias and D; Hawk's L and its gates' bias), by the names their
  families declare."""
  params = {'block': {'kernel': np.ones((2, 2)), 'bias': np.ones(2)}, 'ln': {'scale': np.ones(2)}}
  mask = optim.decay_mask()(params)
  assert mask == {'block': {'kernel': True, 'bias': False}, 'ln': {'scale': False}}
  expected = {
    'mamba': {'a_log': False, 'dt_bias': False, 'skip': False, 'x_proj': {'kernel': True}},
    'hawk': {'rg_lru': {'a_param': False, 'gates_bias': False, 'gates': True}},
  }
  for family, wanted in expected.items():
    model = models.get_model(models.tiny_configs(family)[family], 13)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    mask = optim.decay_mask(models.capabilities(family).no_decay)
    block = mask(nn.unbox(shapes['params']))['block_0']
    assert {k: block[k] for k in wanted} == wanted, block


def test_learning_rate_warms_up_then_decays_to_the_floor():
  cfg = tiny_config(
    **{'optim.warmup_steps': 10, 'optim.learning_rate': 1e-3, 'optim.min_learning_rate': 1e-4}
  )
  lr = optim.schedule(cfg.optim, 100)
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(5e-4)
  assert float(lr(10)) == pytest.approx(1e-3)
  assert float(lr(100)) == pytest.approx(1e-4)


@pytest.mark.parametrize(
  'overrides, message',
  [
    (
      {'mesh.data': -1, 'batch_size': 12},
      r'batch_size=12 is not divisible by the data-parallel size 8',
    ),
    ({'mesh.data': 16}, r'needs 16 devices; 8 are present'),
    ({'data.seq_len': 64}, r'data.seq_len=64 is longer than the 32 positions the model supports'),
    ({'data.name': 'no_such_corpus'}, r"unknown data.name='no_such_corpus'"),
    ({'model.name': 'hyena'}, r"unknown model.name='hyena'"),
    ({'model.num_heads': 3}, r'num_heads=3 does not divide model.d_model=16'),
    ({'batch_size': 0}, r'batch_size must be positive, got 0'),
    (
      {'data.tokenizer': 'wordpiece'},
      r"tokenizer='wordpiece'; allowed: char, byte, bpe, sentencepiece",
    ),
  ],
)
def test_bad_input_is_named_before_anything_is_written(text_file, tmp_path, overrides, message):
  workdir = tmp_path / 'run'
  with pytest.raises(ConfigError, match=message):
    train.train_and_evaluate(tiny_config(text_file, **overrides), str(workdir))
  assert not workdir.exists()


def test_workdir_of_another_run_is_refused_and_left_alone(text_file, tmp_path):
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config(text_file, num_train_steps=3), str(workdir))
  before = sorted((p.name, p.stat().st_mtime_ns) for p in (workdir / 'checkpoints').rglob('*'))
  with pytest.raises(ConfigError, match=r'model.d_model: workdir has 16, config has 32'):
    train.train_and_evaluate(tiny_config(text_file, **{'model.d_model': 32}), str(workdir))
  after = sorted((p.name, p.stat().st_mtime_ns) for p in (workdir / 'checkpoints').rglob('*'))
  assert before == after and before
  logged = read_jsonl(workdir / 'metrics.jsonl')
  assert [m['step'] for m in logged if 'train/loss' in m] == [2, 3]


def test_evaluation_is_the_exact_mean_over_every_eval_token(text_file, tmp_path):
  cfg = tiny_config(text_file, eval_batches=0)
  run = run_lib.setup(cfg, str(tmp_path))
  _, shardings = state_lib.abstract_state(run.model, run.tx, run.mesh, cfg)
  state = train.init_state(run, shardings)
  got = evaluation.Evaluator(run, shardings.params).evaluate(state.params)
  tokens = np.concatenate(list(run.streams.eval.values())).astype(np.int32)
  assert len(run.streams.eval) == 1
  # Directly: every token after the first, predicted from the up-to-seq_len tokens before it
  # in its window, as the evaluator cuts them.
  T, nats = cfg.data.seq_len, 0.0
  forward = jax.jit(lambda t: run.model.apply({'params': state.params}, t))
  for start in range(0, len(tokens) - 1, T):
    window = tokens[start : start + T + 1]
    logp = jax.nn.log_softmax(forward(window[None, :-1])[0])
    nats -= float(np.sum(np.take_along_axis(np.asarray(logp), window[1:, None], 1)))
  assert got['eval/tokens'] == len(tokens) - 1
  assert got['eval/loss'] == pytest.approx(nats / (len(tokens) - 1), rel=1e-5)
  assert got['eval/bits_per_char'] == pytest.approx(got['eval/loss'] / np.log(2), rel=1e-6)


def test_a_run_is_evaluated_on_other_data_through_its_own_tokenizer(text_file, tmp_path):
  """Domain transfer: the workdir's model and tokenizer, another corpus's held-out text."""
  other = tmp_path / 'other.txt'
  # Its held-out end has only characters the run's tokenizer knows; its training part does
  # not, and is neither needed nor tokenized to evaluate.
  other.write_text('Zebra! Quokka? ' * 40 + 'a lazy dog and the fox\n' * 300)
  workdir = str(tmp_path / 'run')
  cfg = tiny_config(text_file, num_train_steps=20, eval_batches=0)
  trained = train.train_and_evaluate(cfg, workdir)
  assert evaluation.evaluate_workdir(cfg, workdir)['eval/loss'] == pytest.approx(
    trained['eval/loss']
  )
  elsewhere = evaluation.evaluate_workdir(tiny_config(other, eval_batches=0), workdir)
  # The held-out part of other.txt (its last 10%), every token but the first, scored.
  assert elsewhere['eval/tokens'] == len(other.read_text()) - int(0.9 * len(other.read_text())) - 1
  assert elsewhere['eval/loss'] != pytest.approx(trained['eval/loss'], rel=1e-3)
  with pytest.raises(ConfigError, match='model.d_model: workdir has 16, config has 32'):
    evaluation.evaluate_workdir(tiny_config(other, **{'model.d_model': 32}), workdir)


def test_bfloat16_trains_like_float32_with_float32_state(text_file, tmp_path):
  """The quickstart's model, 20 steps in one dispatch: bf16 matmul operands (float32
  accumulation) reach a loss within 2% of float32's, and parameters and AdamW moments stay
  float32."""
  from experiments import quickstart

  losses = {}
  for dtype in ('float32', 'bfloat16'):
    c = quickstart.get_config()
    c.data.name, c.data.path, c.data.tokenizer = 'files', str(text_file), 'byte'
    c.data.seq_len, c.model.max_len, c.mesh.data = 64, 64, 1
    c.num_train_steps, c.optim.warmup_steps, c.model.dtype = 20, 5, dtype
    run = run_lib.setup(c, str(tmp_path / dtype), evaluation=False)
    _, shardings = state_lib.abstract_state(run.model, run.tx, run.mesh, c)
    stream = batches.train_iterator(
      run.streams.train, batch_size=8, seq_len=64, seed=0, sampling='random'
    )
    state, metrics = train.Trainer(run, shardings).train(
      train.init_state(run, shardings), np.stack([next(stream) for _ in range(20)])
    )
    losses[dtype] = float(metrics['loss'][-1])
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))} <= {
      np.dtype('float32'),
      np.dtype('int32'),  # the optimizer's step count
    }
  assert losses['bfloat16'] == pytest.approx(losses['float32'], rel=0.02)


def test_a_profile_traces_the_chosen_steps(text_file, tmp_path):
  c = tiny_config(text_file, **{'profile.steps': (4, 1), 'steps_per_dispatch': 10})
  assert train.chunk_sizes(0, c) == [2, 1, 1, 2]  # to the logs at 2, 4, the eval at 3
  assert train.chunk_sizes(0, c, (4, 5)) == [2, 1, 1, 1, 1]  # and the trace's end at 5
  train.train_and_evaluate(c, str(tmp_path))
  traces = list((tmp_path / 'profile').rglob('*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert list((tmp_path / 'profile').rglob('*.trace.json.gz'))
  with pytest.raises(ConfigError, match=r'must be two non-negative integers, got \(-1, 2\)'):
    run_lib.validate(tiny_config(text_file, **{'profile.steps': (-1, 2)}))


def test_weights_and_biases_gets_the_same_scalars_offline(text_file, tmp_path):
  import wandb

  c = tiny_config(text_file, **{'wandb.project': 'ar_jax_test', 'wandb.mode': 'offline'})
  try:
    train.train_and_evaluate(c, str(tmp_path))
    train.train_and_evaluate(c, str(tmp_path))  # resumed: the same W&B run
  finally:
    wandb.teardown()  # its service process ends with the test
  runs = list((tmp_path / 'wandb').glob('offline-run-*'))
  run_id = (tmp_path / 'wandb' / 'run_id').read_text()
  assert runs and all(r.name.endswith(run_id) for r in runs)
  history = b''.join(p.read_bytes() for r in runs for p in r.glob('*.wandb'))
  for key in read_jsonl(tmp_path / 'metrics.jsonl')[-1]:
    assert key == 'step' or key.encode() in history
  with pytest.raises(ConfigError, match="wandb.mode='cloud'; allowed: online, offline"):
    run_lib.validate(tiny_config(text_file, **{'wandb.mode': 'cloud'}))
