"""Sharding beyond the contract suite (tests/test_contract.py): the transformer's rules, memory
under FSDP, bfloat16, checkpoints across meshes, multi-process runs, sampling an FSDP model."""

import ipaddress
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from ar_jax import run as run_lib
from ar_jax import state as state_lib
from ar_jax import train
from ar_jax import workdir as workdir_lib
from ar_jax.errors import ConfigError
from ar_jax.parallel import sharding
from ar_jax.workdir import checkpoint
from tests import helpers
from tests.helpers import REPO, family_config, one_step, read_jsonl, tiny_config


def test_transformer_kernels_follow_the_rules(text_file, tmp_path):
  cfg = family_config(
    text_file, 'transformer', **{'mesh.data': 1, 'mesh.fsdp': 4, 'mesh.tensor': 2}
  )
  run = run_lib.setup(cfg, str(tmp_path))
  _, shardings = state_lib.abstract_state(run.model, run.tx, run.mesh, cfg)
  spec = lambda x: tuple(x.spec)
  block = shardings.params['block_0']
  assert spec(block['mlp_in']['kernel']) == ('fsdp', 'tensor')  # (embed, mlp)
  assert spec(block['mlp_out']['kernel']) == ('tensor', 'fsdp')  # (mlp, embed)
  assert spec(block['attn']['qkv']['kernel']) == ('fsdp', None, 'tensor', None)
  assert spec(block['attn']['out']['kernel']) == ('tensor', None, 'fsdp')
  mu = shardings.opt_state[1][0].mu  # AdamW's moments are sharded like their parameters
  assert spec(mu['block_0']['mlp_in']['kernel']) == ('fsdp', 'tensor')


@pytest.mark.parametrize(
  'mesh, names, shape, expected',
  [
    # vocab's first rule (tensor) is taken by mlp: its fallback, fsdp.
    ((1, 4, 2), ('mlp', 'vocab'), (64, 64), ('tensor', 'fsdp')),
    # tensor has size 1: mlp falls through to fsdp, and vocab finds fsdp taken.
    ((1, 8, 1), ('mlp', 'vocab'), (64, 64), ('fsdp', None)),
    # 65 divides by no mesh axis: whole, however the rules read.
    ((1, 4, 2), ('embed', 'vocab'), (32, 65), ('fsdp', None)),
    # a name no rule lists, and the batch over both batch axes.
    ((2, 4, 1), ('batch', 'length', 'embed'), (8, 16, 32), (('data', 'fsdp'), None, None)),
  ],
)
def test_each_axis_takes_the_first_rule_that_is_free_and_divides_it(mesh, names, shape, expected):
  data, fsdp, tensor = mesh
  devices = sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)))
  rules = sharding.rules((), (('mlp', 'tensor'), ('mlp', 'fsdp')))
  assert tuple(sharding.spec(names, shape, devices, rules)) == expected


# Large enough that the parameters and AdamW's moments dwarf everything else an 8-device
# train step holds per device.
MEMORY_MODELS = {
  'lstm': dict(name='rnn', cell='lstm', num_layers=2, d_embed=32, d_hidden=128),
  'wavenet': dict(name='conv', channels=64, layers_per_block=4, skip_channels=64),
}


@pytest.mark.parametrize('model', MEMORY_MODELS)
def test_fsdp_splits_the_state_of_recurrent_and_conv_models(text_file, tmp_path, model):
  """Under fsdp=8 a device holds at most 1/6 of the parameters and optimizer state that data
  parallelism replicates on each (XLA's memory analysis of the compiled step; that the step
  runs and equals one device's, for every family, is tests/test_contract.py's)."""
  memory = {}
  for data, fsdp in ((1, 8), (8, 1)):
    cfg = tiny_config(text_file)
    cfg.model = ml_collections.ConfigDict(MEMORY_MODELS[model])
    cfg.mesh.data, cfg.mesh.fsdp = data, fsdp
    memory[fsdp] = train.compile_only(cfg, str(tmp_path / f'fsdp{fsdp}'))
  key = 'memory/params_and_state_bytes'
  assert memory[8][key] <= memory[1][key] / 6, (memory[8][key], memory[1][key])


def test_checkpoint_from_one_mesh_restores_on_another(text_file, tmp_path):
  cfg = family_config(text_file, 'transformer', **{'mesh.data': 4, 'mesh.fsdp': 2})
  state, _, _ = one_step(cfg, tmp_path / 'run')
  saver = checkpoint.Checkpointer(str(tmp_path / 'run'), max_to_keep=1)
  saver.save(1, state, {'next_index': 1}, {})
  saver.close()
  for data in (2, 1):
    other = family_config(text_file, 'transformer', **{'mesh.data': data})
    run = run_lib.setup(other, str(tmp_path / 'run'))
    abstract, _ = state_lib.abstract_state(run.model, run.tx, run.mesh, other)
    restored, data_state, _ = checkpoint.Checkpointer(str(tmp_path / 'run'), max_to_keep=1).restore(
      1, abstract
    )
    assert data_state == {'next_index': 1}
    assert restored.params['embed']['embedding'].sharding.mesh.size == data
    jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, restored.opt_state, state.opt_state)


def cli(*args, processes=1, devices=4, timeout=240, logs=None):
  command = [sys.executable, '-m', 'ar_jax.main', *args]
  env = helpers.subprocess_env(1 if processes > 1 else devices)
  if processes > 1:
    command = [
      sys.executable,
      '-m',
      'launch.local',
      f'--num_processes={processes}',
      f'--devices_per_process={devices // processes}',
      f'--process_logs={logs}',
      '--',
      *command,
    ]
  return helpers.run(command, cwd=REPO, env=env, timeout=timeout)


@pytest.mark.parametrize(
  'mesh, expected',
  [
    ({'stage': 2, 'data': 4}, [(0, 1), (0, 1)]),  # stages across the hosts: every row each
    ({'data': 8}, [(0, 2), (1, 2)]),  # the batch across them: a half each
    ({'data': 2, 'fsdp': 4}, [(0, 2), (1, 2)]),
  ],
)
def test_each_process_reads_the_rows_its_devices_hold(mesh, expected):
  """Two hosts of 4 devices (device ids 0-3 and 4-7): a host reads the block of rows its
  devices hold, the whole batch where the hosts differ only by pipeline stage."""
  host = lambda device: device.id // 4
  grid = sharding.make_mesh(ml_collections.ConfigDict(mesh))
  assert [sharding.process_rows(grid, p, host) for p in (0, 1)] == expected
  with pytest.raises(ConfigError, match='not one block'):  # hosts taking every other shard
    sharding.process_rows(sharding.make_mesh({'data': 8}), 0, lambda device: device.id % 2)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_devices(text_file, tmp_path):
  args = [
    f'--config=tests/faults/run_config.py:{text_file}',
    '--config.num_train_steps=6',
    '--config.mesh.data=-1',
    '--config.checkpoint_every_steps=3',
    '--config.model.scan_layers=True',  # for the pipelined resume below
  ]
  # Two processes whose data axis spans them as two slices of 2 devices (multi-slice): the
  # processes and the slices at once.
  runs = (('one', 1, []), ('two', 2, ['--config.mesh.dcn_data=2']))
  for name, processes, extra in runs:
    workdir = f'--workdir={tmp_path / name}'
    out = cli(*args, *extra, workdir, processes=processes, logs=tmp_path / f'{name}.logs')
    assert out.returncode == 0, out.stderr[-3000:]
    # The console: process 0 speaks for the run, without gloo's connection lines.
    assert out.stderr.count('step 6/6') == 1 and '[Gloo]' not in out.stdout + out.stderr
  losses = lambda d: [m['train/loss'] for m in read_jsonl(d / 'metrics.jsonl') if 'train/loss' in m]
  assert len(losses(tmp_path / 'one')) == 6
  np.testing.assert_allclose(losses(tmp_path / 'two'), losses(tmp_path / 'one'), rtol=1e-6)
  assert sorted(os.listdir(tmp_path / 'two' / 'checkpoints')) == ['3', '6']

  # A damaged latest step: both processes find it, process 0 alone moves it aside. The run
  # resumes from step 3 with the processes as two pipeline stages instead: each holds one of
  # the two layers, and both read every row.
  for path in (tmp_path / 'two' / 'checkpoints' / '6').rglob('*'):
    if path.is_file():
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
  logs = tmp_path / 'logs'
  resume = ['--config.num_train_steps=8', f'--workdir={tmp_path / "two"}', '--verbosity=0']
  out = cli(*args, *resume, '--config.mesh.dcn_stage=2', processes=2, logs=logs)
  assert out.returncode == 0, out.stderr[-3000:]
  np.testing.assert_allclose(losses(tmp_path / 'two')[3:6], losses(tmp_path / 'one')[3:], rtol=1e-5)
  for i in (0, 1):  # an explicit --verbosity keeps every process's INFO, in its own log
    assert 'resumed from the checkpoint at step 3' in (logs / f'process_{i}.log').read_text()
  assert 'FileNotFoundError' not in out.stderr
  moved = [p for p in os.listdir(tmp_path / 'two' / 'checkpoints') if 'unreadable' in p]
  assert [p.split('.')[0] for p in moved] == ['6']


@pytest.mark.slow
def test_a_dead_process_stops_the_others(text_file, tmp_path):
  command = [
    sys.executable,
    '-m',
    'launch.local',
    '--num_processes=2',
    '--devices_per_process=1',
    '--grace_seconds=5',
    f'--process_logs={tmp_path / "logs"}',
    '--',
    sys.executable,
    '-m',
    'ar_jax.main',
    f'--config=tests/faults/run_config.py:{text_file}',
    '--config.num_train_steps=100000',
    '--config.mesh.data=-1',
    f'--workdir={tmp_path}',
  ]
  env = helpers.subprocess_env()
  launcher = helpers.start(
    command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  deadline = time.time() + 120
  while (
    not (tmp_path / 'metrics.jsonl').exists() or not (tmp_path / 'metrics.jsonl').stat().st_size
  ):
    assert time.time() < deadline and launcher.poll() is None
    time.sleep(0.1)
  children = subprocess.run(['pgrep', '-P', str(launcher.pid)], capture_output=True, text=True)
  pids = [int(p) for p in children.stdout.split()]
  assert len(pids) == 2
  # The coordinator (in process 0) listens on the loopback only, out of the network's reach.
  coordinator = next(
    p for p in pids if '--process_id=0' in pathlib.Path(f'/proc/{p}/cmdline').read_text()
  )
  cmdline = pathlib.Path(f'/proc/{coordinator}/cmdline').read_text()
  port = re.search(r'--coordinator_address=127.0.0.1:(\d+)', cmdline)
  assert listening_hosts(coordinator, int(port.group(1))) == {'127.0.0.1'}
  os.kill(pids[1], signal.SIGKILL)
  killed = time.time()
  _, stderr = launcher.communicate(timeout=60)
  assert launcher.returncode != 0
  assert time.time() - killed < 30  # bounded: the grace period, not a hang
  assert re.search(r'process [01] exited with code -?\d+; stopping the other processes', stderr)
  for pid in pids:
    assert not os.path.exists(f'/proc/{pid}')  # reaped: no process left behind


def listening_hosts(pid: int, port: int) -> set[str]:
  """The addresses on which process pid listens on port (from /proc: no tool needed)."""
  sockets = {
    os.readlink(f'/proc/{pid}/fd/{fd}')[len('socket:[') : -1]
    for fd in os.listdir(f'/proc/{pid}/fd')
    if os.readlink(f'/proc/{pid}/fd/{fd}').startswith('socket:[')
  }
  hosts = set()
  for table in ('tcp', 'tcp6'):
    for line in pathlib.Path(f'/proc/{pid}/net/{table}').read_text().splitlines()[1:]:
      local, state, inode = line.split()[1], line.split()[3], line.split()[9]
      address, local_port = local.split(':')
      if state == '0A' and inode in sockets and int(local_port, 16) == port:  # 0A: LISTEN
        raw = bytes.fromhex(address)
        # /proc writes addresses as 32-bit words in host (little-endian) order.
        words = b''.join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
        host = ipaddress.ip_address(words)
        hosts.add(str(getattr(host, 'ipv4_mapped', None) or host))
  return hosts


def test_a_model_trained_with_fsdp_samples_the_same_on_one_device_and_on_eight(text_file, tmp_path):
  cfg = tiny_config(text_file, **{'mesh.data': 1, 'mesh.fsdp': 8})
  train.train_and_evaluate(cfg, str(tmp_path))
  # Readers restore the parameters alone, split over every device present, not replicated.
  _, params, _, step = workdir_lib.load(str(tmp_path))
  embedding = params['embed']['embedding']
  assert step == 6 and len(embedding.sharding.device_set) == 8
  assert not embedding.sharding.is_fully_replicated
  greedy = {}
  for devices in (1, 8):
    env = helpers.subprocess_env(devices)
    out = helpers.run(
      [sys.executable, '-m', 'ar_jax.sample', f'--workdir={tmp_path}', '--prompt=the ']
      + ['--temperature=0', '--max_new_tokens=12'],
      cwd=REPO,
      env=env,
      timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    greedy[devices] = out.stdout
  assert greedy[1] == greedy[8] and greedy[1].startswith('the ')
