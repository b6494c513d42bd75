"""The recurrent family on the 2-core CPU, through the real trainer.

  python bench/rnn_cpu.py [--budget_seconds=90]

1. Training tokens/s of the LSTM, GRU and Elman language models: 2 layers of 512, embedding
   128, vocabulary 65 (tiny shakespeare), batch 32, sequence 128, stateful; with float32
   matmuls and with bfloat16 ones (float32 accumulation, state, gates and parameters), which
   this machine kind's AMX units run at about 2.5x float32's speed. Reference on this machine
   kind: PyTorch's fused float32 nn.LSTM about 7,100 tokens/s, a plain lax.scan LSTM about
   4,950. Target for the LSTM: >= 7,500. Beside them, decoding tokens/s of the same run's
   model: 256 sampled tokens after a one-token prompt, batch 1, from the cached carries.
2. Tiny-shakespeare val loss (validation + test) of the 2x512 LSTM (float32 and bfloat16) and
   of the transformer (shakespeare_char presets, nanogpt_cpu sizes) after the same wall-clock
   training budget.
   Each run's num_train_steps comes from a short probe of its own step rate, so its whole
   warmup + cosine schedule fits in the budget.
"""

import json
import os
import pathlib
import statistics
import sys
import tempfile

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
os.environ.setdefault('TFDS_DATA_DIR', str(REPO.parent / 'shared' / 'data' / 'tensorflow_datasets'))
sys.path.insert(0, str(REPO))

from ar_jax import cli, train  # noqa: E402
from experiments import shakespeare_char  # noqa: E402

flags.DEFINE_integer('budget_seconds', 90, 'Training time each model gets in part 2.')
DTYPES = ('float32', 'bfloat16')


def run(config, name: str) -> tuple[dict, list[dict]]:
  """(the run's final.json: final eval, decoding speed, ...; its training log lines)."""
  workdir = tempfile.mkdtemp(prefix=f'rnn_bench_{name}_')
  train.train_and_evaluate(config, workdir)
  final = json.loads(pathlib.Path(workdir, 'final.json').read_text())
  logged = [json.loads(x) for x in pathlib.Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  return final, [m for m in logged if 'train/tokens_per_sec' in m]


def steady_rate(logs: list[dict]) -> float:
  """Median tokens/s over the log intervals after the first (which warms caches)."""
  return statistics.median(m['train/tokens_per_sec'] for m in (logs[1:] or logs))


def preset(model: str, dtype: str):
  """The shakespeare_char nanogpt_cpu preset for `model`, its matmuls in `dtype`."""
  c = shakespeare_char.get_config(f'preset=nanogpt_cpu,model={model}')
  c.model.dtype = dtype
  return c


def throughput(model: str, dtype: str) -> tuple[float, float]:
  """(training tokens/s, decoding tokens/s)."""
  c = preset(model, dtype)
  c.batch_size, c.data.seq_len = 32, 128
  c.num_train_steps, c.log_every_steps, c.steps_per_dispatch = 40, 8, 4
  c.eval_every_steps = c.checkpoint_every_steps = 1000
  c.eval_batches, c.optim.warmup_steps = 1, 5
  final, logs = run(c, f'{model}_{dtype}')
  return steady_rate(logs), final['sample/tokens_per_sec']


def budgeted(model: str, dtype: str, budget: float) -> tuple[float, int, float]:
  probe = preset(model, dtype)
  probe.num_train_steps, probe.log_every_steps, probe.eval_batches = 60, 20, 1
  probe.sample.max_new_tokens, probe.optim.warmup_steps = 1, 10
  tokens_per_step = probe.batch_size * probe.data.seq_len
  steps = int(budget * steady_rate(run(probe, f'{model}_{dtype}_probe')[1]) / tokens_per_step)
  c = preset(model, dtype)
  c.num_train_steps = max(steps, 2 * c.optim.warmup_steps)
  c.eval_every_steps = c.checkpoint_every_steps = c.num_train_steps
  final, logs = run(c, f'{model}_{dtype}')
  seconds = sum(m['train/step_time_ms'] for m in logs) / 1000 * c.log_every_steps
  return final['eval/loss'], c.num_train_steps, seconds


def bench():
  print('training tokens/s, 2 x 512, embedding 128, vocab 65, batch 32, sequence 128:')
  print('        training: float32  bfloat16    decoding: float32  bfloat16')
  for model in ('lstm', 'gru', 'rnn'):
    (train32, decode32), (train16, decode16) = (throughput(model, d) for d in DTYPES)
    print(
      f'  {model:5s}  {train32:16,.0f}  {train16:8,.0f}  {decode32:18,.0f}  {decode16:8,.0f}'
      + ('  (target >= 7,500 training, float32)' * (model == 'lstm'))
    )
  budget = flags.FLAGS.budget_seconds
  print(f'tiny shakespeare val loss (validation + test, nats/char) after {budget} s of training:')
  for model, dtype in (('lstm', 'float32'), ('lstm', 'bfloat16'), ('transformer', 'float32')):
    loss, steps, seconds = budgeted(model, dtype, budget)
    print(f'  {model:11s} {dtype:8s} {loss:.4f}  ({steps} steps, {seconds:.0f} s of training)')


def main(argv):
  del argv
  cli.run(bench)


if __name__ == '__main__':
  app.run(main)
