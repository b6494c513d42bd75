"""GPT-2 small (124M parameters) trained as nanoGPT trains it on OpenWebText, from a prepared
token store.

  python -m ar_jax.prepare --config=experiments/gpt2_small.py:data=DIR,tokenizer=PATH \
      --out=stores/owt
  python -m ar_jax.main --config=experiments/gpt2_small.py:store=stores/owt,tokenizer=PATH \
      --workdir=workdirs/gpt2_small

Arg keys: data=PATH (the corpus: a directory, file or glob of text, JSONL or Parquet files,
e.g. OpenWebText's Parquet files; 0.05% held out by a hash of each record), tokenizer=PATH
(a Hugging Face tokenizer.json, e.g. GPT-2's; without it, a byte-level BPE of GPT-2's 50,257
tokens is trained on the corpus's first 1 GB), store=DIR (data.prepared: the token store,
prepared there on first use if python -m ar_jax.prepare has not been run).
Without an accelerator, --mode=compile_only still compiles the train step for the mesh and
prints its memory per device (--config.mesh.* to try others).
"""

from ar_jax.config import defaults, parse_arg

CHOICES = {'data': None, 'tokenizer': None, 'store': None}  # paths


def get_config(arg: str | None = None):
  args = parse_arg(arg, CHOICES)
  c = defaults()
  c.data.name = 'files'
  c.data.path = args['data']
  c.data.val_fraction = 0.0005  # nanoGPT's OpenWebText split: 0.05% held out
  c.data.tokenizer = 'bpe'
  c.data.tokenizer_path = args['tokenizer']
  c.data.vocab_size = 50_257  # GPT-2's: 50,000 merges, 256 bytes, <|endoftext|>
  c.data.tokenizer_train_bytes = 1 << 30
  c.data.prepared = args['store']
  c.data.invalid_utf8 = 'skip'  # a web crawl holds a few; the manifest counts them
  c.data.seq_len = 1024  # GPT-2's context
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.d_model = 768
  c.model.max_len = 1024
  c.model.pos_encoding = 'learned'  # GPT-2's architecture exactly
  c.model.tie_embeddings = True
  c.model.dropout = 0.0  # nanoGPT: 0 for pretraining
  c.model.dtype = 'bfloat16'  # float32 parameters, bf16 matmuls (accelerators)
  c.model.scan_layers = True  # one compiled block: compiles in seconds, not minutes
  c.model.remat = 'dots_with_no_batch_dims_saveable'  # keeps the matmuls, recomputes the rest
  # nanoGPT's train_gpt2 config: 12 sequences x 1024 tokens x 40 accumulated = 491,520 tokens
  # per step (about 0.5M, as GPT-2), 600,000 steps (about 300B tokens).
  c.batch_size = 480
  c.grad_accum_steps = 5  # 96 sequences per microbatch: 12 per device on a mesh of 8
  c.num_train_steps = 600_000
  c.optim.learning_rate = 6e-4
  c.optim.min_learning_rate = 6e-5
  c.optim.warmup_steps = 2000
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.1
  c.optim.grad_clip_norm = 1.0
  c.log_every_steps = 10
  c.eval_every_steps = 2000
  c.eval_batches = 200 // 8  # nanoGPT's 200 batches of 12 sequences = 25 of 96
  c.eval_batch_size = 96
  c.checkpoint_every_steps = 1000
  c.sample.prompt = 'The'
  return c
