"""Hugging Face's GPT-2 layout and ar_jax's transformer, both ways: configs, weights, and a
run written from a checkpoint directory or read out into one (python -m ar_jax.convert).

GPT-2's layout: Conv1D weights are [in, out]; c_attn's 3 * D outputs are q, k, v, each
H heads of K = D / H; c_proj's D inputs are the heads concatenated.
"""

import json
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from ar_jax import run as run_lib
from ar_jax import state as state_lib
from ar_jax import train, workdir
from ar_jax.errors import ConfigError, check
from ar_jax.interop import hf_files
from ar_jax.workdir import checkpoint, lock

ARCHITECTURE = 'GPT2LMHeadModel'
GELU_TANH = ('gelu_new', 'gelu_pytorch_tanh')  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
# Buffers of old GPT-2 checkpoints (the causal mask), not weights.
IGNORED_SUFFIXES = ('.attn.bias', '.attn.masked_bias')
# GPT2LMHeadModel's names; a GPT2Model checkpoint (the original 'gpt2') lacks 'transformer.'.
PREFIXES = ('transformer.', 'lm_head.')


def read_config(hf_dir: str) -> dict:
  """DIR's config.json, refused unless it is an architecture ar_jax's transformer computes
  exactly."""
  path = os.path.join(hf_dir, 'config.json')
  check(os.path.isfile(path), f'{hf_dir} is not a Hugging Face model directory: no config.json')
  try:
    with open(path, 'rb') as f:
      hf = json.loads(f.read())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f'{path} is not a JSON file ({e})') from e
  check(isinstance(hf, dict), f'{path} holds a JSON {type(hf).__name__}, not an object')
  archs = hf.get('architectures') or [f'model_type={hf.get("model_type")!r}']
  check(
    ARCHITECTURE in archs or (hf.get('architectures') is None and hf.get('model_type') == 'gpt2'),
    f'{path}: config.architectures is {archs}; ar_jax imports {ARCHITECTURE} (GPT-2) only',
  )
  unsupported = {
    'activation_function': (hf.get('activation_function', 'gelu_new'), GELU_TANH),
    'layer_norm_epsilon': (hf.get('layer_norm_epsilon', 1e-5), (1e-5,)),
    'scale_attn_weights': (hf.get('scale_attn_weights', True), (True,)),
    'scale_attn_by_inverse_layer_idx': (hf.get('scale_attn_by_inverse_layer_idx', False), (False,)),
    'add_cross_attention': (hf.get('add_cross_attention', False), (False,)),
  }
  for name, (value, allowed) in unsupported.items():
    check(value in allowed, f'{path}: {name}={value!r}; ar_jax computes only {allowed}')
  for name in ('vocab_size', 'n_positions', 'n_embd', 'n_layer', 'n_head'):
    value = hf.get(name)
    check(
      isinstance(value, int) and not isinstance(value, bool) and value > 0,
      f'{path}: {name}={value!r}; it must be a positive integer',
    )
  return hf


def experiment_config(hf_dir: str, data: str = '') -> ml_collections.ConfigDict:
  """The run config for fine-tuning hf_dir's model (experiments/hf_gpt2.py, and
  ar_jax.convert --from_hf without --config): the model from its config.json, tokens by its
  tokenizer.json, on `data` (a directory, file or glob of text, JSONL or Parquet files;
  default the embedded corpus of Python source)."""
  from ar_jax.config import defaults  # here: config imports the models, as this module does

  hf = read_config(hf_dir)
  c = defaults()
  c.model.update(model_fields(hf))
  c.model.dropout = 0.0
  c.data.tokenizer = 'bpe'
  c.data.tokenizer_path = os.path.join(hf_dir, 'tokenizer.json')
  c.data.invalid_utf8 = 'skip'  # BPE reads text: the embedded corpus's 4 non-UTF-8 files go
  if data:
    c.data.name = 'files'
    c.data.path = data
  c.data.seq_len = min(256, hf['n_positions'])
  # Fine-tuning: a small batch and learning rate, a short warmup, few steps.
  c.batch_size = 8
  c.num_train_steps = 500
  c.optim.learning_rate = 1e-4
  c.optim.min_learning_rate = 1e-5
  c.optim.warmup_steps = 50
  c.eval_every_steps = 250
  c.eval_batches = 20
  c.checkpoint_every_steps = 250
  return c


def model_fields(hf: dict) -> dict:
  """config.model for a GPT-2 config.json."""
  return dict(
    name='transformer',
    num_layers=hf['n_layer'],
    num_heads=hf['n_head'],
    d_model=hf['n_embd'],
    d_ff=hf.get('n_inner') or 0,
    max_len=hf['n_positions'],
    pos_encoding='learned',
    tie_embeddings=hf.get('tie_word_embeddings', True),
    use_bias=True,
  )


def _block(i: int) -> dict[str, tuple[str, str]]:
  """ar_jax's name in block i -> (GPT-2's name, how its array maps)."""
  h = f'transformer.h.{i}.'
  return {
    'ln_attn/scale': (h + 'ln_1.weight', 'same'),
    'ln_attn/bias': (h + 'ln_1.bias', 'same'),
    'attn/qkv/kernel': (h + 'attn.c_attn.weight', 'qkv'),
    'attn/qkv/bias': (h + 'attn.c_attn.bias', 'qkv'),
    'attn/out/kernel': (h + 'attn.c_proj.weight', 'heads_in'),
    'attn/out/bias': (h + 'attn.c_proj.bias', 'same'),
    'ln_mlp/scale': (h + 'ln_2.weight', 'same'),
    'ln_mlp/bias': (h + 'ln_2.bias', 'same'),
    'mlp_in/kernel': (h + 'mlp.c_fc.weight', 'same'),
    'mlp_in/bias': (h + 'mlp.c_fc.bias', 'same'),
    'mlp_out/kernel': (h + 'mlp.c_proj.weight', 'same'),
    'mlp_out/bias': (h + 'mlp.c_proj.bias', 'same'),
  }


def _names(model_cfg) -> dict[str, tuple[str, str]]:
  """Every ar_jax parameter of an unscanned transformer -> (GPT-2's name, mapping)."""
  names = {
    'embed/embedding': ('transformer.wte.weight', 'same'),
    'pos_embed': ('transformer.wpe.weight', 'same'),
    'ln_out/scale': ('transformer.ln_f.weight', 'same'),
    'ln_out/bias': ('transformer.ln_f.bias', 'same'),
  }
  if not model_cfg.tie_embeddings:
    names['head/kernel'] = ('lm_head.weight', 'transposed')
  for i in range(model_cfg.num_layers):
    names.update({f'block_{i}/{k}': v for k, v in _block(i).items()})
  return names


def _to_ar_jax(array: np.ndarray, how: str, shape: tuple[int, ...]) -> np.ndarray:
  if how == 'transposed':
    array = array.T
  return array.reshape(shape)  # 'qkv' and 'heads_in' split GPT-2's flat axis into heads


def _from_ar_jax(array: np.ndarray, how: str) -> np.ndarray:
  if how == 'transposed':
    return array.T
  if how == 'qkv':  # [D, 3, H, K] -> [D, 3 * H * K]; its bias [3, H, K] -> [3 * H * K]
    return array.reshape(*array.shape[: array.ndim - 3], -1)
  if how == 'heads_in':  # [H, K, D] -> [H * K, D]
    return array.reshape(-1, array.shape[-1])
  return array


def _flat(params) -> dict[str, object]:
  """{'a/b/c': leaf} of a parameter tree; a scanned stack ('blocks', leading layer axis)
  appears as block_0 .. block_{L-1}."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = '/'.join(p.key for p in path)
    if not name.startswith('blocks/'):
      flat[name] = leaf
      continue
    for i in range(leaf.shape[0]):
      layer = (
        jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
        if isinstance(leaf, jax.ShapeDtypeStruct)
        else leaf[i]
      )
      flat[f'block_{i}/{name.removeprefix("blocks/")}'] = layer
  return flat


def _named(tensors: dict) -> dict:
  """GPT2LMHeadModel's names (GPT2Model's lack 'transformer.'), buffers left out."""
  return {
    k if k.startswith(PREFIXES) else f'transformer.{k}': v
    for k, v in tensors.items()
    if not k.endswith(IGNORED_SUFFIXES)
  }


def tensor_shapes(hf_dir: str) -> dict[str, tuple[int, ...]]:
  """Every tensor's shape by its GPT2LMHeadModel name, from the files' headers alone."""
  return _named(hf_files.tensor_shapes(hf_dir))


def read_weights(hf_dir: str) -> dict[str, np.ndarray]:
  """GPT-2's tensors by their GPT2LMHeadModel names, as float32 numpy arrays."""
  return {k: np.asarray(v, np.float32) for k, v in _named(hf_files.read_tensors(hf_dir)).items()}


def check_sizes(hf: dict, shapes: dict[str, tuple[int, ...]], where: str) -> None:
  """config.json's sizes against the weights' shapes, before any model is built from it: a
  config that names more layers or a wider model than its weights hold is refused here, not
  after minutes of building it."""
  layers = {int(k.split('.')[2]) for k in shapes if k.startswith('transformer.h.')}
  check(
    layers == set(range(len(layers))) and hf.get('n_layer') == len(layers),
    f'{where}: config.json has n_layer={hf.get("n_layer")}; the weights hold {len(layers)} layers',
  )
  implied = {
    'transformer.wte.weight': (hf.get('vocab_size'), hf.get('n_embd')),
    'transformer.wpe.weight': (hf.get('n_positions'), hf.get('n_embd')),
  }
  if layers:
    implied['transformer.h.0.mlp.c_fc.weight'] = (
      hf.get('n_embd'),
      hf.get('n_inner') or 4 * (hf.get('n_embd') or 0),
    )
  for name, expected in implied.items():
    check(name in shapes, f'{where}: the weights have no tensor {name}')
    check(
      tuple(shapes[name]) == expected,
      f'{where}: {name} has shape {tuple(shapes[name])}; config.json implies {expected}: the '
      'checkpoint and its config disagree',
    )


def params_from_hf(tensors: dict[str, np.ndarray], model_cfg, abstract_params):
  """ar_jax's parameter tree (the structure and shapes of abstract_params) from GPT-2's
  tensors; every tensor must be used and have the shape its config implies."""
  names = _names(model_cfg)
  tied = model_cfg.tie_embeddings
  extra = set(tensors) - {hf for hf, _ in names.values()} - ({'lm_head.weight'} if tied else set())
  check(not extra, f'tensors that GPT-2 with this config.json does not have: {sorted(extra)[:5]}')
  values = {}
  for name, leaf in _flat(abstract_params).items():
    hf_name, how = names[name]
    check(hf_name in tensors, f'the checkpoint has no tensor {hf_name}')
    shape = tuple(leaf.shape)
    array = tensors[hf_name]
    expected = _from_ar_jax(np.empty(shape, np.int8), how).shape  # GPT-2's shape of it
    check(
      array.shape == expected,
      f'{hf_name} has shape {array.shape}; config.json implies {expected}: the checkpoint and '
      'its config disagree',
    )
    values[name] = _to_ar_jax(array, how, shape)

  def fill(path, leaf):
    name = '/'.join(p.key for p in path)
    if name.startswith('blocks/'):  # scanned: stack the layers
      layer = name.removeprefix('blocks/')
      return np.stack([values[f'block_{i}/{layer}'] for i in range(leaf.shape[0])])
    return values[name]

  return jax.tree_util.tree_map_with_path(fill, abstract_params)


def to_hf_config(model_cfg, vocab_size: int, eos_id: int | None) -> dict:
  return {
    'architectures': [ARCHITECTURE],
    'model_type': 'gpt2',
    'vocab_size': vocab_size,
    'n_positions': model_cfg.max_len,
    'n_embd': model_cfg.d_model,
    'n_layer': model_cfg.num_layers,
    'n_head': model_cfg.num_heads,
    'n_inner': model_cfg.d_ff or None,
    'activation_function': 'gelu_new',
    'layer_norm_epsilon': 1e-5,
    'resid_pdrop': model_cfg.dropout,
    'embd_pdrop': model_cfg.dropout,
    'attn_pdrop': model_cfg.dropout,
    'tie_word_embeddings': model_cfg.tie_embeddings,
    'bos_token_id': eos_id,
    'eos_token_id': eos_id,
  }


def import_run(hf_dir: str, config: ml_collections.ConfigDict, run_dir: str) -> None:
  """Writes run_dir as ar_jax.main would at step 0, with hf_dir's weights."""
  hf = read_config(hf_dir)
  check_sizes(hf, tensor_shapes(hf_dir), hf_dir)
  wanted = model_fields(hf)
  differ = {k: (config.model.get(k), v) for k, v in wanted.items() if config.model.get(k) != v}
  check(not differ, f'config.model differs from {hf_dir}/config.json: {differ}')
  check(
    not os.path.exists(os.path.join(run_dir, 'config.json')),
    f'workdir {run_dir} already holds a run; import into a new one',
  )
  run = run_lib.setup(config, run_dir, train=False, evaluation=False)
  check(
    run.tokenizer.vocab_size == hf['vocab_size'],
    f'{hf_dir}: config.json has vocab_size={hf["vocab_size"]}, its tokenizer '
    f'{run.tokenizer.vocab_size} tokens; ar_jax needs them equal',
  )
  abstract, shardings = state_lib.abstract_state(run.model, run.tx, run.mesh, config)
  params = params_from_hf(read_weights(hf_dir), run.model.config, abstract.params)
  state = train.init_state(run, shardings)
  state = state.replace(params=jax.device_put(params, shardings.params))
  with lock.held(run_dir, 'an import (ar_jax.convert)'), checkpoint.Checkpointer(run_dir) as ckpt:
    workdir.prepare(run_dir, config, run.tokenizer, restart=False)
    ckpt.save(0, state, {}, train.checkpoint_meta(run))  # {}: no data read yet
    ckpt.wait()


def export_run(run_dir: str, out: str, overwrite: bool = False) -> None:
  """Writes out/config.json, out/model.safetensors and the run's tokenizer: into a new folder
  beside `out`, renamed to `out` when whole. An existing `out` must be empty, or is replaced
  with `overwrite`; a run directory (a workdir) never is."""
  path = os.path.join(run_dir, 'config.json')
  check(os.path.isfile(path), f'{run_dir} is not a run directory: it has no config.json')
  hf_files.check_export_target(out, overwrite)
  with open(path) as f:
    model_cfg = json.load(f)['model']
  check(
    model_cfg['name'] == 'transformer'
    and model_cfg.get('pos_encoding') == 'learned'
    and model_cfg.get('use_bias', True),
    f'{run_dir} is a model.name={model_cfg["name"]!r} run'
    + (
      f' (pos_encoding={model_cfg.get("pos_encoding")!r}, use_bias={model_cfg.get("use_bias")})'
      if model_cfg['name'] == 'transformer'
      else ''
    )
    + "; export supports GPT-2's architecture: model.name='transformer', "
    "pos_encoding='learned', use_bias=True",
  )
  save_file = hf_files.safetensors().save_file
  model, params, tokenizer, _ = workdir.load(run_dir)
  names = _names(model.config)
  tensors = {
    names[k][0]: np.ascontiguousarray(_from_ar_jax(np.asarray(v, np.float32), names[k][1]))
    for k, v in _flat(jax.device_get(nn.unbox(params))).items()
  }

  def write(folder):
    save_file(tensors, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(folder, 'config.json'), 'w') as f:
      json.dump(to_hf_config(model.config, tokenizer.vocab_size, tokenizer.eos_id), f, indent=2)
    if getattr(tokenizer, 'kind', None) == 'bpe':
      with open(os.path.join(folder, 'tokenizer.json'), 'w') as f:
        f.write(tokenizer.model)
    else:  # a character, byte or SentencePiece vocabulary has no tokenizer.json of GPT-2's kind
      tokenizer.save(os.path.join(folder, 'ar_jax_tokenizer.json'))

  hf_files.write_whole(out, write)
