"""Generation quality across decoding strategies, for one trained model: greedy, temperatures,
top-k, top-p and beam search, each continuing the same prompts from held-out text.

  python -m launch.sweep --config=experiments/sampling.py --root=studies/sampling
  python -m ar_jax.study --root=studies/sampling          # -> studies/sampling/report.md

The sweep trains one model (the nanogpt_cpu transformer on tiny shakespeare, with a context
of PROMPT_CHARS + NEW_TOKENS characters; arg model=...
picks another family of experiments/shakespeare_char.py). The report measures, per strategy,
over PROMPTS continuations of NEW_TOKENS characters: diversity across them (distinct-n of
words, self-BLEU), repetition within each (seq-rep-4 of words) and the model's own perplexity
of what it generated (low: the model finds its text likely, which greedy and beam maximise
and which is not the same as good text).
"""

import math

import jax
import ml_collections
import numpy as np

from ar_jax import data, decode, metrics, workdir
from ar_jax.config import parse_arg
from ar_jax.studies import plots, reports
from experiments import shakespeare_char

PROMPTS = 24  # continuations per strategy: one per prompt
PROMPT_CHARS = 32  # each prompt: a window of held-out text
NEW_TOKENS = 200
STRATEGIES = {  # name -> decoding settings; beam > 1 is beam search
  'greedy': {'temperature': 0.0},
  'T=0.7': {'temperature': 0.7},
  'T=1.0': {'temperature': 1.0},
  'T=1.3': {'temperature': 1.3},
  'top-k=10': {'top_k': 10},
  'top-k=40': {'top_k': 40},
  'top-p=0.8': {'top_p': 0.8},
  'top-p=0.95': {'top_p': 0.95},
  'beam=4': {'beam': 4},
}


def get_config(arg: str | None = None):
  args = parse_arg(arg, {'model': shakespeare_char.CHOICES['model']})
  c = shakespeare_char.get_config(f'preset=nanogpt_cpu,model={args["model"]}')
  # A context that holds a prompt and its continuation (the preset's is 64 characters).
  c.data.seq_len = PROMPT_CHARS + NEW_TOKENS
  if c.model.name == 'transformer':
    c.model.max_len = c.data.seq_len
  c.batch_size = 8  # 1,856 characters a step
  return c


def sweep(add, arg):
  del arg
  add(model='transformer')


def prompts_from(text: str, count: int, chars: int) -> list[str]:
  """count windows of `chars` characters of held-out text, each starting at a line, evenly
  spaced through it."""
  starts = [0] + [i + 1 for i, c in enumerate(text) if c == '\n' and i + 1 + chars <= len(text)]
  picked = np.linspace(0, len(starts) - 1, count).round().astype(int)
  return [text[starts[i] : starts[i] + chars] for i in picked]


def measure(model, params, tokenizer, prompts: list[str], new_tokens: int, seed: int = 0):
  """One row per strategy: diversity, repetition and the model's perplexity of its samples."""
  ids = np.array([tokenizer.encode(p) for p in prompts], np.int32)  # prompts of equal length
  rows = []
  for name, settings in STRATEGIES.items():
    if settings.get('beam', 1) > 1:
      out = decode.search(
        model, params, ids, new_tokens, beam_size=settings['beam'], eos_id=tokenizer.eos_id
      )
      out = jax.tree.map(lambda a: a[:, 0], out)  # the best beam of each prompt
    else:
      sampling = {'temperature': 1.0, 'top_k': 0, 'top_p': 1.0, **settings}
      out = decode.generate(
        model, params, ids, new_tokens, jax.random.key(seed), eos_id=tokenizer.eos_id, **sampling
      )
    tokens, log_probs, lengths, _ = jax.device_get(out)
    p = ids.shape[1]
    texts = [tokenizer.decode(t[p:n]) for t, n in zip(tokens, lengths, strict=True)]
    words = [t.split() for t in texts]
    generated = int((lengths - p).sum())
    rows.append(
      {
        'strategy': name,
        'distinct-1': metrics.distinct_n(words, 1),
        'distinct-2': metrics.distinct_n(words, 2),
        'self-BLEU': metrics.self_bleu(texts),
        'rep-4': metrics.repetition_rate(words, 4),
        'perplexity': math.exp(-float(log_probs.sum()) / generated),
        'example': texts[0],
      }
    )
  return rows


def plot(rows, path: str):
  """Quality against diversity: the model's perplexity of its samples against distinct-2."""
  fig = plots.figure()
  ax = fig.subplots()
  for r in rows:
    ax.scatter(r['distinct-2'], r['perplexity'])
    ax.annotate(r['strategy'], (r['distinct-2'], r['perplexity']), fontsize=8)
  ax.set_xlabel('distinct-2 of words (diversity)')
  ax.set_ylabel("model's perplexity of its samples")
  ax.set_yscale('log')
  ax.grid(alpha=0.3)
  return plots.save(fig, path)


def report(runs, plots_dir):
  sections = []
  for run in (r for r in runs if r.final):
    model, params, tokenizer, _ = workdir.load(run.workdir)
    streams = data.load(ml_collections.ConfigDict(run.config['data']), tokenizer, train=False)
    held_out = tokenizer.decode(next(iter(streams.eval.values())))
    prompts = prompts_from(held_out, PROMPTS, PROMPT_CHARS)
    rows = measure(model, params, tokenizer, prompts, NEW_TOKENS)
    name = f'sampling_{run.name}.png'
    plot(rows, f'{plots_dir}/{name}')
    header = ('strategy', 'distinct-1', 'distinct-2', 'self-BLEU', 'rep-4', 'perplexity')
    body = [[r['strategy'], *(f'{r[k]:.3f}' for k in header[1:])] for r in rows]
    examples = '\n'.join(f'- {r["strategy"]}: `{r["example"][:80]!r}`' for r in rows)
    sections.append(
      f'## Decoding strategies: {run.name}\n\n{PROMPTS} prompts of {PROMPT_CHARS} held-out '
      f'characters, {NEW_TOKENS} new tokens each.\n\n'
      + reports.markdown_table(header, body)
      + f'\n\n![quality against diversity](plots/{name})\n\nFirst continuation of each:\n\n'
      + examples
    )
  return '\n\n'.join(sections)
