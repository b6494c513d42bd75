"""The data path at scale: tokenizing throughput against the `tokenizers` library itself, the
training process's memory on a 10M-token and a 1B-token store, and how fast a store feeds
one process against what the nanogpt_cpu preset consumes.

  python bench/data_scale.py [--big_tokens=1000000000] [--workdir=DIR]

The stores are built from the embedded corpus's text, repeated, and deleted at the end.
Needs about 3 bytes of disk per token of --big_tokens.
"""

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ar_jax import cli, config  # noqa: E402
from ar_jax.data import batches, sources, store, tokenizers  # noqa: E402

flags.DEFINE_integer('big_tokens', 1_000_000_000, 'Tokens of the large store.')
flags.DEFINE_integer('small_tokens', 10_000_000, 'Tokens of the small store.')
flags.DEFINE_string('workdir', None, 'Scratch directory (default: a temporary one).')
flags.DEFINE_integer('repeats', 3, 'Timed repeats of each throughput measurement (median).')


def corpus_config(**fields):
  data = config.defaults().data
  data.invalid_utf8 = 'skip'
  for k, v in fields.items():
    data[k] = v
  return data


PREPARE = """
import json, sys, time
import ml_collections
from ar_jax.data import store, tokenizers
data = ml_collections.ConfigDict(json.loads(sys.argv[1]))
tokenizer = tokenizers.load(sys.argv[2])
start = time.perf_counter()
store.prepare(data, sys.argv[3], num_workers=int(sys.argv[4]), tokenizer=tokenizer)
print(time.perf_counter() - start)
"""


def tokenizer_throughput(scratch: pathlib.Path) -> None:
  """MB/s of text: the library's encode_batch on every training text at once (all cores,
  in process, the ids read out, nothing written) against a whole prepare (read, tokenize in
  workers, write)."""
  data = corpus_config(tokenizer='bpe', vocab_size=8192, tokenizer_train_bytes=2_000_000)
  tok = tokenizers.from_config(data, sources.documents(data, 'train'))
  texts = [t.decode() for t, _ in sources.documents(data, 'train') if _utf8(t)]
  size = sum(len(t.encode()) for t in texts) / 1e6
  import tokenizers as hf  # the library itself, as a user would call it

  library_tok = hf.Tokenizer.from_str(tok.model)
  times = []
  for _ in range(flags.FLAGS.repeats):
    start = time.perf_counter()
    [e.ids for e in library_tok.encode_batch(texts, add_special_tokens=False)]
    times.append(time.perf_counter() - start)
  library = size / statistics.median(times)
  workers = os.cpu_count() or 1
  tok.save(scratch / 'tokenizer.json')
  data.eval_splits = ()
  times = []
  for i in range(flags.FLAGS.repeats):
    out = scratch / f'bpe_{i}'
    # A process of its own that imports what `python -m ar_jax.prepare` does and no more:
    # spawned workers import the parent's main module, and this file's imports jax.
    args = [data.to_json(), str(scratch / 'tokenizer.json'), str(out), str(workers)]
    seconds = subprocess.run(
      [sys.executable, '-c', PREPARE, *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    times.append(float(seconds))
    shutil.rmtree(out)
  prepared = size / statistics.median(times)
  print(f'\nBPE (8,192 tokens) on the embedded corpus, {size:.1f} MB of training text')
  print(f'  tokenizers encode_batch, in process:         {library:6.2f} MB/s')
  print(f'  store.prepare (ar_jax.prepare), {workers} workers, to disk: {prepared:6.2f} MB/s')
  print(f'  ratio prepare / library: {prepared / library:.2f} (target >= 0.80)')


def _utf8(text: bytes) -> bool:
  try:
    text.decode()
    return True
  except UnicodeDecodeError:
    return False


def byte_store(scratch: pathlib.Path, tokens: int) -> pathlib.Path:
  """A byte-level store of about `tokens` tokens: the corpus's text repeated into one file."""
  text = b''.join(t for t, _ in sources.documents(corpus_config(), 'train'))
  path = scratch / f'text_{tokens}.txt'
  with open(path, 'wb') as f:
    for _ in range(tokens // len(text)):
      f.write(text)
    f.write(text[: tokens % len(text)])
  out = scratch / f'store_{tokens}'
  data = corpus_config(name='files', path=str(path), val_fraction=0.001, tokenizer='byte')
  start = time.perf_counter()
  store.prepare(data, str(out), num_workers=os.cpu_count() or 1)
  print(f'  prepared {tokens / 1e6:,.0f}M byte tokens in {time.perf_counter() - start:.0f} s')
  path.unlink()
  return out


def training_peak_rss(scratch: pathlib.Path, prepared: pathlib.Path) -> float:
  """Peak resident memory (MiB) of a 50-step quickstart run on the store."""
  workdir = scratch / f'run_{prepared.name}'
  args = [
    sys.executable,
    '-m',
    'ar_jax.main',
    '--config=experiments/quickstart.py',
    f'--workdir={workdir}',
    f'--config.data.prepared={prepared}',
    '--config.num_train_steps=50',
    '--config.eval_every_steps=50',
    '--config.eval_batches=2',
    '--config.checkpoint_every_steps=50',
  ]
  proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  stderr = proc.stderr.read()
  _, status, usage = os.wait4(proc.pid, 0)
  if status != 0:
    raise RuntimeError(stderr.decode()[-2000:])
  shutil.rmtree(workdir)
  return usage.ru_maxrss / 1024  # KiB on Linux


def loader_throughput(prepared: pathlib.Path, batch_size: int, seq_len: int) -> float:
  """Training tokens per second one process's iterator delivers from the store."""
  manifest = store.read_manifest(str(prepared))
  tokens = store.open_split(str(prepared), 'train', manifest)
  it = batches.train_iterator(
    tokens, batch_size=batch_size, seq_len=seq_len, seed=0, sampling='random'
  )
  next(it)
  rates = []
  for _ in range(flags.FLAGS.repeats):
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 2.0:
      n += next(it).shape[0] * seq_len
    rates.append(n / (time.perf_counter() - start))
  return statistics.median(rates)


def nanogpt_cpu_consumption(scratch: pathlib.Path) -> float | None:
  """Median training tokens/s of the nanogpt_cpu preset over 400 steps (None: no data)."""
  text = REPO.parent / 'shared' / 'data' / 'tinyshakespeare' / 'input.txt'
  if not text.exists():
    return None
  from ar_jax import train
  from experiments import shakespeare_char

  c = shakespeare_char.get_config(f'preset=nanogpt_cpu,text={text}')
  c.num_train_steps, c.eval_every_steps, c.eval_batches = 400, 400, 1
  workdir = scratch / 'nanogpt_cpu'
  train.train_and_evaluate(c, str(workdir))
  logs = [json.loads(x) for x in (workdir / 'metrics.jsonl').read_text().splitlines()]
  rates = [m['train/tokens_per_sec'] for m in logs if 'train/tokens_per_sec' in m][1:]
  return statistics.median(rates)


def bench():
  scratch = pathlib.Path(flags.FLAGS.workdir or tempfile.mkdtemp(prefix='data_scale_'))
  scratch.mkdir(parents=True, exist_ok=True)
  print(f'machine: {os.cpu_count()} cores; scratch {scratch}')
  try:
    tokenizer_throughput(scratch)
    print('\nTraining memory (quickstart model, 50 steps, byte tokens from a store)')
    small = byte_store(scratch, flags.FLAGS.small_tokens)
    big = byte_store(scratch, flags.FLAGS.big_tokens)
    rss = {s: training_peak_rss(scratch, s) for s in (small, big)}
    growth = rss[big] - rss[small]
    for s in (small, big):
      print(f'  {s.name}: peak RSS {rss[s]:,.0f} MiB')
    print(f'  growth: {growth:+.0f} MiB (target <= 100)')
    print('\nLoader throughput from the large store, one process')
    feed = loader_throughput(big, 12, 64)
    gpt2 = loader_throughput(big, 12, 1024)
    consumed = nanogpt_cpu_consumption(scratch)
    print(f'  nanogpt_cpu shapes (12 x 64):   {feed:12,.0f} tokens/s')
    print(f'  GPT-2 shapes (12 x 1024):       {gpt2:12,.0f} tokens/s')
    if consumed:
      print(f'  nanogpt_cpu training consumes:  {consumed:12,.0f} tokens/s')
      print(f'  ratio: {feed / consumed:.0f}x (target >= 10x)')
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def main(argv):
  del argv
  cli.run(bench)


if __name__ == '__main__':
  app.run(main)
