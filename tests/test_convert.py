"""Hugging Face interop (ar_jax.hf, python -m ar_jax.convert): GPT-2 checkpoints in as runs,
runs out as checkpoints. Checked against transformers' own GPT-2 where PyTorch is installed;
the layout, round trips and refusals need only safetensors."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ar_jax import decode, train, workdir
from ar_jax.config import load_experiment
from ar_jax.data import subword
from ar_jax.errors import ConfigError
from ar_jax.interop import hf
from tests.helpers import REPO, read_jsonl

GPT2 = dict(n_positions=32, n_embd=32, n_layer=2, n_head=4)
TOKENS = jnp.array([[5, 17, 200, 3, 99, 250, 1, 0]])


@pytest.fixture(scope='module')
def tokenizer():
  texts = [
    'def f(x):\n    return x + 1\n' * 40,
    'the quick brown fox jumps over the lazy dog\n' * 40,
  ]
  return subword.train_bpe(iter(texts), 300)


def gpt2_tensors(vocab: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights in GPT2LMHeadModel's names and shapes (Conv1D weights are [in, out])."""
  rng = np.random.default_rng(seed)
  D, F = GPT2['n_embd'], 4 * GPT2['n_embd']
  shapes = {'wte.weight': (vocab, D), 'wpe.weight': (GPT2['n_positions'], D)}
  shapes |= {'ln_f.weight': (D,), 'ln_f.bias': (D,)}
  for i in range(GPT2['n_layer']):
    shapes |= {
      f'h.{i}.{name}': shape
      for name, shape in {
        'ln_1.weight': (D,),
        'ln_1.bias': (D,),
        'attn.c_attn.weight': (D, 3 * D),
        'attn.c_attn.bias': (3 * D,),
        'attn.c_proj.weight': (D, D),
        'attn.c_proj.bias': (D,),
        'ln_2.weight': (D,),
        'ln_2.bias': (D,),
        'mlp.c_fc.weight': (D, F),
        'mlp.c_fc.bias': (F,),
        'mlp.c_proj.weight': (F, D),
        'mlp.c_proj.bias': (D,),
      }.items()
    }
  tensors = {
    f'transformer.{k}': rng.normal(0, 0.2, s).astype(np.float32) for k, s in shapes.items()
  }
  if not tied:
    tensors['lm_head.weight'] = rng.normal(0, 0.2, (vocab, D))
  return {k: v.astype(np.float32) for k, v in tensors.items()}


def write_hf_dir(path: pathlib.Path, tokenizer, tied=True, config=None, tensors=None):
  path.mkdir(parents=True)
  config = {
    'architectures': ['GPT2LMHeadModel'],
    'model_type': 'gpt2',
    'vocab_size': tokenizer.vocab_size,
    'tie_word_embeddings': tied,
    **GPT2,
    **(config or {}),
  }
  (path / 'config.json').write_text(json.dumps(config))
  (path / 'tokenizer.json').write_text(tokenizer.model)
  tensors = gpt2_tensors(tokenizer.vocab_size, tied) if tensors is None else tensors
  save_file(tensors, str(path / 'model.safetensors'), metadata={'format': 'pt'})
  return path


def experiment(hf_dir, arg='', **overrides):
  """experiments/hf_gpt2.py's config for hf_dir, on one device."""
  config = load_experiment(str(REPO / 'experiments' / 'hf_gpt2.py')).get_config(
    f'hf={hf_dir}' + arg
  )
  config.mesh.data = 1
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  return config


def logits(run_dir):
  model, params, _, step = workdir.load(str(run_dir))
  assert step == 0
  return np.asarray(model.apply({'params': params}, TOKENS))


@pytest.mark.parametrize('tied, scan', [(True, False), (False, True)])
def test_import_then_export_gives_back_the_checkpoint(tmp_path, tokenizer, tied, scan):
  source = write_hf_dir(tmp_path / 'hf', tokenizer, tied)
  hf.import_run(str(source), experiment(source, **{'model.scan_layers': scan}), str(tmp_path / 'r'))
  hf.export_run(str(tmp_path / 'r'), str(tmp_path / 'out'))

  before, after = (
    load_file(str(source / 'model.safetensors')),
    load_file(str(tmp_path / 'out' / 'model.safetensors')),
  )
  assert sorted(before) == sorted(after)
  for name in before:
    np.testing.assert_array_equal(before[name], after[name], err_msg=name)
  config = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert {k: config[k] for k in GPT2} == GPT2
  assert config['tie_word_embeddings'] is tied
  assert (tmp_path / 'out' / 'tokenizer.json').read_text() == tokenizer.model
  # The exported directory imports again to the same model.
  hf.import_run(str(tmp_path / 'out'), experiment(tmp_path / 'out'), str(tmp_path / 'again'))
  np.testing.assert_allclose(logits(tmp_path / 'r'), logits(tmp_path / 'again'), atol=1e-6)


def test_an_imported_run_trains_from_the_checkpoint(tmp_path, tokenizer, text_file, caplog):
  source = write_hf_dir(tmp_path / 'hf', tokenizer)
  config = experiment(source, f',data={text_file}', **{'data.seq_len': 16})
  config.num_train_steps, config.batch_size, config.eval_batches = 2, 4, 1
  config.optim.warmup_steps = 1
  hf.import_run(str(source), config, str(tmp_path / 'run'))
  with caplog.at_level('INFO', logger='ar_jax'):
    metrics = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'resumed from the checkpoint at step 0' in caplog.text
  assert [r['step'] for r in read_jsonl(tmp_path / 'run' / 'metrics.jsonl')][-1] == 2
  assert np.isfinite(metrics['eval/loss'])


@pytest.mark.parametrize(
  'config, tensors, message',
  [
    ({'architectures': ['LlamaForCausalLM']}, None, r"architectures is \['LlamaForCausalLM'\]"),
    ({'activation_function': 'relu'}, None, "activation_function='relu'"),
    ({'n_embd': 40, 'n_head': 4}, 'default', 'config.json implies'),
    ({'vocab_size': 512}, 'sized', r'vocab_size=512, its tokenizer \d+ tokens'),
  ],
)
def test_checkpoints_ar_jax_cannot_compute_exactly_are_refused(
  tmp_path, tokenizer, config, tensors, message
):
  if tensors == 'sized':
    tensors = gpt2_tensors(512, True)
  elif tensors == 'default':
    tensors = gpt2_tensors(tokenizer.vocab_size, True)
  source = write_hf_dir(tmp_path / 'hf', tokenizer, config=config, tensors=tensors)
  with pytest.raises(ConfigError, match=message):
    hf.import_run(str(source), experiment(source), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_without_safetensors_the_extra_is_named(tmp_path, tokenizer, monkeypatch):
  source = write_hf_dir(tmp_path / 'hf', tokenizer)
  monkeypatch.setitem(sys.modules, 'safetensors.numpy', None)  # import fails, as uninstalled
  with pytest.raises(ConfigError, match=r"need safetensors: pip install -e '\.\[hf\]'"):
    hf.read_weights(str(source))


def test_an_import_refuses_an_existing_run_and_an_export_other_families(tmp_path, tokenizer):
  source = write_hf_dir(tmp_path / 'hf', tokenizer)
  hf.import_run(str(source), experiment(source), str(tmp_path / 'run'))
  with pytest.raises(ConfigError, match='already holds a run'):
    hf.import_run(str(source), experiment(source), str(tmp_path / 'run'))
  lstm = tmp_path / 'lstm'
  lstm.mkdir()
  (lstm / 'config.json').write_text(json.dumps({'model': {'name': 'lstm'}}))
  with pytest.raises(ConfigError, match="model.name='lstm' run; export supports GPT-2's"):
    hf.export_run(str(lstm), str(tmp_path / 'out'))


def test_logits_and_greedy_text_equal_transformers_gpt2_both_ways(tmp_path, tokenizer):
  torch = pytest.importorskip('torch', reason='the comparison with transformers needs PyTorch')
  transformers = pytest.importorskip('transformers', reason="needs the '[hf]' extra")
  torch.manual_seed(0)
  for tied in (True, False):
    config = transformers.GPT2Config(
      vocab_size=tokenizer.vocab_size,
      tie_word_embeddings=tied,
      bos_token_id=tokenizer.eos_id,
      eos_token_id=tokenizer.eos_id,
      **GPT2,
    )
    reference = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # larger than GPT-2's initialisation: logits far from uniform
      for p in reference.parameters():
        p.add_(torch.randn_like(p) * 0.2)
    source = tmp_path / f'hf_{tied}'
    reference.save_pretrained(source)
    (source / 'tokenizer.json').write_text(tokenizer.model)
    if not tied:  # the other format GPT-2 checkpoints come in
      (source / 'model.safetensors').unlink()
      torch.save(reference.state_dict(), source / 'pytorch_model.bin')
    run = tmp_path / f'run_{tied}'
    hf.import_run(str(source), experiment(source), str(run))

    ids = torch.tensor(np.asarray(TOKENS))
    expected = reference(ids).logits.detach().numpy()
    np.testing.assert_allclose(logits(run), expected, atol=1e-5)
    model, params, _, _ = workdir.load(str(run))
    ours = decode.generate(model, params, TOKENS, 8, jax.random.key(0), temperature=0.0).tokens
    theirs = reference.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    theirs = theirs[0, TOKENS.shape[1] :].numpy()
    assert len(theirs) == 8  # no end-of-text token cut it short
    np.testing.assert_array_equal(np.asarray(ours)[0, TOKENS.shape[1] :], theirs)

    hf.export_run(str(run), str(tmp_path / f'out_{tied}'))
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f'out_{tied}')
    np.testing.assert_allclose(exported(ids).logits.detach().numpy(), logits(run), atol=1e-5)
