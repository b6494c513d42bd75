"""Character-level tiny shakespeare, as nanoGPT's shakespeare_char.

  python -m ar_jax.main --config=experiments/shakespeare_char.py:preset=nanogpt_cpu \
      --workdir=workdirs/shakespeare_cpu

Arg keys: preset=nanogpt_cpu|nanogpt_gpu (nanoGPT's two reference setups: sizes, batch,
steps, schedule) and model=transformer|rnn|lstm|gru|mingru|minlstm|hawk|mamba|conv|wavenet
(rnn is the Elman RNN; the recurrent models are char-rnn-like: 2 layers of 512, trained
statefully on consecutive windows; mingru, minlstm, hawk and mamba, whose recurrences are
linear in the state, are the transformer's stack at its width with the parallel-scan
recurrence in place of attention, at its depth (mamba: twice it, see linear_recurrent);
conv is a plain causal-conv stack seeing 33 characters, wavenet a dilated gated one whose
receptive field is about twice the preset's window).
Data: the TFDS tiny_shakespeare dataset, read from $TFDS_DATA_DIR or data.data_dir. Its
validation + test splits together are exactly nanoGPT's val split, so evaluation pools both.
Or text=PATH: the same corpus as a text file (char-rnn's input.txt), split 90/10 by position
as nanoGPT splits it.
"""

from ar_jax import models
from ar_jax.config import defaults, parse_arg

CHOICES = {
  'preset': ('nanogpt_cpu', 'nanogpt_gpu'),
  'model': (
    'transformer',
    'rnn',
    'lstm',
    'gru',
    'mingru',
    'minlstm',
    'hawk',
    'mamba',
    'conv',
    'wavenet',
  ),
  'text': None,  # a path: read the corpus from this text file instead of TFDS
}
CELLS = {'rnn': 'elman', 'lstm': 'lstm', 'gru': 'gru'}
# model= -> (model.name, its fields) of the families whose recurrence is linear in the state
LINEAR = {
  'mingru': ('minrnn', {'cell': 'mingru'}),
  'minlstm': ('minrnn', {'cell': 'minlstm'}),
  'hawk': ('hawk', {}),
  'mamba': ('mamba', {}),
}


def get_config(arg: str | None = None):
  args = parse_arg(arg, CHOICES)
  c = defaults()
  c.data.name = 'tiny_shakespeare'
  c.data.tokenizer = 'char'  # 65 characters, as nanoGPT's meta.pkl
  c.data.eval_splits = ('validation', 'test')  # = nanoGPT's val split (the last 10%)
  if args['text']:  # the last 10% by position is the validation split: the same text
    c.data.name, c.data.path, c.data.eval_splits = 'files', args['text'], ('validation',)
  # nanoGPT's GPT (no biases, output projection tied to the embedding) with one change:
  # rotary positions instead of learned ones. On the CPU preset they lower the val loss
  # from 1.90 to 1.79 (bench/nanogpt_cpu.py); --config.model.pos_encoding=learned gives
  # nanoGPT's exact architecture.
  c.model.pos_encoding = 'rotary'
  c.model.use_bias = False
  c.model.tie_embeddings = True
  c.optim.learning_rate = 1e-3  # nanoGPT: "with baby networks can afford to go a bit higher"
  c.optim.min_learning_rate = 1e-4  # learning_rate / 10
  c.optim.warmup_steps = 100
  c.optim.b2 = 0.99  # "make a bit bigger because number of tokens per iter is small"
  c.optim.weight_decay = 0.1
  c.optim.grad_clip_norm = 1.0
  c.sample.max_new_tokens = 500  # clipped to the context (63 for the CPU preset)

  if args['preset'] == 'nanogpt_cpu':
    c.model.num_layers = 4  # 0.8M parameters
    c.model.num_heads = 4
    c.model.d_model = 128
    c.model.dropout = 0.0  # too small and short a run to overfit
    c.data.seq_len = 64  # nanoGPT's block_size
    c.model.max_len = 64  # = block_size: samples stay inside the trained positions
    c.batch_size = 12  # 768 tokens per step
    c.num_train_steps = 2000  # = lr_decay_iters: the cosine ends with the run
    c.steps_per_dispatch = 10  # a 2-core CPU spends much of a small step in dispatch
    c.log_every_steps = 100  # nanoGPT logs every step; 100 keeps the host out of the loop
    c.eval_every_steps = 500  # a full pass over val + test (111k characters) each time
    c.checkpoint_every_steps = 1000
  else:  # nanogpt_gpu
    c.model.num_layers = 6  # 10.7M parameters
    c.model.num_heads = 6
    c.model.d_model = 384
    c.model.dropout = 0.2  # nanoGPT: this model overfits tiny shakespeare without it
    c.data.seq_len = 256  # nanoGPT's block_size
    c.model.max_len = 256
    c.batch_size = 64  # 16,384 tokens per step
    c.num_train_steps = 5000  # = lr_decay_iters
    c.model.dtype = 'bfloat16'  # compute dtype on accelerators; params and loss stay f32
    c.log_every_steps = 100
    c.eval_every_steps = 250  # nanoGPT's eval_interval
    c.checkpoint_every_steps = 1000  # minutes apart on one GPU
  if args['model'] in CELLS:
    recurrent(c, CELLS[args['model']])
  elif args['model'] in LINEAR:
    linear_recurrent(c, args['model'])
  elif args['model'] in ('conv', 'wavenet'):
    convolutional(c, wavenet=args['model'] == 'wavenet')
  return c


def recurrent(c, cell: str) -> None:
  """A char-rnn-like model in place of the transformer, on the preset's data and budget."""
  dropout = c.model.dropout
  c.model = models.default_config('rnn')
  c.model.cell = cell
  c.model.num_layers = 2  # char-rnn's default depth
  c.model.d_hidden = 512  # the size of Karpathy's "unreasonable effectiveness" runs
  c.model.d_embed = 128
  c.model.dropout = dropout  # the preset's: 0 on CPU, 0.2 on GPU (between layers only)
  c.stateful = True  # each row continues its text across batches, as char-rnn trains
  c.data.sampling = 'sequential'  # consecutive windows of batch_size streams
  c.optim.learning_rate = 2e-3  # char-rnn's; recurrent nets take a higher rate than GPTs
  c.optim.min_learning_rate = 2e-4
  c.optim.weight_decay = 0.0  # char-rnn regularizes with dropout only


def linear_recurrent(c, model: str) -> None:
  """Blocks of a recurrence linear in the state in place of the transformer's, at its width
  and depth; Mamba's at twice the depth, as Gu and Dao match a transformer's size (a Mamba
  block, with no MLP, has about half a transformer layer's parameters)."""
  transformer = c.model
  name, fields = LINEAR[model]
  c.model = models.default_config(name)
  c.model.update(fields)
  for field in ('num_layers', 'd_model', 'dropout', 'dtype'):
    c.model[field] = transformer[field]
  if name == 'mamba':
    c.model.num_layers *= 2


def convolutional(c, wavenet: bool) -> None:
  """A causal-conv model in place of the transformer, on the preset's data and budget. Its
  context is its receptive field, so it is sized to the preset's window (seq_len)."""
  c.model = models.default_config('conv')
  c.model.channels = 256
  c.model.head_channels = 256
  if wavenet:  # dilations 1 .. 2^(n-1), twice: a field of 2 * (2^n - 1) + 1 >= 2 * seq_len
    c.model.layers_per_block = max(1, (c.data.seq_len - 1).bit_length())
    c.model.num_blocks = 2
    c.model.skip_channels = 256
  else:  # the plain stack: ReLU, dilation 1, kernel 5: a field of 4 * 8 + 1 = 33 characters
    c.model.dilation_base = 1
    c.model.gated = False
    c.model.skip_channels = 0
    c.model.kernel_size = 5
    c.model.layers_per_block = 8
  c.optim.weight_decay = 0.0  # the conv weights are shared over time; no decay, as WaveNet
