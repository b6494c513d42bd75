"""Bad input on the command line: one clear message and a non-zero exit, never a traceback
from deep inside JAX, and nothing written into the workdir. (More cases, for sampling and
config args, are in tests/test_cli.py.)"""

import sys

import pytest

from tests.faults.runner import one_line_error, run, run_command, sample_command
from tests.helpers import read_jsonl


@pytest.mark.parametrize(
  'overrides, message',
  [
    (['--config.batch_size=12.5'], 'batch_size'),  # a float for an int field
    (['--config.batch_size=-4'], 'batch_size must be positive, got -4'),
    (['--config.eval_batches=-1'], 'eval_batches must be >= 0 (0 = the default), got -1'),
    (['--config.model.d_model=0'], 'model.d_model must be positive, got 0'),
    (['--config.mesh.tensor=16'], 'tensor=16 needs 16 devices; 1 are present'),
    (['--config.data.train_split=training'], "split 'training' does not exist for files"),
    (['--config.model.num_heads=3'], 'model.num_heads=3 does not divide model.d_model=16'),
    (['--config.nan_policy=ignore'], "nan_policy='ignore'; allowed: stop, skip"),
    (['--config.optim.warmup_steps=-1'], 'optim.warmup_steps must be >= 0, got -1'),
    # Found before the first step, not when the end-of-run sample is drawn.
    (['--config.sample.prompt=Zebra'], "sample.prompt='Zebra': character(s) 'Z' are not in"),
  ],
)
def test_bad_values_fail_with_one_message(corpus, tmp_path, overrides, message):
  out = run(corpus, tmp_path / 'run', *overrides, check=False)
  one_line_error(out)
  assert message in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / 'run').exists()


def test_invalid_utf8_at_character_level_is_named(tmp_path):
  bad = tmp_path / 'latin1.txt'
  bad.write_bytes('caf\xe9 au lait\n'.encode('latin-1') * 50)
  out = run(bad, tmp_path / 'run', check=False)
  one_line_error(out)
  assert 'is not valid UTF-8 at byte 3' in out.stderr
  assert "data.tokenizer='byte'" in out.stderr


def test_data_shorter_than_a_window_writes_nothing_and_the_fix_runs(tmp_path):
  short = tmp_path / 'short.txt'
  short.write_text('to be or not ')
  prompt = '--config.sample.prompt=to'
  out = run(short, tmp_path / 'run', prompt, check=False)
  one_line_error(out)
  assert 'too few for one window of seq_len + 1 = 17' in out.stderr
  assert not (tmp_path / 'run').exists()
  run(short, tmp_path / 'run', prompt, '--config.data.seq_len=4', '--config.num_train_steps=2')


def test_a_shortened_run_scales_its_warmup(corpus, tmp_path):
  # warmup_steps=100 is past the end of a 10-step run: a tenth of it is used instead.
  out = run(
    corpus,
    tmp_path,
    '--config.num_train_steps=10',
    '--config.optim.decay_steps=0',
    '--config.optim.warmup_steps=100',
  )
  assert 'warming up over 1 steps (a tenth) instead' in out.stderr
  logged = read_jsonl(tmp_path / 'metrics.jsonl')
  rates = [m['train/learning_rate'] for m in logged if 'train/learning_rate' in m]
  assert rates[1] == max(rates)  # the peak, right after the one warmup step


@pytest.mark.parametrize(
  'text, message',
  [
    (None, "--config: [Errno 2] No such file or directory: 'tests/faults/nope.py'"),
    ('def get_config(:\n', 'broken.py, line 1: SyntaxError: invalid syntax'),
    (
      'def get_config(arg=None):\n  raise RuntimeError("boom")\n',
      'broken.py, line 2: RuntimeError: boom',
    ),
    ('import no_such_module\n', "broken.py, line 1: ModuleNotFoundError: No module named 'no_such"),
  ],
)
def test_a_broken_experiment_file_is_one_line(tmp_path, text, message):
  path = 'tests/faults/nope.py'
  if text is not None:
    path = tmp_path / 'broken.py'
    path.write_text(text)
  cli = [sys.executable, '-m', 'ar_jax.main', f'--config={path}', f'--workdir={tmp_path}/run']
  out = run_command(cli, check=False)
  one_line_error(out)
  assert message in out.stderr


def test_an_arg_to_an_experiment_without_variants_is_named(tmp_path):
  cli = [sys.executable, '-m', 'ar_jax.main', '--config=experiments/quickstart.py:model=foo']
  out = run_command([*cli, f'--workdir={tmp_path}'], check=False)
  one_line_error(out)
  assert "this experiment takes no config arg, got 'model=foo'" in out.stderr


@pytest.mark.parametrize(
  'flags, message',
  [
    (['--beam_size=0'], 'flag --beam_size=0: 0 is not a positive integer'),
    (['--beam_size=-3'], 'flag --beam_size=-3: -3 is not a positive integer'),
    (['--num_samples=0'], 'flag --num_samples=0'),
    (['--max_new_tokens=0'], 'flag --max_new_tokens=0'),
    (['--top_k=-1'], 'flag --top_k=-1'),
    (['--prompts_file=LATIN1'], 'is not valid UTF-8 at byte 3'),
  ],
)
def test_bad_sampling_flags_fail_before_loading_anything(tmp_path, flags, message):
  latin1 = tmp_path / 'prompts.txt'
  latin1.write_bytes('caf\xe9\n'.encode('latin-1'))
  flags = [f.replace('LATIN1', str(latin1)) for f in flags]
  out = run_command(sample_command(tmp_path / 'no_run_here', *flags), check=False)
  one_line_error(out)
  assert message in out.stderr
