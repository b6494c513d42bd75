"""Helpers the tests share (no side effects: a config file may import this)."""

import contextlib
import functools
import json
import math
import os
import pathlib
import signal
import subprocess
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ar_jax import config as config_lib
from ar_jax import models, train
from ar_jax import run as run_lib
from ar_jax import state as state_lib
from ar_jax.data import batches, sources

REPO = pathlib.Path(__file__).resolve().parent.parent


_started: list[subprocess.Popen] = []


def start(args, **kwargs) -> subprocess.Popen:
  """subprocess.Popen in a session (so a process group) of its own: kill_started() kills it
  and everything it started when the test ends or the run is interrupted."""
  proc = subprocess.Popen(args, start_new_session=True, **kwargs)
  _started.append(proc)
  return proc


def subprocess_env(devices: int = 1, optimised: bool = False) -> dict[str, str]:
  """This environment for a test's subprocess on `devices` CPU devices (one, as users run):
  the test run's other XLA flags kept, and its unoptimised compiles (conftest) unless
  `optimised`, for a process that trains long enough to gain from XLA's optimisations."""
  flags = os.environ.get('XLA_FLAGS', '').split()
  flags = [f for f in flags if not f.startswith('--xla_force_host_platform_device_count')]
  if devices > 1:
    flags.append(f'--xla_force_host_platform_device_count={devices}')
  env = {**os.environ, 'XLA_FLAGS': ' '.join(flags)}
  if optimised:
    env.pop('JAX_DISABLE_MOST_OPTIMIZATIONS', None)
  return env


def run(args, *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
  """subprocess.run(args, capture_output=True, text=True) through start(); at the timeout
  the whole process group is killed, not its first process alone."""
  proc = start(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    kill_started()
    raise
  return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def kill_started() -> None:
  """SIGKILL to the process group of every process start() began, finished or not (what it
  started may outlive it)."""
  while _started:
    proc = _started.pop()
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def tiny_config(path: pathlib.Path | str = '', **overrides):
  """A transformer small enough to compile and train in seconds, on data.path, one device."""
  c = config_lib.defaults()
  c.data.name = 'files'
  c.data.path = str(path)
  c.data.tokenizer = 'char'
  c.data.seq_len = 16
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.d_model = 16
  c.model.max_len = 32
  c.batch_size = 8
  c.num_train_steps = 6
  c.log_every_steps = 2
  c.eval_every_steps = 3
  c.eval_batches = 2
  c.checkpoint_every_steps = 3
  c.optim.warmup_steps = 1
  c.mesh.data = 1
  c.sample.max_new_tokens = 8
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def write_corpus(path: pathlib.Path) -> pathlib.Path:
  """A small English-like text file for fast end-to-end runs, at path."""
  words = ['the', 'quick', 'brown', 'fox', 'jumps', 'over', 'the', 'lazy', 'dog', 'and', 'runs']
  lines = [' '.join(words[i % 7 :] + words[: i % 7]) for i in range(400)]
  path.write_text('\n'.join(lines) + '\n')
  return path


def read_jsonl(path) -> list[dict]:
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def family_config(path: pathlib.Path | str, family: str, **overrides):
  """tiny_config with the first of the family's TINY models (its contract test config)."""
  c = tiny_config(path, **overrides)
  model = next(iter(models.tiny_configs(family).values()))
  c.model = model.copy_and_resolve_references()
  for key, value in overrides.items():
    if key.startswith('model.'):
      c.model[key.removeprefix('model.')] = value
  return c


def one_step(cfg, workdir, initial=None):
  """(state after one train step, its loss) from the config's first batch, through the real
  trainer on the config's mesh; from `initial` (placed on that mesh) if given, else from
  the config's own initial parameters (returned as the third value)."""
  run = run_lib.setup(cfg, str(workdir))
  _, shardings = state_lib.abstract_state(run.model, run.tx, run.mesh, cfg)
  if initial is None:
    initial = train.init_state(run, shardings)
  # A copy: the step donates its input, and `initial` may be used again.
  state = jax.device_put(jax.tree.map(jnp.copy, initial), shardings)
  it = batches.train_iterator(
    run.streams.train,
    batch_size=cfg.batch_size,
    seq_len=cfg.data.seq_len,
    seed=0,
    sampling='random',
  )
  state, metrics = train.Trainer(run, shardings).train(state, next(it)[None])
  return state, float(metrics['loss'][0]), initial


@functools.cache
def random_model(name: str, vocab_size: int, variant: str = '', seed: int = 0, **overrides):
  """A TINY model of family `name` (its first variant by default), with random_params."""
  tiny = models.tiny_configs(name)
  config = tiny[variant or next(iter(tiny))]
  config.update(overrides)
  model = models.get_model(config, vocab_size)
  return model, random_params(model, seed)


def random_params(model, seed: int = 0):
  """Parameters for `model` drawn with numpy, which skips compiling the initializers (seconds
  on CPU); any parameters make a model. Matrices get variance 1 / fan-in (taking every axis
  but the last as input), so logits stay of order one however deep the family's stack. Each
  is drawn from (seed, its path), so a change elsewhere in the tree draws it alike."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))

  def draw(path, s):
    key = zlib.crc32(jax.tree_util.keystr(path).encode())
    rng = np.random.default_rng([seed, key])
    return jnp.asarray(rng.normal(0.0, 1 / math.sqrt(math.prod(s.shape[:-1])), s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes['params']))


def position_jacobian(model, params, tokens_BT, segment_ids_BT=None) -> np.ndarray:
  """[T, T]: |d (the logits at position t) / d (the embeddings of position s)|, summed over
  rows and embedding width, the logits projected on a random vector over the vocabulary
  (logits that are -inf, never predicted, left out); of packed documents, given
  segment_ids_BT."""
  embeddings = model.apply({'params': params}, tokens_BT, segment_ids_BT, method=model.embed)
  weights_V = jax.random.normal(jax.random.key(1), (model.config.vocab_size,))

  def projected_T(x):
    logits_BTV = model.apply({'params': params}, tokens_BT, x, segment_ids_BT)
    return (jnp.where(jnp.isfinite(logits_BTV), logits_BTV, 0.0) @ weights_V).sum(0)

  jac_TBTE = jax.jit(jax.jacrev(projected_T))(embeddings)
  return np.abs(np.asarray(jac_TBTE)).sum(axis=(1, 3))


def whole_documents(data, split: str) -> list[bytes]:
  """A split's documents, each whole (sources stream a large file in pieces)."""
  docs, doc = [], b''
  for text, end in sources.documents(data, split):
    doc += text
    if end:
      docs.append(doc)
      doc = b''
  return docs
