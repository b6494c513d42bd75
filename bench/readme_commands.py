"""Runs the shell blocks of the README and of docs/ as a newcomer would, at reduced step
counts: the check behind "every command in the README and the manual works as written on a
fresh clone".

  python bench/readme_commands.py [--steps=8] [--keep]

Each ```bash block runs in one `bash -euo pipefail` in one fresh copy of the repository's
tracked files (git ls-files: what a clone has), with this Python environment first on PATH:
the README's blocks first, then each page of docs/ in PAGES' order (a page's commands may
use what an earlier page made, the quickstart's workdir say).
The commands are the README's, changed only to be short:
- every `python -m ar_jax.main` (directly, or after `--` under launch.local) gets
  --config.num_train_steps=STEPS and its log, eval and checkpoint intervals appended;
- a sweep's `steps=N` arg becomes `steps=STEPS`.
Blocks needing what this machine lacks are skipped with the reason: installing (.ci/run
checks it from a clean clone), the test suite (CI runs it), cluster launchers, and a download
whose file ../shared/data does not hold (with it, the download becomes a copy).
"""

import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO.parent / 'shared' / 'data'

flags.DEFINE_integer('steps', 8, 'Training steps of every run the README starts.')

PAGES = (
  'README.md',
  'docs/decoding.md',
  'docs/data.md',
  'docs/models.md',
  'docs/training.md',
  'docs/studies.md',
  'docs/interop.md',
  'docs/architecture.md',
  'docs/benchmarks.md',
)
flags.DEFINE_bool('keep', False, 'Keep the copy the blocks ran in (its path is printed).')

# Text a block starts with that sets up the environment this script already runs in.
SETUP = re.compile(
  r'python3 -m venv \.venv && \. \.venv/bin/activate && pip install -e \. && \\\n\s*'
)
SKIP = {
  "pip install -e '.[test]'": 'the test suite: .ci/run runs it on a clean clone',
  'sbatch ': 'needs a SLURM cluster',
  'launch/tpu_vm.sh': 'needs Cloud TPU VMs',
  'hf download ': 'downloads GPT-2 from the Hugging Face Hub (tests/test_convert.py covers it)',
  'ar_jax.lm_harness': 'needs the [eval] extra and a task folder (tests/test_lm_harness.py)',
}
# Downloads, and the copy of their file in ../shared/data that replaces them here.
DOWNLOADS = {
  'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt': (
    SHARED / 'tinyshakespeare' / 'input.txt'
  ),
}
# `python` inside a block: ar_jax.main runs, also those launch.local starts, are shortened.
PREAMBLE = """
python() {
  case " $* " in
    *" ar_jax.main "*) command python "$@" $SHORT ;;
    *) command python "$@" ;;
  esac
}
"""


def blocks(readme: str) -> list[tuple[int, str]]:
  """(line number, text) of every ```bash block."""
  found = []
  for m in re.finditer(r'^```bash\n(.*?)^```', readme, re.S | re.M):
    found.append((readme.count('\n', 0, m.start()) + 1, m.group(1)))
  return found


def prepare(text: str, steps: int) -> tuple[str | None, str]:
  """(the script to run, or None; what was changed or why it is skipped)."""
  for marker, why in SKIP.items():
    if marker in text:
      return None, why
  notes = []
  if SETUP.match(text):
    text = SETUP.sub('', text, count=1)
    notes.append('venv and install skipped: this environment')
  for url, copy in DOWNLOADS.items():
    if url not in text:
      continue
    if not copy.exists():
      return None, f'downloads {url}, and {copy} is absent'
    text = re.sub(rf'curl \S* ?{re.escape(url)}', f'cp {copy} .', text)
    notes.append(f'download copied from {copy}')
  text = re.sub(r'(\bsteps=)\d+', rf'\g<1>{steps}', text)
  return text, '; '.join(notes)


def main(argv):
  del argv
  steps = flags.FLAGS.steps
  every = max(1, steps // 2)
  short = (
    f'--config.num_train_steps={steps} --config.log_every_steps={every} '
    f'--config.eval_every_steps={steps} --config.checkpoint_every_steps={steps}'
  )
  work = pathlib.Path(tempfile.mkdtemp(prefix='readme_commands_'))
  tracked = subprocess.run(
    ['git', 'ls-files'], cwd=REPO, capture_output=True, text=True, check=True
  ).stdout.split()
  for name in tracked:
    (work / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / name, work / name)
  env = {
    'PATH': f'{pathlib.Path(sys.executable).parent}:/usr/bin:/bin',
    'HOME': str(pathlib.Path.home()),
    'SHORT': short,
  }
  results = []
  total = time.perf_counter()
  every = [(page, *b) for page in PAGES for b in blocks((REPO / page).read_text())]
  for page, line, text in every:
    script, note = prepare(text, steps)
    if script is None:
      print(f'{page} line {line}: skipped: {note}', flush=True)
      continue
    start = time.perf_counter()
    out = subprocess.run(
      ['bash', '-euo', 'pipefail', '-c', PREAMBLE + script],
      cwd=work,
      env=env,
      capture_output=True,
      text=True,
    )
    seconds = time.perf_counter() - start
    ok = out.returncode == 0
    results.append(ok)
    print(
      f'{page} line {line}: {"ok" if ok else "FAILED"} in {seconds:.0f} s'
      + (f' ({note})' if note else ''),
      flush=True,
    )
    if not ok:
      print(''.join((out.stdout + out.stderr).splitlines(keepends=True)[-30:]))
  print(
    f'{sum(results)} of {len(results)} blocks ran, in {time.perf_counter() - total:.0f} s '
    f'({steps} training steps a run); copy: {work if flags.FLAGS.keep else "removed"}'
  )
  if not flags.FLAGS.keep:
    shutil.rmtree(work)
  sys.exit(0 if all(results) else 1)


if __name__ == '__main__':
  app.run(main)
