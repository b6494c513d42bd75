"""Runs the sweep an experiment file declares: one workdir per run under --root.

  python -m launch.sweep --config=experiments/compare_families.py --root=studies/families \
      --runner=local --parallel=1
  python -m ar_jax.study --root=studies/families          # then: the report

An experiment file declares its runs next to its config:

  def sweep(add, arg):                  # arg: what follows ':' in --config, or None
    for seed in range(3):
      add(model='lstm', seed=seed, **{'optim.learning_rate': 2e-3})

Each `add(**fields)` is one run. A field naming a leaf of the config (`seed`,
`optim.learning_rate`) becomes a `--config.FIELD=VALUE` override; any other field is a key of
the experiment's own arg string (`model=lstm`), merged over the sweep's arg. Every run's config
is built before anything starts, so a typo fails the whole sweep at once, naming the run.

Runners: `local` runs --parallel runs at a time on this machine, each logging to
ROOT/logs/NAME.log, skipping finished runs (their workdir has final.json) and resuming
unfinished ones from their checkpoints; `slurm` writes ROOT/sweep.sbatch, a job array over
the unfinished runs, to submit with sbatch; `print` lists the unfinished runs' commands.
ROOT/sweep.json records the expansion for ar_jax.study.
"""

import dataclasses
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Any

import ml_collections
from absl import app, flags

from ar_jax import cli
from ar_jax.config import load_experiment
from ar_jax.errors import ConfigError, check
from ar_jax.monitor.progress import duration

flags.DEFINE_string('config', None, 'experiments/NAME.py[:ARG]: a file with sweep(add, arg).')
flags.DEFINE_string('root', None, 'Directory that holds one workdir per run.')
flags.DEFINE_enum('runner', 'local', ['local', 'slurm', 'print'], 'Where the runs go.')
flags.DEFINE_integer('parallel', 1, 'local: runs at a time; slurm: array tasks at a time.')
flags.mark_flags_as_required(['config', 'root'])


@dataclasses.dataclass(frozen=True)
class Run:
  name: str  # the workdir's name under the root, made from the fields
  fields: dict[str, Any]  # as given to add()
  arg: str  # the experiment arg string of the run
  overrides: dict[str, Any]  # config leaf -> value
  workdir: str

  def command(self, config_path: str) -> list[str]:
    config = f'{config_path}:{self.arg}' if self.arg else config_path
    return [
      'python',
      '-m',
      'ar_jax.main',
      f'--config={config}',
      f'--workdir={self.workdir}',
      *(f'--config.{k}={v}' for k, v in self.overrides.items()),
    ]

  def finished(self) -> bool:
    return os.path.exists(os.path.join(self.workdir, 'final.json'))


def expand(config_arg: str, root: str) -> list[Run]:
  """The runs experiments/NAME.py[:ARG] declares, each with a config built and checked."""
  path, _, sweep_arg = config_arg.partition(':')
  module = load_experiment(path)
  check(hasattr(module, 'sweep'), f'{path} declares no sweep: it needs a sweep(add, arg) function')
  declared: list[dict[str, Any]] = []
  module.sweep(lambda **fields: declared.append(fields), sweep_arg or None)
  check(bool(declared), f'the sweep of {config_arg} declares no runs')
  base = module.get_config(sweep_arg or None)
  runs = []
  for fields in declared:
    name = '_'.join(f'{k}-{v}' for k, v in fields.items()) or 'default'
    check(
      all(c.isalnum() or c in '._-+' for c in name),
      f'run {name!r}: field values may use letters, digits and . _ - + only (they name its '
      'workdir)',
    )
    overrides = {k: v for k, v in fields.items() if _is_leaf(base, k)}
    args = _parse_items(sweep_arg) | {k: v for k, v in fields.items() if k not in overrides}
    arg = ','.join(f'{k}={v}' for k, v in args.items())
    try:
      _apply(module.get_config(arg or None), overrides)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
      raise ConfigError(f'sweep run {name}: {e}') from e
    runs.append(Run(name, fields, arg, overrides, os.path.join(root, name)))
  names = [r.name for r in runs]
  repeated = sorted({n for n in names if names.count(n) > 1})
  check(not repeated, f'the sweep declares the same run more than once: {", ".join(repeated)}')
  return runs


def _parse_items(arg: str) -> dict[str, str]:
  return dict(item.partition('=')[::2] for item in filter(None, arg.split(',')))


def _is_leaf(config: ml_collections.ConfigDict, key: str) -> bool:
  node = config
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return not isinstance(node, ml_collections.ConfigDict)


def _apply(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
  """Sets the overrides as --config.KEY=VALUE would, so a wrong type fails here."""
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value  # ml_collections refuses a value of another type


def write_manifest(config_arg: str, root: str, runs: list[Run]) -> None:
  os.makedirs(root, exist_ok=True)
  manifest = {
    'config': config_arg,
    'runs': [{'name': r.name, 'fields': r.fields, 'workdir': r.workdir} for r in runs],
  }
  with open(os.path.join(root, 'sweep.json.tmp'), 'w') as f:
    json.dump(manifest, f, indent=2)
  os.replace(os.path.join(root, 'sweep.json.tmp'), os.path.join(root, 'sweep.json'))


def run_local(runs: list[Run], config_path: str, root: str, parallel: int) -> int:
  """Runs the runs, `parallel` at a time; returns how many failed. SIGTERM/SIGINT reach the
  running ones (they checkpoint and stop; the next invocation resumes them)."""
  logs = os.path.join(root, 'logs')
  os.makedirs(logs, exist_ok=True)
  pending, active, failed, durations = list(runs), {}, [], []
  stopping, began = False, time.monotonic()

  def stop(signum, frame):
    nonlocal stopping
    stopping = True
    for proc, _, _ in active.values():
      proc.send_signal(signum)

  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, stop)
  while pending or active:
    while pending and len(active) < parallel and not stopping:
      run = pending.pop(0)
      command = [sys.executable, *run.command(config_path)[1:]]
      log = open(os.path.join(logs, f'{run.name}.log'), 'a')  # noqa: SIM115 - closed below
      print(f'start  {run.name}', flush=True)
      proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
      active[run.name] = (proc, log, time.monotonic())
    for name, (proc, log, started) in list(active.items()):
      if proc.poll() is None:
        continue
      log.close()
      del active[name]
      durations.append(time.monotonic() - started)
      ok = proc.returncode == 0 and os.path.exists(os.path.join(root, name, 'final.json'))
      if not ok:
        failed.append(name)
      print(
        f'{"done  " if ok else "FAILED"} {name} in {duration(durations[-1])} | '
        f'{len(durations)}/{len(runs)} runs | elapsed {duration(time.monotonic() - began)} | '
        f'eta {_eta(durations, len(pending) + len(active), parallel)}',
        flush=True,
      )
    if stopping and not active:
      break
    time.sleep(0.2)
  for name in failed:
    print(f'run {name} failed or stopped early: see {os.path.join(logs, name + ".log")}')
  return len(failed) + (len(pending) if stopping else 0)


def _eta(durations: list[float], left: int, parallel: int) -> str:
  """The runs left at the mean duration so far, `parallel` at a time (the running ones are
  counted whole: a bound, not a guess at how far they are)."""
  return duration(sum(durations) / len(durations) * math.ceil(left / parallel))


def write_slurm(runs: list[Run], config_path: str, root: str, parallel: int) -> str:
  """ROOT/sweep.sbatch: a job array, one task per run (one GPU each), `parallel` at a time."""
  commands = os.path.join(root, 'sweep_commands.txt')
  with open(commands, 'w') as f:
    f.writelines(shlex.join(r.command(config_path)) + '\n' for r in runs)
  script = os.path.join(root, 'sweep.sbatch')
  with open(script, 'w') as f:
    f.write(f"""#!/bin/bash
# {len(runs)} runs of {config_path}, one per array task; submit with: sbatch {script}
# Edit the resources for your cluster. A run a preempted or timed-out task left unfinished
# resumes from its checkpoint: run launch.sweep --runner=slurm again (it rewrites this file
# without the finished runs) and resubmit.
#SBATCH --job-name=ar_jax_sweep
#SBATCH --chdir={os.getcwd()}
#SBATCH --array=0-{len(runs) - 1}%{parallel}
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --open-mode=append
#SBATCH --output={os.path.join(root, 'logs', '%x-%A_%a.out')}
set -euo pipefail
command=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(commands)})
eval srun "$command"
""")
  os.makedirs(os.path.join(root, 'logs'), exist_ok=True)
  return script


def _main(argv: list[str]):
  check(len(argv) == 1, f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  check(f.parallel > 0, f'--parallel must be positive, got {f.parallel}')
  runs = expand(f.config, f.root)
  write_manifest(f.config, f.root, runs)
  todo = [r for r in runs if not r.finished()]
  config_path = f.config.partition(':')[0]
  print(f'{len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run', file=sys.stderr)
  if f.runner == 'print':
    for r in todo:
      print(shlex.join(r.command(config_path)))
  elif f.runner == 'slurm' and todo:
    print(f'submit with: sbatch {write_slurm(todo, config_path, f.root, f.parallel)}')
  elif f.runner == 'local':
    failed = run_local(todo, config_path, f.root, f.parallel)
    check(failed == 0, f'{failed} of {len(todo)} runs did not finish')
    print(f'report with: python -m ar_jax.study --root={f.root}')


def main(argv):
  cli.run(lambda: _main(argv))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
