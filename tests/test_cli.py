"""The command line, end to end, in subprocesses with one CPU device (as a user runs it)."""

import logging as py_logging
import os
import pathlib
import sys

import jax
import pytest

from ar_jax import cli
from ar_jax.monitor import flops
from tests import helpers
from tests.helpers import REPO, read_jsonl

# The quickstart config, shrunk to seconds. The cosine length is fixed (decay_steps) so a
# run stopped at step 4 and resumed to 8 has the same schedule as one run straight to 8.
SHRINK = [
  '--config.num_train_steps=8',
  '--config.optim.decay_steps=8',
  '--config.optim.warmup_steps=2',
  '--config.model.num_layers=1',
  '--config.model.d_model=32',
  '--config.model.num_heads=2',
  '--config.model.max_len=64',
  '--config.data.seq_len=32',
  '--config.batch_size=4',
  '--config.log_every_steps=2',
  '--config.eval_every_steps=4',
  '--config.eval_batches=2',
  '--config.checkpoint_every_steps=4',
  '--config.steps_per_dispatch=2',
  '--config.sample.max_new_tokens=16',
]


def ar_jax(module, *args, check=True):
  env = helpers.subprocess_env()  # one device
  out = helpers.run(
    [sys.executable, '-m', f'ar_jax.{module}', *args], cwd=REPO, env=env, timeout=300
  )
  if check:
    assert out.returncode == 0, out.stderr[-3000:]
  return out


def train_cli(workdir, *extra, config='experiments/quickstart.py', check=True):
  return ar_jax('main', f'--config={config}', f'--workdir={workdir}', *SHRINK, *extra, check=check)


def losses(workdir):
  lines = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return {m['step']: m['train/loss'] for m in lines if 'train/loss' in m}


@pytest.fixture(scope='module')
def resumed_run(tmp_path_factory):
  """Quickstart stopped at step 4, then started again with the same workdir to step 8."""
  workdir = str(tmp_path_factory.mktemp('resumed'))
  train_cli(workdir, '--config.num_train_steps=4')
  train_cli(workdir)
  return workdir


def test_resumed_run_equals_uninterrupted_run(resumed_run, tmp_path):
  straight = str(tmp_path / 'straight')
  console = train_cli(straight).stderr
  # The first lines say where the run writes, the last where its results are.
  assert f'workdir {straight}: config.json, tokenizer.json, checkpoints/' in console
  assert f'results in {straight}: final.json' in console.splitlines()[-1]
  assert sorted(losses(resumed_run)) == [2, 4, 6, 8]
  assert losses(resumed_run) == losses(straight)  # bit for bit


def test_workdir_holds_the_run(resumed_run):
  names = set(os.listdir(resumed_run))
  assert {
    'config.json',
    'tokenizer.json',
    'metrics.jsonl',
    'samples.txt',
    'checkpoints',
    'tensorboard',
  } <= names
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(f'{resumed_run}/tensorboard'))
  steps = sorted(int(s) for s in os.listdir(f'{resumed_run}/checkpoints') if s.isdigit())
  assert steps == [4, 8]
  logged = read_jsonl(f'{resumed_run}/metrics.jsonl')
  keys = set().union(*logged)
  assert {
    'train/loss',
    'train/tokens_per_sec',
    'train/mfu',
    'eval/loss',
    'eval/bits_per_byte',
  } <= keys
  evals = [m for m in logged if 'eval/loss' in m]
  assert [m['step'] for m in evals] == [4, 8]
  assert evals[0]['eval/bits_per_byte'] == pytest.approx(evals[0]['eval/loss'] / 0.6931471805599453)
  assert pathlib.Path(resumed_run, 'samples.txt').read_text().count('=== step') == 2


def test_sample_cli_continues_the_prompt(resumed_run):
  args = [f'--workdir={resumed_run}', '--prompt=def ', '--max_new_tokens=20']
  greedy = ar_jax('sample', *args, '--temperature=0').stdout
  assert greedy.startswith('def ')
  assert greedy == ar_jax('sample', *args, '--temperature=0', '--seed=5').stdout
  sampled = [ar_jax('sample', *args, '--top_k=5', f'--seed={s}').stdout for s in (0, 0, 1)]
  assert sampled[0] == sampled[1] and sampled[0].startswith('def ')


def test_sampling_past_the_context_is_one_clear_error(resumed_run):
  out = ar_jax(
    'sample', f'--workdir={resumed_run}', '--prompt=def ', '--max_new_tokens=100', check=False
  )
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert "exceeds the model's context of 64 positions" in out.stderr


def test_prompt_outside_the_vocabulary_is_named(tmp_path, text_file):
  workdir = str(tmp_path / 'chars')
  train_cli(
    workdir,
    '--config.data.name=files',
    f'--config.data.path={text_file}',
    '--config.data.tokenizer=char',
    '--config.num_train_steps=2',
  )
  out = ar_jax('sample', f'--workdir={workdir}', '--prompt=Zebra!', check=False)
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert "character(s) '!Z' are not in the vocabulary" in out.stderr


@pytest.mark.parametrize(
  'extra, message',
  [
    (['--config.model.depth=3'], 'depth'),  # not a key of the locked config
    (['--config.batch_size=many'], 'batch_size'),
    (
      ['--config.mesh.data=3'],
      'mesh stage=1, data=3, fsdp=1, tensor=1 needs 3 devices; 1 are present',
    ),
    (['--verbosity=loud'], "flag --verbosity=loud: invalid literal for int() with base 10: 'loud'"),
  ],
)
def test_bad_command_lines_fail_with_one_message(tmp_path, extra, message):
  out = train_cli(str(tmp_path / 'bad'), *extra, check=False)
  assert out.returncode != 0
  assert message in out.stderr
  assert 'Traceback' not in out.stderr
  assert not (tmp_path / 'bad').exists()


def test_bad_config_arg_is_named(tmp_path):
  out = train_cli(
    str(tmp_path / 'bad'), config='experiments/shakespeare_char.py:preset=tiny', check=False
  )
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert "preset='tiny'; allowed: nanogpt_cpu, nanogpt_gpu" in out.stderr


def test_sample_cli_writes_samples_and_beams_of_a_prompts_file(resumed_run, tmp_path):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('def \nimport os\n')
  args = [f'--workdir={resumed_run}', f'--prompts_file={prompts}', '--max_new_tokens=12']
  ar_jax('sample', *args, '--num_samples=2', '--top_k=5', f'--output={tmp_path}/s.jsonl')
  samples = read_jsonl(tmp_path / 's.jsonl')
  assert [(r['prompt'], r['sample']) for r in samples] == [
    ('def ', 0),
    ('def ', 1),
    ('import os', 0),
    ('import os', 1),
  ]
  for r in samples:
    assert 1 <= len(r['tokens']) == len(r['log_probs']) <= 12
    assert all(lp <= 0 for lp in r['log_probs'])
    assert r['score'] == pytest.approx(r['log_prob']) == pytest.approx(sum(r['log_probs']))

  beam_args = ['--beam_size=3', '--num_samples=2', '--length_penalty=1.0']
  out = ar_jax('sample', *args, *beam_args, f'--output={tmp_path}/b.jsonl')
  beams = read_jsonl(tmp_path / 'b.jsonl')
  assert [(r['prompt'], r['sample']) for r in beams] == [
    (r['prompt'], r['sample']) for r in samples
  ]
  assert out.stdout.count('=== prompt ') == 4
  for best, second in (beams[:2], beams[2:]):
    assert best['score'] >= second['score']
  for r in beams:
    penalty = (5 + len(r['tokens'])) / 6
    assert r['score'] == pytest.approx(r['log_prob'] / penalty, rel=1e-5)


def test_a_measured_peak_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
  """MFU on a CPU divides by a measured matmul rate: measured once, so runs compare."""
  monkeypatch.setattr(flops, 'CACHE_DIR', str(tmp_path))
  measured = []
  rates = {'float32': 7e9, 'bfloat16': 20e9}
  monkeypatch.setattr(flops, 'measured_matmul_flops', lambda d: measured.append(d) or rates[d])
  first, source = flops.peak_flops(jax.devices()[0])
  assert (first, measured) == (7e9, ['float32']) and str(tmp_path) in source
  # A bf16 run's MFU divides by the bf16 rate, measured once too.
  assert flops.peak_flops(jax.devices()[0], 'bfloat16')[0] == 20e9
  monkeypatch.setattr(flops, 'measured_matmul_flops', lambda d: 1 / 0)
  assert flops.peak_flops(jax.devices()[0])[0] == 7e9
  assert flops.peak_flops(jax.devices()[0], 'bfloat16')[0] == 20e9


def test_the_console_keeps_ar_jax_info_by_logger_name_not_by_path():
  """A virtual environment inside a folder named ar_jax puts every library under '/ar_jax/':
  the filter goes by logger name, so the libraries' INFO stays out."""
  keep = cli._OwnInfoOnly().filter
  record = lambda name, path, level=py_logging.INFO: py_logging.LogRecord(
    name, level, path, 1, 'message', (), None
  )
  library = '/home/me/ar_jax/.venv/lib/python3.11/site-packages/orbax/checkpoint/manager.py'
  assert keep(record('ar_jax.train', '/home/me/ar_jax/ar_jax/train.py'))
  assert not keep(record('absl', library))
  assert not keep(record('jax._src.xla_bridge', library))
  assert keep(record('absl', library, py_logging.WARNING))  # warnings always pass
