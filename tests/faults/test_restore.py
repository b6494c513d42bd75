"""What a run finds in its workdir when it starts: damaged checkpoints (moved aside by a
trainer, skipped by a reader), checkpoints that do not match the config (nothing moved), a
history with nothing to resume from (refused until --allow_restart), a torn metrics line."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from ar_jax import run as run_lib
from ar_jax import state as state_lib
from ar_jax.errors import RunError
from ar_jax.workdir import checkpoint
from tests.faults.run_config import get_config
from tests.faults.runner import (
  corrupt,
  losses,
  one_line_error,
  run,
  run_command,
  sample_command,
  snapshot,
  steps_on_disk,
)
from tests.helpers import read_jsonl


@pytest.fixture(scope='module')
def finished(corpus, tmp_path_factory):
  """A finished 60-step run (checkpoints 20, 40, 60), copied by each test that changes it."""
  workdir = tmp_path_factory.mktemp('finished')
  run(corpus, workdir, '--config.num_train_steps=60')
  return workdir


def copy(finished, tmp_path):
  shutil.copytree(finished, tmp_path / 'run')
  return tmp_path / 'run'


def aside(workdir) -> list[str]:
  return sorted(p.name.split('.')[0] for p in (workdir / 'checkpoints').glob('*.unreadable.*'))


def largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max(
    (step_dir / 'state' / 'ocdbt.process_0' / 'd').iterdir(), key=lambda p: p.stat().st_size
  )


def truncate(path: pathlib.Path) -> None:
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


@pytest.mark.parametrize('damage', ['every file cut short', 'its largest data file cut short'])
def test_corrupted_latest_checkpoint_falls_back_to_the_previous(
  corpus, finished, reference, tmp_path, damage
):
  workdir = copy(finished, tmp_path)
  if damage == 'every file cut short':
    corrupt(workdir / 'checkpoints' / '60')
  else:
    truncate(largest_data_file(workdir / 'checkpoints' / '60'))
  out = run(corpus, workdir, '--config.num_train_steps=80')
  assert 'the checkpoint at step 60 cannot be read' in out.stderr
  assert 'resumed from the checkpoint at step 40' in out.stderr
  assert aside(workdir) == ['60']  # moved aside, not deleted
  assert losses(workdir) == {s: v for s, v in reference.items() if s <= 80}


def test_readers_skip_a_damaged_checkpoint_and_move_nothing(corpus, finished, tmp_path):
  workdir = copy(finished, tmp_path)
  corrupt(workdir / 'checkpoints' / '60')
  before = snapshot(workdir)
  sample = run_command(sample_command(workdir, '--prompt=to', '--max_new_tokens=8'))
  evaluate = run(corpus, workdir, '--mode=eval')
  for out in (sample, evaluate):
    assert 'the checkpoint at step 60 cannot be read' in out.stderr
    assert 'Traceback' not in out.stderr
  assert evaluate.stdout.startswith('step=40.0000 ')
  assert snapshot(workdir) == before


def test_unreadable_checkpoints_refuse_a_restart_until_it_is_asked_for(corpus, tmp_path):
  workdir = tmp_path / 'run'
  run(corpus, workdir, '--config.num_train_steps=20')
  corrupt(workdir / 'checkpoints' / '20')
  history = (workdir / 'metrics.jsonl').read_text()
  for _ in range(2):  # the refusal holds on every try, not only on the one that found them
    out = run(corpus, workdir, check=False)
    one_line_error(out)
    assert 'holds a run with no checkpoint to resume from' in out.stderr
    assert 'checkpoints moved aside as unreadable (20.unreadable.' in out.stderr
    assert aside(workdir) == ['20']
    assert (workdir / 'metrics.jsonl').read_text() == history
  out = run(corpus, workdir, '--allow_restart', '--config.num_train_steps=10')
  assert 'restarting from step 0' in out.stderr
  (previous,) = workdir.glob('previous.*')
  assert (previous / 'metrics.jsonl').read_text() == history
  assert [p.name.split('.')[0] for p in (previous / 'checkpoints').iterdir()] == ['20']
  assert aside(workdir) == []  # the new run's own checks no longer see them
  assert [m['step'] for m in read_jsonl(workdir / 'metrics.jsonl')][-1] == 10


def test_a_changed_optimizer_is_a_mismatch_that_moves_nothing(corpus, finished, tmp_path):
  workdir = copy(finished, tmp_path)
  (workdir / 'final.json').unlink()
  before = snapshot(workdir)
  for _ in range(2):
    out = run(corpus, workdir, '--config.optim.grad_clip_norm=0', check=False)
    one_line_error(out)
    assert 'the checkpoint at step 60' in out.stderr
    assert 'does not match the state this code and config build' in out.stderr
    assert 'leaves of opt_state differ' in out.stderr
    assert 'optim.grad_clip_norm (1.0 -> 0.0)' in out.stderr
    assert snapshot(workdir) == before  # nothing renamed, deleted or rewritten


def test_a_hand_edited_config_is_a_mismatch_naming_the_shapes(corpus, finished, tmp_path):
  workdir = copy(finished, tmp_path)
  saved = json.loads((workdir / 'config.json').read_text())
  saved['model']['d_model'] = 32
  (workdir / 'config.json').write_text(json.dumps(saved))
  before = snapshot(workdir / 'checkpoints')
  out = run(corpus, workdir, '--config.model.d_model=32', check=False)
  one_line_error(out)
  assert 'leaves of params differ' in out.stderr
  assert 'checkpoint float32[' in out.stderr and 'config float32[' in out.stderr
  assert snapshot(workdir / 'checkpoints') == before


def test_a_missing_checkpoints_folder_refuses_and_keeps_the_history(corpus, finished, tmp_path):
  workdir = copy(finished, tmp_path)
  shutil.rmtree(workdir / 'checkpoints')
  before = snapshot(workdir)
  out = run(corpus, workdir, check=False)
  one_line_error(out)
  assert 'metrics.jsonl up to step 60 but no checkpoints folder' in out.stderr
  assert 'final.json of a finished run' in out.stderr
  assert snapshot(workdir) == before


def test_a_run_killed_before_its_first_checkpoint_starts_again_freely(corpus, tmp_path):
  run(corpus, tmp_path, '--config.num_train_steps=5', '--config.checkpoint_every_steps=100')
  shutil.rmtree(tmp_path / 'checkpoints' / '5')  # as if killed before that save
  (tmp_path / 'final.json').unlink()
  out = run(corpus, tmp_path, '--config.num_train_steps=5', '--config.checkpoint_every_steps=100')
  assert 'resumed' not in out.stderr
  assert [m['step'] for m in read_jsonl(tmp_path / 'metrics.jsonl') if 'train/loss' in m] == [
    1,
    2,
    3,
    4,
    5,
  ]


def test_a_torn_last_metrics_line_is_dropped_on_resume(corpus, finished, reference, tmp_path):
  workdir = copy(finished, tmp_path)
  (workdir / 'final.json').unlink()
  with open(workdir / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 61, "train/lo')  # a crash in the middle of a write
  out = run(corpus, workdir, '--config.num_train_steps=80')
  assert 'dropped its torn last line' in out.stderr
  assert losses(workdir) == {s: v for s, v in reference.items() if s <= 80}


def test_a_damaged_metrics_line_before_the_last_is_an_error(corpus, finished, tmp_path):
  workdir = copy(finished, tmp_path)
  lines = (workdir / 'metrics.jsonl').read_text().splitlines(keepends=True)
  lines[3] = '{"step": 4, "tra\n'
  (workdir / 'metrics.jsonl').write_text(''.join(lines))
  out = run(corpus, workdir, '--config.num_train_steps=80', check=False)
  one_line_error(out)
  assert 'metrics.jsonl, line 4, is damaged' in out.stderr
  assert steps_on_disk(workdir) == [20, 40, 60]


def flip_a_byte(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x5A
  path.write_bytes(bytes(data))


# orbax leaves the coroutines of a failed read behind; the restore itself reports the failure
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_every_file_kind_cut_short_or_changed_is_damage_or_harmless(corpus, finished, tmp_path):
  """One file of each kind in a step, cut to a third or with a byte flipped: the restore
  either gives back exactly what was saved (a file it does not read) or says the step is
  damaged; never other values, and never an unexplained failure."""
  cfg = get_config(str(corpus))
  cfg.num_train_steps = 60
  run_ = run_lib.setup(cfg, str(finished))
  abstract, _ = state_lib.abstract_state(run_.model, run_.tx, run_.mesh, cfg)
  with checkpoint.Checkpointer(str(finished), reader=True) as ckpt:
    saved, saved_data, _ = ckpt.restore(60, abstract)
  step = finished / 'checkpoints' / '60'
  kinds = {}  # one file per kind: its folder and what its name says, the largest of them
  for path in sorted(step.rglob('*'), key=lambda p: p.stat().st_size):
    if path.is_file():
      kind = (path.parent.relative_to(step), path.name if path.parent.name != 'd' else 'd')
      kinds[kind] = path.relative_to(step)
  assert len(kinds) >= 10, sorted(kinds)
  outcomes = {}
  for relative in kinds.values():
    for change in (truncate, flip_a_byte):
      workdir = tmp_path / 'run'
      shutil.rmtree(workdir, ignore_errors=True)
      shutil.copytree(finished, workdir)
      change(workdir / 'checkpoints' / '60' / relative)
      try:
        with checkpoint.Checkpointer(str(workdir), reader=True) as ckpt:
          state, data_state, _ = ckpt.restore(60, abstract)
        jax.tree.map(np.testing.assert_array_equal, state, saved)
        assert data_state == saved_data
        outcomes[relative, change.__name__] = 'the same'
      except checkpoint.Damaged:
        outcomes[relative, change.__name__] = 'damaged'
  assert list(outcomes.values()).count('damaged') >= 12, outcomes


def test_only_errors_that_say_a_file_is_damaged_count_as_damage(tmp_path):
  # Out of memory or permissions while reading a sound checkpoint are not the checkpoint's
  # fault: the run stops and nothing is moved. (Real damage is covered end to end above.)
  def chained(outer, inner):
    try:
      try:
        raise inner
      except Exception as e:
        raise outer from e
    except Exception as e:
      return e

  damaged = [
    chained(Exception('error reading array index'), ValueError('DATA_LOSS: checksum')),
    chained(
      Exception('error reading array index'),
      ValueError('FAILED_PRECONDITION: Error reading "x": Truncated'),
    ),
    json.JSONDecodeError('Expecting value', '', 0),
    FileNotFoundError('File .../meta/metadata not found.'),
  ]
  other = [
    MemoryError(),
    chained(
      Exception('error reading array index'), ValueError('RESOURCE_EXHAUSTED: out of memory')
    ),
    PermissionError(13, 'Permission denied'),
    TypeError('a bug'),
  ]
  for e in damaged:
    assert isinstance(checkpoint._classified(20, e, str(tmp_path)), checkpoint.Damaged), e
  for e in other:
    classified = checkpoint._classified(20, e, str(tmp_path))
    assert isinstance(classified, RunError) and 'nothing was moved' in str(classified), e
