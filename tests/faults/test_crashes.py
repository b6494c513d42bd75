"""Faults a cluster job meets while it trains: kill -9, preemption signals (also during a long
evaluation), NaN, a full disk, an unwritable workdir. Each case runs the real command line in
a subprocess and checks that nothing is lost and the loss trajectory is the uninterrupted one."""

import random
import shutil
import signal
import time

import pytest

from tests.faults.runner import (
  TIMEOUT,
  logged_step,
  losses,
  one_line_error,
  run,
  started,
  steps_on_disk,
  wait_for,
)
from tests.helpers import read_jsonl


def test_kill_9_at_a_random_step_then_resume_is_bit_for_bit(corpus, reference, tmp_path):
  target = random.Random().randint(25, 100)
  with started(corpus, tmp_path) as proc:
    wait_for(lambda: logged_step(tmp_path) >= target, proc, f'step {target}')
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
  assert logged_step(tmp_path) < 120, 'the run finished before it could be killed'
  run(corpus, tmp_path)
  assert losses(tmp_path) == reference  # every step, once, bit for bit


def test_kill_9_while_a_checkpoint_is_written(corpus, reference, tmp_path):
  checkpoints = tmp_path / 'checkpoints'
  writing = lambda: (
    checkpoints.exists()
    and any('tmp' in p.name for p in checkpoints.iterdir() if p.name.startswith('40'))
  )
  with started(corpus, tmp_path) as proc:
    wait_for(writing, proc, 'the checkpoint at step 40 to be in flight')
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
  assert 40 not in steps_on_disk(tmp_path)  # the half-written step is not a checkpoint
  out = run(corpus, tmp_path)
  assert 'resumed from the checkpoint at step 20' in out.stderr
  assert not [p for p in checkpoints.iterdir() if 'tmp' in p.name]  # debris cleaned up
  assert losses(tmp_path) == reference


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_preemption_signal_saves_and_exits_0(corpus, reference, tmp_path, signum):
  with started(corpus, tmp_path) as proc:
    wait_for(lambda: logged_step(tmp_path) >= 30, proc, 'step 30')
    sent = time.time()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 0, stderr[-2000:]
  assert time.time() - sent < 30
  stopped_at = logged_step(tmp_path)
  assert stopped_at < 120 and steps_on_disk(tmp_path)[-1] == stopped_at
  assert f'at step {stopped_at}: checkpoint saved' in stderr
  out = run(corpus, tmp_path)
  assert f'resumed from the checkpoint at step {stopped_at}' in out.stderr
  assert losses(tmp_path) == reference


# A long evaluation at step 20: every token of a validation split that holds 90% of a large
# corpus, one short window at a time (about a minute on a 2-core CPU).
LONG_EVAL = (
  '--config.eval_every_steps=20',
  '--config.eval_batches=0',
  '--config.eval_batch_size=1',
  '--config.data.val_fraction=0.9',
)


def test_sigterm_during_a_long_evaluation_is_prompt_and_the_evaluation_resumes(corpus, tmp_path):
  big = tmp_path / 'big.txt'
  big.write_text((corpus.read_text() + '\n') * 60)
  workdir = tmp_path / 'run'
  with started(big, workdir, *LONG_EVAL) as proc:
    wait_for(lambda: logged_step(workdir) >= 20, proc, 'step 20')
    time.sleep(2)  # well into the evaluation
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    took = time.time() - sent
  assert proc.returncode == 0, stderr[-2000:]
  assert 'eval at step 20: abandoned for a stop request' in stderr
  assert took < 15, f'{took:.1f} s from SIGTERM to exit'
  assert steps_on_disk(workdir) == [20]
  assert not any('eval/loss' in m for m in read_jsonl(workdir / 'metrics.jsonl'))
  # The abandoned evaluation is the first thing the resumed run does.
  out = run(big, workdir, *LONG_EVAL, '--config.eval_batches=2', '--config.num_train_steps=22')
  assert 'eval at step 20: loss' in out.stderr
  evals = [m['step'] for m in read_jsonl(workdir / 'metrics.jsonl') if 'eval/loss' in m]
  assert evals == [20, 22]


# A learning rate of 1e30 without clipping: the first update makes the second loss NaN.
DIVERGE = (
  '--config.optim.learning_rate=1e30',
  '--config.optim.warmup_steps=0',
  '--config.optim.grad_clip_norm=0',
)


@pytest.mark.slow
def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
  out = run(corpus, tmp_path, *DIVERGE, '--config.checkpoint_every_steps=1', check=False)
  one_line_error(out)
  assert 'non-finite training loss (nan) or gradient norm' in out.stderr
  assert 'at step 2, on training batch 1' in out.stderr
  assert 'the last checkpoint, step 1, predates it' in out.stderr
  assert steps_on_disk(tmp_path) == [1]


def test_nan_evaluation_stops_before_it_is_written(corpus, tmp_path):
  # The parameters after one step of a diverging optimizer are finite but huge.
  out = run(corpus, tmp_path, *DIVERGE, '--config.eval_every_steps=1', check=False)
  one_line_error(out)
  assert 'non-finite evaluation loss (nan) at step 1; no checkpoint was written before it' in (
    out.stderr
  )
  assert [m['step'] for m in read_jsonl(tmp_path / 'metrics.jsonl')] == [1]  # its train line
  assert steps_on_disk(tmp_path) == []


def test_nan_skip_policy_counts_skipped_steps(corpus, tmp_path):
  out = run(corpus, tmp_path, *DIVERGE, '--config.nan_policy=skip', '--config.num_train_steps=10')
  logged = [m for m in read_jsonl(tmp_path / 'metrics.jsonl') if 'train/skipped_steps' in m]
  assert logged[0]['train/skipped_steps'] == 0.0  # step 1 was finite
  assert sum(m['train/skipped_steps'] for m in logged) == 9.0
  assert 'Traceback' not in out.stderr


def test_unwritable_workdir_fails_before_training(corpus, tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  out = run(corpus, blocker / 'run', check=False)
  one_line_error(out)
  assert 'is not writable' in out.stderr and 'step 1' not in out.stderr


@pytest.mark.slow
def test_full_disk_before_a_save_stops_there_in_one_line(corpus, tmp_path, small_filesystem):
  """The disk fills up between two checkpoints (dd, another job): the save at step 40
  finds no room, the run stops there, and the checkpoint at step 20 is intact."""
  with small_filesystem(tmp_path / 'disk', 'size=2M') as disk:
    run(corpus, disk / 'run', '--config.num_train_steps=20')
    # Leaves room for the run to start and log, not for another checkpoint.
    (disk / 'filler').write_bytes(b'\0' * (shutil.disk_usage(disk).free - 64 * 1024))
    out = run(corpus, disk / 'run', '--config.num_train_steps=60', check=False)
    one_line_error(out)
    assert f'saving the checkpoint at step 40 to {disk}/run/checkpoints failed' in out.stderr
    assert 'No space left' in out.stderr
    assert 'the earlier checkpoints (steps [20]) are intact' in out.stderr
    assert logged_step(disk / 'run') == 40  # stopped at the failed save
    assert steps_on_disk(disk / 'run') == [20]
    (disk / 'filler').unlink()
    run(corpus, disk / 'run', '--config.num_train_steps=60')  # and it goes on from there
    assert steps_on_disk(disk / 'run')[-1] == 60


def test_full_disk_during_a_background_save_stops_before_the_next_save(
  corpus, tmp_path, small_filesystem
):
  """Room for the bytes but not the files (inodes run out): the save at step 40 fails, in
  the background while training goes on or as it starts; the run stops at a step boundary
  before the next save, in one line, and exits within seconds (orbax leaves threads waiting
  on the failed save: they must not hold the process)."""
  with small_filesystem(tmp_path / 'disk', 'size=50M,nr_inodes=30') as disk:
    started_at = time.time()
    out = run(corpus, disk / 'run', '--config.checkpoint_every_steps=40', check=False)
    assert time.time() - started_at < 90
    one_line_error(out)
    assert f'saving the checkpoint at step 40 to {disk}/run/checkpoints failed' in out.stderr
    assert 'none was saved before' in out.stderr
    assert 40 <= logged_step(disk / 'run') < 80
    assert steps_on_disk(disk / 'run') == []
