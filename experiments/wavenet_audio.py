"""WaveNet on raw audio: 8-bit mu-law samples, one 256-way softmax per sample.

  python -m ar_jax.main --config=experiments/wavenet_audio.py --workdir=workdirs/wavenet_synth
  python -m ar_jax.main --config=experiments/wavenet_audio.py:dataset=speech_commands \
      --workdir=workdirs/wavenet_speech

Arg keys: dataset=synthetic|speech_commands|nsynth (synthetic: decaying harmonic notes made
on the fly, no download, minutes on a 2-core CPU; the others from a prepared TFDS copy under
$TFDS_DATA_DIR or data.data_dir, 16 kHz). The log reports the model's FLOPs per sample; its
receptive field is model.receptive_field (printed by bench/conv_cpu.py): 1,024 samples
(64 ms at 16 kHz) for synthetic, 2 x 1,024 for the TFDS presets.
"""

from ar_jax import models
from ar_jax.config import defaults, parse_arg

CHOICES = {'dataset': ('synthetic', 'speech_commands', 'nsynth')}


def get_config(arg: str | None = None):
  args = parse_arg(arg, CHOICES)
  c = defaults()
  c.data.name = 'synthetic_audio' if args['dataset'] == 'synthetic' else args['dataset']
  c.data.tokenizer = 'mulaw'  # 256 mu-law levels, as WaveNet
  c.data.sampling = 'random'  # windows anywhere in the concatenated clips
  c.data.eval_splits = ('validation',) if args['dataset'] != 'nsynth' else ('valid',)
  c.model = models.default_config('conv')  # WaveNet: its defaults are the paper's layer
  c.model.kernel_size = 2
  c.model.dilation_base = 2
  c.model.gated = True
  c.optim.weight_decay = 0.0
  c.sample.prompt = '128'  # mu-law silence: the sample starts from nothing
  c.sample.temperature = 1.0  # ancestral sampling: the model's own distribution

  if args['dataset'] == 'synthetic':
    c.model.layers_per_block = 10  # dilations 1 .. 512: a receptive field of 1,024
    c.model.num_blocks = 1
    c.model.channels = 32
    c.model.skip_channels = 64
    c.model.head_channels = 64
    c.data.seq_len = 2048  # twice the receptive field: half the outputs see a full field
    c.batch_size = 8
    c.num_train_steps = 600
    c.optim.learning_rate = 2e-3
    c.optim.min_learning_rate = 2e-4
    c.optim.warmup_steps = 50
    c.log_every_steps = 50
    c.eval_every_steps = 300
    c.eval_batches = 8  # 8 x 8 windows: the whole validation split (8 clips of 0.5 s)
    c.checkpoint_every_steps = 300
    c.sample.max_new_tokens = 4000  # a quarter of a second
  else:  # an accelerator preset
    c.model.layers_per_block = 10
    c.model.num_blocks = 2  # receptive field 2,047 samples (128 ms)
    c.model.channels = 64
    c.model.skip_channels = 256
    c.model.head_channels = 256
    c.model.dtype = 'bfloat16'  # compute dtype on accelerators; logits and loss stay f32
    c.data.seq_len = 8192
    c.batch_size = 16
    c.num_train_steps = 50_000
    c.optim.learning_rate = 1e-3
    c.optim.min_learning_rate = 1e-4
    c.optim.warmup_steps = 1000
    c.log_every_steps = 200
    c.eval_every_steps = 5000
    c.eval_batches = 50
    c.checkpoint_every_steps = 5000
    c.sample.max_new_tokens = 16_000  # one second at 16 kHz
  return c
