"""launch/slurm.sbatch and the sweep's SLURM job array under a real scheduler: a one-node
cluster (launch/slurm_local.sh: munged, slurmctld, slurmd) on this machine, in a PID namespace
of its own that dies with the test, jobs included."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests import helpers
from tests.helpers import REPO, read_jsonl

pytestmark = pytest.mark.skipif(
  not all(shutil.which(p) for p in ('slurmctld', 'slurmd', 'munged', 'sbatch', 'unshare'))
  or os.geteuid() != 0,
  reason="needs root and Debian's slurm-wlm and munge packages (.ci/run installs them)",
)
QUICKSTART_STEPS = 40


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
  """The environment in which sbatch, squeue, scancel and scontrol talk to the cluster."""
  folder = tmp_path / 'slurm'
  daemons = ['launch/slurm_local.sh', str(folder), str(free_port()), str(free_port())]
  log = open(tmp_path / 'slurm_local.log', 'w')  # noqa: SIM115 - the daemons write it for the test's life
  helpers.start(
    ['unshare', '--pid', '--fork', '--kill-child', '--mount-proc', *daemons],
    cwd=REPO,
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  # sbatch passes this environment on to the jobs: one CPU device per process, as a user's,
  # and XLA's optimisations: the jobs train the quickstart model for 40 steps.
  env = helpers.subprocess_env(optimised=True)
  env['SLURM_CONF'] = str(folder / 'slurm.conf')
  deadline = time.monotonic() + 60
  while slurm(env, 'sinfo', '-h', '-o', '%t', check=False).stdout.strip() != 'idle':
    assert time.monotonic() < deadline, (tmp_path / 'slurm_local.log').read_text()
    time.sleep(0.5)
  return env


def slurm(env, *args, check=True) -> subprocess.CompletedProcess:
  out = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
  assert not check or out.returncode == 0, out.stderr
  return out


def job_state(env, job: str) -> str:
  shown = slurm(env, 'scontrol', 'show', 'job', job).stdout
  return re.search(r'JobState=(\w+)', shown)[1]


def wait_for(condition, timeout: float, what: str):
  deadline = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.5)


def logged_steps(workdir) -> list[int]:
  path = workdir / 'metrics.jsonl'
  return [r['step'] for r in read_jsonl(path) if 'train/loss' in r] if path.exists() else []


@pytest.mark.slow
def test_quickstart_on_two_tasks_is_stopped_by_sigterm_and_resumes_when_requeued(cluster, tmp_path):
  workdir, out = tmp_path / 'quickstart', tmp_path / 'job.out'
  shorter = [
    f'--config.num_train_steps={QUICKSTART_STEPS}',
    '--config.steps_per_dispatch=5',
    '--config.log_every_steps=5',
    '--config.eval_every_steps=1000',
    '--config.eval_batches=2',
    '--config.checkpoint_every_steps=1000',  # only the stop and the end write one
    '--config.sample.max_new_tokens=8',
  ]
  job = slurm(
    cluster,
    'sbatch',
    '--parsable',
    '--nodes=1',  # the script's resources, resized to this one node
    '--ntasks-per-node=2',
    '--cpus-per-task=1',
    f'--output={out}',
    'launch/slurm.sbatch',
    'experiments/quickstart.py',
    str(workdir),
    *shorter,
  ).stdout.strip()
  running = lambda: job_state(cluster, job) in ('PENDING', 'RUNNING')
  wait_for(lambda: len(logged_steps(workdir)) >= 2 or not running(), 180, 'the job to train')
  assert running(), out.read_text()

  # Preemption: SIGTERM to the job's tasks; each finishes its step, checkpoints, exits 0.
  slurm(cluster, 'scancel', '--signal=TERM', job)
  wait_for(lambda: job_state(cluster, job) in ('COMPLETED', 'FAILED'), 120, 'the stop')
  assert job_state(cluster, job) == 'COMPLETED', out.read_text()
  stopped = re.search(r'stopped by signal \S+ at step (\d+)', out.read_text())
  assert stopped and int(stopped[1]) < QUICKSTART_STEPS, out.read_text()
  assert not (workdir / 'final.json').exists()

  # Requeued, as a preempting scheduler does: the same job resumes from that checkpoint.
  slurm(cluster, 'scontrol', 'requeue', job)
  wait_for(lambda: (workdir / 'final.json').exists(), 240, 'the requeued job to finish')
  wait_for(lambda: job_state(cluster, job) == 'COMPLETED', 60, 'the requeued job to end')
  text = out.read_text()
  assert f'resumed from the checkpoint at step {stopped[1]}' in text, text
  assert 'process 0 of 2' in text and 'process 1 of 2' in text, text
  assert logged_steps(workdir)[-1] == QUICKSTART_STEPS


@pytest.mark.slow
def test_a_sweep_runs_as_a_job_array(cluster, tmp_path, text_file):
  env = {**cluster, 'AR_JAX_TEST_CORPUS': str(text_file)}
  root = tmp_path / 'study'
  sweep = [sys.executable, '-m', 'launch.sweep', '--config=tests/tiny_study.py', f'--root={root}']
  written = helpers.run([*sweep, '--runner=slurm', '--parallel=2'], cwd=REPO, env=env, timeout=120)
  assert written.returncode == 0, written.stderr
  script = re.search(r'submit with: sbatch (\S+)', written.stdout)[1]
  job = slurm(env, 'sbatch', '--parsable', script).stdout.strip()
  wait_for(
    lambda: not slurm(env, 'squeue', '-h', '-j', job, check=False).stdout.strip(),
    240,
    'the job array',
  )
  runs = [p for p in root.iterdir() if (p / 'config.json').exists()]
  assert len(runs) == 2 and all((p / 'final.json').exists() for p in runs), [
    (p, (p.parent / 'logs').iterdir()) for p in runs
  ]
  again = helpers.run([*sweep, '--runner=slurm'], cwd=REPO, env=env, timeout=120)
  assert '2 finished, 0 to run' in again.stderr, again.stderr
