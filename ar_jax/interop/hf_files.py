"""Hugging Face model directories on disk: their weight files read (safetensors headers
alone, or whole; a pytorch_model.bin through PyTorch), and a directory written whole or not at
all, never over a run's workdir. Damage and full disks are one-line errors."""

import contextlib
import json
import os
import shutil

import numpy as np

from ar_jax.errors import ConfigError, check


def safetensors():
  try:
    import safetensors.numpy
  except ImportError as e:
    raise ConfigError("Hugging Face checkpoints need safetensors: pip install -e '.[hf]'") from e
  return safetensors.numpy


def _weight_files(hf_dir: str) -> tuple[list[str], str | None]:
  """(the *.safetensors files, or none and the pytorch_model.bin)."""
  files = sorted(f for f in os.listdir(hf_dir) if f.endswith('.safetensors'))
  if files:
    return [os.path.join(hf_dir, f) for f in files], None
  bin_path = os.path.join(hf_dir, 'pytorch_model.bin')
  check(
    os.path.isfile(bin_path), f'{hf_dir} has no weights: no *.safetensors, no pytorch_model.bin'
  )
  return [], bin_path


def _read_bin(bin_path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ConfigError(f'{bin_path} needs PyTorch to read (or save it as safetensors)') from e
  try:
    loaded = torch.load(bin_path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises several kinds for a damaged or foreign file
    raise ConfigError(f'{bin_path} cannot be read ({type(e).__name__}: {e})') from e
  return {k: v.float().numpy() for k, v in loaded.items()}


def _safetensors_call(path: str, fn):
  """fn(), with a damaged or truncated file named in one line."""
  from safetensors import SafetensorError

  try:
    return fn()
  except (SafetensorError, OSError) as e:
    raise ConfigError(f'{path} is not a readable safetensors file ({e})') from e


def tensor_shapes(hf_dir: str) -> dict[str, tuple[int, ...]]:
  """Every tensor's shape by its name in the files, from the safetensors headers alone."""
  files, bin_path = _weight_files(hf_dir)
  if bin_path:
    return {k: v.shape for k, v in _read_bin(bin_path).items()}
  safetensors()
  from safetensors import safe_open

  shapes = {}
  for path in files:

    def header(path=path):
      with safe_open(path, framework='numpy') as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    shapes.update(_safetensors_call(path, header))
  return shapes


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
  """Every tensor of the model directory by its name in the files."""
  files, bin_path = _weight_files(hf_dir)
  if bin_path:
    return _read_bin(bin_path)
  safetensors()
  tensors = {}
  for path in files:
    tensors.update(_safetensors_call(path, lambda path=path: safetensors().load_file(path)))
  return tensors


def is_run(folder: str) -> bool:
  """Whether folder is an ar_jax workdir (its checkpoints, or a config.json with a model)."""
  if os.path.isdir(os.path.join(folder, 'checkpoints')):
    return True
  try:
    with open(os.path.join(folder, 'config.json')) as f:
      return isinstance(json.load(f).get('model'), dict)
  except (OSError, ValueError, AttributeError):
    return False


def check_export_target(out: str, overwrite: bool) -> None:
  check(not os.path.isfile(out), f'--to_hf={out} is a file; name a folder')
  check(
    not (os.path.isdir(out) and is_run(out)),
    f'--to_hf={out} is a run directory (a workdir): an export never writes into one; name '
    'another folder',
  )
  held = sorted(os.listdir(out)) if os.path.isdir(out) else []
  check(
    overwrite or not held,
    f'--to_hf={out} is not empty ({", ".join(held[:4])}); name a new folder, or pass '
    '--overwrite to replace it',
  )


def write_whole(out: str, write) -> None:
  """write(folder) into a new folder beside out, then that folder renamed to out (an old out
  moved aside first, removed last): out is never half written, and a failure leaves it as it
  was."""
  out = os.path.abspath(out)
  parent = os.path.dirname(out)
  tmp = f'{out}.tmp-{os.getpid()}'
  try:
    os.makedirs(parent, exist_ok=True)
    os.makedirs(tmp)
    write(tmp)
    old = None
    if os.path.isdir(out):
      old = f'{out}.old-{os.getpid()}'
      os.rename(out, old)
    os.rename(tmp, out)
    if old:
      shutil.rmtree(old)
  except Exception as e:
    shutil.rmtree(tmp, ignore_errors=True)
    from safetensors import SafetensorError  # a full disk under save_file raises this

    if not isinstance(e, OSError | SafetensorError):
      raise
    free = ''
    with contextlib.suppress(OSError):
      free = f'; {shutil.disk_usage(parent).free / 2**20:.1f} MiB free there'
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
    raise ConfigError(f'writing {out} failed ({reason}){free}') from e
