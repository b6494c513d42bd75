"""PixelCNN on images, pixel by pixel in raster order, reported in bits per dimension.

  python -m ar_jax.main --config=experiments/pixelcnn.py --workdir=workdirs/pixelcnn_digits
  python -m ar_jax.main --config=experiments/pixelcnn.py:dataset=binarized_mnist \
      --workdir=workdirs/pixelcnn_bmnist

Arg keys: dataset=digits|mnist|binarized_mnist|cifar10 (digits: scikit-learn's bundled 8x8,
no download, about 10 minutes on a 2-core CPU; the others from a prepared TFDS copy under
$TFDS_DATA_DIR or data.data_dir) and model=gated|plain (the gated PixelCNN with vertical and
horizontal stacks, or the original masked stack with its blind spot).
Every image is one example: BOS, then its sub-pixels. eval/bits_per_dim is the mean over
sub-pixels (uniform over 256 levels: 8); eval/nats_per_image is the number binarized MNIST
is reported in (PixelCNN: 81.30 nats, van den Oord et al. 2016).
"""

import math

from ar_jax import models
from ar_jax.config import defaults, parse_arg

CHOICES = {
  'dataset': ('digits', 'mnist', 'binarized_mnist', 'cifar10'),
  'model': ('gated', 'plain'),
}
SHAPES = {
  'digits': (8, 8, 1),
  'mnist': (28, 28, 1),
  'binarized_mnist': (28, 28, 1),
  'cifar10': (32, 32, 3),
}


def get_config(arg: str | None = None):
  args = parse_arg(arg, CHOICES)
  dataset = args['dataset']
  shape = SHAPES[dataset]
  c = defaults()
  c.data.name = dataset
  c.data.tokenizer = 'pixel'  # BOS + one token per sub-pixel value
  c.data.sampling = 'examples'  # every batch row one whole image
  c.data.seq_len = math.prod(shape)  # predicted sub-pixels per image
  c.data.pixel_levels = 2 if dataset == 'binarized_mnist' else 256
  # mnist and cifar10 have no validation split; binarized MNIST is reported on test.
  c.data.eval_splits = ('validation',) if dataset == 'digits' else ('test',)

  c.model = models.default_config('pixelcnn')
  c.model.image_height, c.model.image_width, c.model.image_channels = shape
  c.model.gated = args['model'] == 'gated'
  c.optim.weight_decay = 0.0  # convolutions share their weights over every pixel already
  c.optim.grad_clip_norm = 1.0
  c.sample.prompt = ''  # BOS alone: a whole new image (written as its sub-pixel values)
  c.sample.max_new_tokens = c.data.seq_len
  c.sample.temperature = 1.0  # ancestral sampling: the model's own distribution

  if dataset == 'digits':
    c.model.features = 32  # 0.1M parameters: 1,617 training images overfit a larger net
    c.model.num_layers = 5
    c.model.first_kernel_size = 5  # with 5 more 3x3 layers, the field covers the 8x8 image
    c.model.head_features = 64
    c.batch_size = 32  # 2,048 sub-pixels per step
    c.num_train_steps = 2000  # about 40 epochs; 1.79 bits/dim after 500 (bench/conv_cpu.py)
    c.optim.learning_rate = 3e-3
    c.optim.min_learning_rate = 3e-4
    c.optim.warmup_steps = 50
    c.steps_per_dispatch = 10  # small steps: the host's per-dispatch cost shows on CPU
    c.log_every_steps = 100
    c.eval_every_steps = 500  # the 180 validation images, whole
    c.checkpoint_every_steps = 1000
  else:  # van den Oord et al.'s scale; an accelerator preset (hours on a CPU)
    c.model.features = 64 * shape[2]
    c.model.num_layers = 12
    c.model.first_kernel_size = 7
    c.model.head_features = 256
    c.batch_size = 64
    c.num_train_steps = 50_000
    c.optim.learning_rate = 1e-3
    c.optim.min_learning_rate = 1e-4
    c.optim.warmup_steps = 500
    c.log_every_steps = 200
    c.eval_every_steps = 5000
    c.eval_batches = 50  # 3,200 test images per evaluation; evaluate_workdir for all
    c.checkpoint_every_steps = 5000
    c.model.dtype = 'bfloat16'  # compute dtype on accelerators; params and loss stay f32
  return c
