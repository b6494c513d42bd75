"""Sharded training on 8 simulated CPU devices equals one device, for every family; gradient
accumulation, remat and bfloat16; checkpoints across meshes; multi-process runs."""

import ipaddress
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ar_jax import checkpoint, models, train
from ar_jax import state as state_lib
from ar_jax import workdir as workdir_lib
from ar_jax.data import pipeline
from tests.helpers import REPO, read_jsonl, tiny_config

MESHES = [(8, 1, 1), (2, 2, 2), (1, 1, 8), (1, 4, 2)]


def family_config(text_file, family, **overrides):
  cfg = tiny_config(text_file, **overrides)
  if family == 'rnn':
    cfg.model = models.default_config('rnn')
    cfg.model.num_layers, cfg.model.d_embed, cfg.model.d_hidden = 2, 16, 16
  else:
    cfg.model.num_heads, cfg.model.d_model = 8, 32  # 8 heads: tensor=8 shards them
  return cfg


def one_step(cfg, workdir):
  """(state after one step, its loss) from the same initial parameters and batch."""
  run = workdir_lib.setup(cfg, str(workdir))
  _, shardings = state_lib.abstract_state(run.model, run.tx, run.mesh, cfg)
  state = train.init_state(run, shardings)
  it = pipeline.train_iterator(
    run.streams.train,
    batch_size=cfg.batch_size,
    seq_len=cfg.data.seq_len,
    seed=0,
    sampling='random',
  )
  state, metrics = train.Trainer(run, shardings).train(state, next(it)[None])
  return state, float(metrics['loss'][0])


def assert_close(a, b, rtol=2e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize('family', ['transformer', 'rnn'])
def test_every_mesh_gives_the_single_device_step(text_file, tmp_path, family):
  base, base_loss = one_step(family_config(text_file, family), tmp_path / 'one')
  for data, fsdp, tensor in MESHES:
    mesh = {'mesh.data': data, 'mesh.fsdp': fsdp, 'mesh.tensor': tensor}
    state, loss = one_step(family_config(text_file, family, **mesh), tmp_path / f'{data}{fsdp}')
    assert loss == pytest.approx(base_loss, rel=1e-5), mesh
    assert_close(state.params, base.params)
    embedding = state.params['embed']['embedding']
    # (vocab, embed) -> (tensor, fsdp) where the sizes divide, as the rules say.
    expected = tuple(
      axis if size % n == 0 else None
      for size, axis, n in zip(embedding.shape, ('tensor', 'fsdp'), (tensor, fsdp), strict=True)
    )
    assert tuple(embedding.sharding.spec) == tuple(
      a if n > 1 else a for a, n in zip(expected, (tensor, fsdp), strict=True)
    )
    assert embedding.sharding.mesh.shape == {'data': data, 'fsdp': fsdp, 'tensor': tensor}


def test_transformer_kernels_follow_the_rules(text_file, tmp_path):
  cfg = family_config(
    text_file, 'transformer', **{'mesh.data': 1, 'mesh.fsdp': 4, 'mesh.tensor': 2}
  )
  state, _ = one_step(cfg, tmp_path)
  spec = lambda x: tuple(x.sharding.spec)
  block = state.params['block_0']
  assert spec(block['mlp_in']['kernel']) == ('fsdp', 'tensor')  # (embed, mlp)
  assert spec(block['mlp_out']['kernel']) == ('tensor', 'fsdp')  # (mlp, embed)
  assert spec(block['attn']['qkv']['kernel']) == ('fsdp', None, 'tensor', None)
  assert spec(block['attn']['out']['kernel']) == ('tensor', None, 'fsdp')
  mu = state.opt_state[1][0].mu  # AdamW's moments are sharded like their parameters
  assert spec(mu['block_0']['mlp_in']['kernel']) == ('fsdp', 'tensor')


@pytest.mark.parametrize('family', ['transformer', 'rnn'])
def test_gradient_accumulation_equals_the_whole_batch(text_file, tmp_path, family):
  whole, loss = one_step(family_config(text_file, family), tmp_path / 'whole')
  cfg = family_config(text_file, family, grad_accum_steps=4)
  accumulated, accum_loss = one_step(cfg, tmp_path / 'accum')
  assert accum_loss == pytest.approx(loss, rel=1e-5)
  assert_close(accumulated.params, whole.params, rtol=1e-4)


def test_remat_equals_no_remat(text_file, tmp_path):
  plain, loss = one_step(family_config(text_file, 'transformer'), tmp_path / 'plain')
  cfg = family_config(text_file, 'transformer', **{'model.remat': 'full'})
  remat, remat_loss = one_step(cfg, tmp_path / 'remat')
  assert remat_loss == pytest.approx(loss, rel=1e-6)
  assert_close(remat.params, plain.params)
  # Remat is really on: the backward pass recomputes inside a checkpoint.
  run = workdir_lib.setup(cfg, str(tmp_path / 'jaxpr'))
  tokens = jnp.zeros((2, 8), jnp.int32)
  params = nn.unbox(run.model.init(jax.random.key(0), tokens)['params'])
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: run.model.apply({'params': p}, tokens).sum()))(params)
  assert 'checkpoint' in str(jaxpr) or 'remat' in str(jaxpr)


def test_bfloat16_step_is_finite_and_close_to_float32(text_file, tmp_path):
  _, loss = one_step(family_config(text_file, 'transformer'), tmp_path / 'f32')
  cfg = family_config(text_file, 'transformer', **{'model.dtype': 'bfloat16'})
  state, bf16_loss = one_step(cfg, tmp_path / 'bf16')
  assert np.isfinite(bf16_loss) and bf16_loss == pytest.approx(loss, rel=1e-2)
  assert state.params['embed']['embedding'].dtype == jnp.float32  # parameters stay float32


def test_checkpoint_from_one_mesh_restores_on_another(text_file, tmp_path):
  cfg = family_config(text_file, 'transformer', **{'mesh.data': 4, 'mesh.fsdp': 2})
  state, _ = one_step(cfg, tmp_path / 'run')
  saver = checkpoint.Checkpointer(str(tmp_path / 'run'), max_to_keep=1)
  saver.save(1, state, {'next_index': 1}, {})
  saver.close()
  for data in (2, 1):
    other = family_config(text_file, 'transformer', **{'mesh.data': data})
    run = workdir_lib.setup(other, str(tmp_path / 'run'))
    abstract, _ = state_lib.abstract_state(run.model, run.tx, run.mesh, other)
    restored, data_state, _ = checkpoint.Checkpointer(str(tmp_path / 'run'), max_to_keep=1).restore(
      1, abstract
    )
    assert data_state == {'next_index': 1}
    assert restored.params['embed']['embedding'].sharding.mesh.size == data
    jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, restored.opt_state, state.opt_state)


def cli(*args, processes=1, devices=4, timeout=240):
  command = [sys.executable, '-m', 'ar_jax.main', *args]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  if processes > 1:
    command = [
      sys.executable,
      '-m',
      'launch.local',
      f'--num_processes={processes}',
      f'--devices_per_process={devices // processes}',
      '--',
      *command,
    ]
  else:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_processes_equal_one_process_with_the_same_devices(text_file, tmp_path):
  args = [
    f'--config=tests/faults/run_config.py:{text_file}',
    '--config.num_train_steps=6',
    '--config.mesh.data=-1',
    '--config.checkpoint_every_steps=3',
  ]
  # 'dcn': the data axis spans the two processes as two slices of 2 devices (multi-slice).
  runs = (('one', 1, []), ('two', 2, []), ('dcn', 2, ['--config.mesh.dcn_data=2']))
  for name, processes, extra in runs:
    out = cli(*args, *extra, f'--workdir={tmp_path / name}', processes=processes)
    assert out.returncode == 0, out.stderr[-3000:]
  losses = lambda d: [m['train/loss'] for m in read_jsonl(d / 'metrics.jsonl') if 'train/loss' in m]
  assert len(losses(tmp_path / 'one')) == 6
  np.testing.assert_allclose(losses(tmp_path / 'two'), losses(tmp_path / 'one'), rtol=1e-6)
  np.testing.assert_allclose(losses(tmp_path / 'dcn'), losses(tmp_path / 'one'), rtol=1e-6)
  assert sorted(os.listdir(tmp_path / 'two' / 'checkpoints')) == ['3', '6']

  # A damaged latest step: both processes find it, process 0 alone moves it aside.
  for path in (tmp_path / 'two' / 'checkpoints' / '6').rglob('*'):
    if path.is_file():
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
  out = cli(*args, '--config.num_train_steps=8', f'--workdir={tmp_path / "two"}', processes=2)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stderr.count('resumed from the checkpoint at step 3') == 2
  assert 'FileNotFoundError' not in out.stderr
  moved = [p for p in os.listdir(tmp_path / 'two' / 'checkpoints') if 'unreadable' in p]
  assert [p.split('.')[0] for p in moved] == ['6']


def test_a_dead_process_stops_the_others(text_file, tmp_path):
  command = [
    sys.executable,
    '-m',
    'launch.local',
    '--num_processes=2',
    '--devices_per_process=1',
    '--grace_seconds=5',
    '--',
    sys.executable,
    '-m',
    'ar_jax.main',
    f'--config=tests/faults/run_config.py:{text_file}',
    '--config.num_train_steps=100000',
    '--config.mesh.data=-1',
    f'--workdir={tmp_path}',
  ]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  launcher = subprocess.Popen(
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
    env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
    out = subprocess.run(
      [sys.executable, '-m', 'ar_jax.sample', f'--workdir={tmp_path}', '--prompt=the ']
      + ['--temperature=0', '--max_new_tokens=12'],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    greedy[devices] = out.stdout
  assert greedy[1] == greedy[8] and greedy[1].startswith('the ')
