"""The defaults every experiment starts from, and the parsing of experiment arg strings.

Experiment files (experiments/NAME.py) call `defaults()` and change what they need.
Tools, sweeps and studies rely on the top-level names here: num_train_steps, batch_size,
seed, log_every_steps, eval_every_steps, checkpoint_every_steps, model.name, data.name.
"""

import importlib.util
import os
from collections.abc import Mapping, Sequence

import ml_collections

from ar_jax import models
from ar_jax.errors import ConfigError, check


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds parameter init, dropout and the data order
  c.num_train_steps = 1000  # optimizer steps
  c.batch_size = 32  # global batch, in sequences, summed over all devices and processes
  c.log_every_steps = 100  # train metrics to metrics.jsonl / TensorBoard / the terminal
  c.eval_every_steps = 500  # evaluation on data.eval_splits
  c.eval_batches = 0  # batches per evaluation; 0 = every token of the eval splits
  c.eval_batch_size = 0  # sequences per eval batch; 0 = batch_size
  c.checkpoint_every_steps = 500  # asynchronous checkpoint; one is always written at the end
  c.keep_checkpoints = 3  # the most recent checkpoints kept on disk
  # Train steps per dispatch from the host, run in one compiled loop. More amortizes the
  # per-call overhead (it matters on CPU); logging, eval and checkpoints still happen on time.
  c.steps_per_dispatch = 1
  # Microbatches per step: gradients of batch_size / grad_accum_steps sequences at a time,
  # averaged before clipping and the update (less activation memory, the same step).
  c.grad_accum_steps = 1
  # Truncated BPTT, as char-rnn trains: each batch row continues its stream from the state
  # the previous batch left (gradients stop between windows). Needs a recurrent model and
  # data.sampling='sequential'; the state is saved in checkpoints.
  c.stateful = False
  # A non-finite loss or gradient: 'stop' ends the run with a message naming the step (the
  # checkpoints on disk all predate it); 'skip' leaves parameters and optimizer state
  # untouched for that step and counts it in train/skipped_steps.
  c.nan_policy = 'stop'

  # Scheduled sampling (Bengio et al. 2015): with probability eps(step) an input token is the
  # model's own sample instead of the truth. Exact, step by step, for recurrent models; the
  # two-pass approximation for the parallel families.
  c.scheduled_sampling = ml_collections.ConfigDict()
  c.scheduled_sampling.schedule = 'none'  # 'none', 'constant', 'linear', 'inverse_sigmoid'
  c.scheduled_sampling.max_prob = 0.25  # the eps the schedule rises to
  c.scheduled_sampling.steps = 1000  # linear: steps to reach max_prob; inverse_sigmoid: 10 k

  c.data = ml_collections.ConfigDict()
  # 'python_stdlib' (this interpreter's standard library sources, offline everywhere),
  # 'files' (data.path), or the name of a TFDS dataset prepared in array_record format.
  # Images (tokenizer 'pixel'): 'digits' (scikit-learn's 8x8, offline) or a TFDS image
  # dataset (mnist, binarized_mnist, cifar10). Audio (tokenizer 'mulaw'): 'synthetic_audio'
  # (offline) or a TFDS audio dataset (speech_commands, nsynth).
  c.data.name = 'python_stdlib'
  c.data.path = ''  # for 'files': a file, a directory or a glob (one document per file)
  c.data.val_fraction = 0.1  # held out: of one file (its end), of files, or of the digits
  c.data.data_dir = ''  # TFDS data directory; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.download = False  # let TFDS download and prepare a missing dataset (needs internet)
  c.data.text_feature = 'text'  # the TFDS feature that holds each document's text
  c.data.train_split = 'train'
  c.data.eval_splits = ('validation',)  # evaluated as one pool, weighted by tokens
  # 'byte' (256 values + eos), 'char' (built from train split), 'bpe' (byte-level, GPT-2's
  # scheme), 'sentencepiece', 'pixel' (images: one example per image, BOS and its sub-pixel
  # values in raster order) or 'mulaw' (audio: 256 levels).
  c.data.tokenizer = 'byte'
  # bpe and sentencepiece: load this file (a Hugging Face tokenizer.json, a SentencePiece
  # .model), or with '' train one of vocab_size tokens on the training split's first
  # tokenizer_train_bytes.
  c.data.tokenizer_path = ''
  c.data.vocab_size = 8192
  c.data.tokenizer_train_bytes = 100_000_000
  c.data.sentencepiece_model_type = 'bpe'  # or 'unigram' (Kudo 2018)
  c.data.eos_token = ''  # a loaded tokenizer's end of document: '' finds <|endoftext|>, </s>...
  # Text that is not UTF-8 (char and subword tokenizers): 'error' names the document; 'skip'
  # leaves it out, counted in the log and the store's manifest.
  c.data.invalid_utf8 = 'error'
  # A token store directory (python -m ar_jax.prepare writes one): the run streams its splits
  # from disk instead of tokenizing the source into memory; with no manifest.json there, the
  # run prepares it first. '' = tokenize into memory (small corpora).
  c.data.prepared = ''
  # 'documents': a window may hold several documents; none sees another's tokens (attention
  # block-diagonal, positions restarting, recurrent state and convolution taps reset at each
  # end-of-document token). 'none': windows read across document boundaries (as nanoGPT).
  c.data.packing = 'none'
  c.data.seq_len = 256  # tokens per training window (the context the model learns)
  # 'random' windows (as nanoGPT), 'sequential' streams, or 'examples': whole examples of
  # seq_len + 1 tokens (images), each evaluated once with all its targets.
  c.data.sampling = 'random'
  c.data.pixel_levels = 256  # images: values per sub-pixel (2 for binarized_mnist)
  c.data.max_examples = 0  # images and audio: read at most this many per split; 0 = all

  # The model: a module of ar_jax/models by name; its other fields (and their meaning) are
  # that module's Config dataclass, with its defaults.
  c.model = models.default_config('transformer')

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-3  # peak, reached at the end of warmup
  c.optim.min_learning_rate = 1e-4  # end of the cosine decay
  c.optim.warmup_steps = 100  # linear warmup from 0
  c.optim.decay_steps = 0  # cosine length in steps; 0 = num_train_steps
  c.optim.b1 = 0.9  # AdamW first-moment decay
  c.optim.b2 = 0.99  # AdamW second-moment decay
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1  # decoupled; matrices and embeddings only
  c.optim.grad_clip_norm = 1.0  # global-norm clip; 0 = off

  c.mesh = ml_collections.ConfigDict()
  # Pipeline stages (ar_jax/pipeline.py): the layer stack is split into this many contiguous
  # groups, each held and run by one group of devices. Families with a scanned layer stack.
  c.mesh.stage = 1
  c.mesh.data = -1  # data-parallel replicas; -1 = the devices left over
  c.mesh.fsdp = 1  # parameter/optimizer-state shards (batch is split over it too)
  c.mesh.tensor = 1  # tensor-parallel shards of heads, MLP and vocab
  # Multi-slice: the sizes above are then per slice (ICI links), and these across slices
  # (DCN); usually only data (or fsdp) crosses slices. A process counts as a slice on
  # hardware without slices.
  c.mesh.dcn_stage = 1
  c.mesh.dcn_data = 1
  c.mesh.dcn_fsdp = 1
  c.mesh.dcn_tensor = 1
  # (logical axis name, mesh axes) pairs read ahead of the model family's own RULES and the
  # shared ones (ar_jax/sharding.py), e.g. (('mlp', None),) keeps MLPs whole. A name no
  # rule lists is replicated.
  c.sharding_rules = ()
  # With mesh.stage > 1: each batch (each accumulation microbatch) is cut into this many
  # pipeline microbatches; 0 = as many as there are stages. The idle fraction of a step (the
  # bubble) is (stages - 1) / (microbatches * repeats + stages - 1).
  c.pipeline_microbatches = 0
  # Virtual stages per device (the circular schedule): 1 = GPipe. Each device then holds
  # `repeats` non-adjacent groups of layers and each microbatch goes round the stages that
  # many times; needs microbatches >= stages.
  c.pipeline_repeats = 1

  # Weights & Biases, beside metrics.jsonl and TensorBoard (process 0; the same scalars):
  # on when project is set. mode 'offline' writes WORKDIR/wandb for a later `wandb sync`.
  c.wandb = ml_collections.ConfigDict()
  c.wandb.project = ''
  c.wandb.entity = ''  # '' = the W&B default for the logged-in user
  c.wandb.name = ''  # '' = the workdir's name
  c.wandb.mode = 'online'  # 'online', 'offline' or 'disabled'

  # A jax.profiler trace of training steps start .. start + count - 1 into WORKDIR/profile
  # (process 0's); count 0 = none. See ar_jax/profiling.py.
  c.profile = ml_collections.ConfigDict()
  c.profile.steps = (0, 0)

  c.sample = ml_collections.ConfigDict()  # the sample written at the end of training
  c.sample.prompt = '\n'
  c.sample.max_new_tokens = 256  # clipped to the model's context
  c.sample.temperature = 0.8  # 0 = greedy
  c.sample.top_k = 0  # 0 = no top-k filter
  return c


def parse_arg(arg: str | None, choices: Mapping[str, Sequence[str] | None]) -> dict[str, str]:
  """'model=lstm,preset=nanogpt_cpu' -> {'model': 'lstm', 'preset': 'nanogpt_cpu'}.

  Every key must be one of `choices`, and its value one of choices[key] (any value where
  that is None, such as a path); a key not given takes the first of its choices ('').
  """
  parsed = {k: v[0] if v else '' for k, v in choices.items()}
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not choices:
      raise ConfigError(f'this experiment takes no config arg, got {arg!r}')
    if not sep or key not in choices:
      raise ConfigError(
        f'config arg {item!r} is not KEY=VALUE with KEY one of: {", ".join(choices)}'
      )
    if choices[key] is not None and value not in choices[key]:
      raise ConfigError(f'config arg {key}={value!r}; allowed: {", ".join(choices[key])}')
    parsed[key] = value
  return parsed


def load_experiment(path: str):
  """The module of an experiment file (experiments/NAME.py), loaded from its path as
  config_flags loads it."""
  check(os.path.isfile(path), f'--config={path}: no such experiment file')
  spec = importlib.util.spec_from_file_location(os.path.basename(path).removesuffix('.py'), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
