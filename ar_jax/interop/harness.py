"""A run evaluated on tasks of EleutherAI's lm-evaluation-harness (lm-eval 0.4), by
ar_jax/lm_harness.py:

  python -m ar_jax.lm_harness --workdir=DIR --tasks=lambada_openai,hellaswag [--limit=100] \
      [--include_path=DIR_OF_TASK_YAMLS] [--builtin_tasks=false] [--num_fewshot=N] \
      [--batch_size=16] [--max_length=N] [--seed=0] [--output=results.json]

prints lm-eval's results table, and with --output writes its results as JSON. From Python,
importing this module registers the model 'ar_jax' with lm-eval:
lm_eval.simple_evaluate(model='ar_jax', model_args='workdir=DIR,batch_size=16', tasks=[...]).
Needs the [eval] extra: pip install -e '.[eval]'.

Requests are read as lm-eval's Hugging Face model reads them. loglikelihood: context and
continuation are encoded together and split, trailing spaces of the context moved to the
continuation; an empty context is the end-of-sequence token; both left-truncated to
max_length tokens. loglikelihood_rolling: the text after the end-of-sequence token, in
lm-eval's disjoint windows of max_length tokens. generate_until: greedy unless do_sample, the
prompt left-truncated to max_length - max_gen_toks, the text cut at the first stop string (a
row stops decoding at the end-of-sequence token or after max_gen_toks, not at a stop string).
max_length is the model's context (model.max_len), or for a model without one (recurrent,
convolutional) a window of DEFAULT_WINDOW tokens; model arg max_length lowers it.
"""

import json
import os
from typing import Any

import jax
import numpy as np

from ar_jax import decode
from ar_jax import workdir as workdir_lib
from ar_jax.errors import check

try:
  import lm_eval
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
  from lm_eval.models.utils import normalize_gen_kwargs
  from lm_eval.tasks import TaskManager
  from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
  from tqdm import tqdm
except ImportError as e:  # the [eval] extra is optional: one line says how to add it
  raise ImportError(f"ar_jax.lm_harness needs lm-eval ({e}): pip install -e '.[eval]'") from e

# max_length of a model with no context limit: bounds memory and the widths jit compiles for.
DEFAULT_WINDOW = 2048
# The generation kwargs decode.generate has a meaning for; a task asking for more is refused.
GEN_KWARGS = ('until', 'max_gen_toks', 'do_sample', 'temperature', 'top_k', 'top_p')


@register_model('ar_jax')
class ArJaxLM(TemplateLM):
  """lm-eval's model interface over a workdir's latest checkpoint, scored and decoded by
  ar_jax's own decode.score and decode.generate, in batches of batch_size rows padded to
  power-of-two widths, so that jit compiles a handful of shapes, not one per request."""

  def __init__(
    self,
    workdir: str,
    batch_size: int | str = 16,
    max_length: int | None = None,
    max_gen_toks: int = 256,
    seed: int = 0,
    device: str | None = None,
    max_batch_size: int | None = None,
  ):
    # lm-eval passes device and max_batch_size to every model it builds by name: JAX places
    # the parameters itself, and batches here are always batch_size rows.
    del device, max_batch_size
    super().__init__()
    check(
      str(batch_size).isdigit() and int(batch_size) > 0,
      f'batch_size must be a positive integer, got {batch_size!r}',
    )
    self.batch_size = int(batch_size)
    self.model, self.params, self.tokenizer, self.step = workdir_lib.load(workdir)
    context = self.model.max_len
    self.max_length = int(max_length or context or DEFAULT_WINDOW)
    check(
      2 <= self.max_length <= (context or self.max_length),
      f"max_length must be in [2, {context or 'any'}] (the model's context), got {max_length}",
    )
    self.max_gen_toks = int(max_gen_toks)
    self.rng = jax.random.key(seed)
    self.batches_drawn = 0  # folded into the key: every generated batch draws anew

  @property
  def eot_token_id(self) -> int:
    """What an empty context and a rolling text's first token are conditioned on."""
    check(
      self.tokenizer.eos_id is not None,
      f"this run's {self.tokenizer.kind} tokenizer has no end-of-sequence token to condition "
      'an empty context or the start of a text on',
    )
    return self.tokenizer.eos_id

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    del add_special_tokens, kwargs  # ar_jax's tokenizers add no special tokens to text
    return self.tokenizer.encode(string).tolist()

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    """TemplateLM.loglikelihood has encoded each (context, continuation) request as lm-eval's
    Hugging Face model does (empty contexts included)."""
    return self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    # Windows of max_length - 1 predicted tokens: with the token before them, each window is
    # at most max_length tokens (lm-eval's max_seq_len counts the inputs only).
    owners, windows = [], []
    for i, (text,) in enumerate(r.args for r in requests):
      for window in get_rolling_token_windows(
        self.tok_encode(text), self.prefix_token_id, self.max_length - 1, context_len=1
      ):
        owners.append(i)
        windows.append(make_disjoint_window(window))
    totals = [0.0] * len(requests)
    for i, (log_p, _) in zip(owners, self._score(windows, disable_tqdm), strict=True):
      totals[i] += log_p
    return totals

  def _score(self, pairs, disable_tqdm: bool) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether it is the greedy continuation) of each (context,
    continuation) token pair, left-truncated to max_length tokens, scored longest first."""
    rows = [self._fit(ctx, cont) for ctx, cont in pairs]
    order = sorted(range(len(rows)), key=lambda i: -sum(map(len, rows[i])))
    results = [None] * len(rows)
    batches = range(0, len(order), self.batch_size)
    for start in tqdm(batches, 'ar_jax loglikelihood batches', disable=disable_tqdm):
      batch = order[start : start + self.batch_size]
      contexts, context_B = self._padded([rows[i][0] for i in batch], filler_length=1)
      continuations, continuation_B = self._padded([rows[i][1] for i in batch], filler_length=0)
      total_B, _, greedy_B = decode.score(
        self.model,
        self.params,
        contexts,
        continuations,
        prompt_lengths=context_B,
        continuation_lengths=continuation_B,
        greedy=True,
      )
      total_B, greedy_B = jax.device_get((total_B, greedy_B))
      for b, i in enumerate(batch):
        results[i] = (float(total_B[b]), bool(greedy_B[b]))
    return results

  def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
    """The pair with its context left-truncated so that both fit max_length tokens."""
    check(
      len(continuation) < self.max_length,
      f'a continuation of {len(continuation)} tokens leaves no room for a token of context '
      f'in max_length={self.max_length}',
    )
    kept = (context + continuation)[-self.max_length :]
    return kept[: len(kept) - len(continuation)], continuation

  def _padded(self, rows, filler_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows right-padded with zeros into [batch_size, a power-of-two width at most
    max_length] and their lengths; rows of filler_length zeros fill a short batch."""
    longest = max(1, *map(len, rows))
    padded = np.zeros((self.batch_size, _bucket(longest, self.max_length)), np.int32)
    lengths = np.full(self.batch_size, filler_length, np.int32)
    for b, row in enumerate(rows):
      padded[b, : len(row)] = row
      lengths[b] = len(row)
    return padded, lengths

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    # One decoding setting per call of generate: requests grouped by their kwargs.
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
      groups.setdefault(json.dumps(r.args[1], sort_keys=True), []).append(i)
    results = [''] * len(requests)
    for key, indices in groups.items():
      kwargs = normalize_gen_kwargs(json.loads(key), self.max_gen_toks)
      unknown = sorted(set(kwargs) - set(GEN_KWARGS))
      check(not unknown, f'generation kwargs {unknown} are not supported; known: {GEN_KWARGS}')
      new = kwargs['max_gen_toks']
      check(
        0 < new < self.max_length,
        f'max_gen_toks={new} leaves no room for a prompt in max_length={self.max_length}',
      )
      stops = [s for s in kwargs['until'] if s]
      settings = dict(
        temperature=float(kwargs.get('temperature', 0.0)) if kwargs['do_sample'] else 0.0,
        top_k=int(kwargs.get('top_k', 0)),
        top_p=float(kwargs.get('top_p', 1.0)),
      )
      prompts = {i: self._prompt(requests[i].args[0], self.max_length - new) for i in indices}
      indices.sort(key=lambda i: -len(prompts[i]))
      batches = range(0, len(indices), self.batch_size)
      for start in tqdm(batches, 'ar_jax generation batches', disable=disable_tqdm):
        batch = indices[start : start + self.batch_size]
        texts = self._generate([prompts[i] for i in batch], new, settings)
        for i, text in zip(batch, texts, strict=True):
          results[i] = _cut(text, stops)
    return results

  def _prompt(self, context: str, room: int) -> list[int]:
    """The context's last `room` tokens; an empty one is the end-of-sequence token."""
    return (self.tok_encode(context) or [self.eot_token_id])[-room:]

  def _generate(self, prompts: list[list[int]], new: int, settings: dict) -> list[str]:
    """The decoded continuation of each prompt. decode.generate compiles for its batch's
    longest and shortest prompt lengths: two more rows, discarded, of the padded width and
    of the power of two at or below the shortest prompt fix both to a handful of values."""
    short = 1 << (min(map(len, prompts)).bit_length() - 1)
    prompts_BP, lengths_B = self._padded(prompts, filler_length=short)
    width = min(prompts_BP.shape[1], self.max_length - new)
    self.batches_drawn += 1
    out = decode.generate(
      self.model,
      self.params,
      np.concatenate([prompts_BP[:, :width], np.zeros((2, width), np.int32)]),
      new,
      jax.random.fold_in(self.rng, self.batches_drawn),
      prompt_lengths=np.concatenate([lengths_B, [width, short]]),
      eos_id=self.tokenizer.eos_id,
      **settings,
    )
    tokens, ends = jax.device_get((out.tokens, out.lengths))
    return [self.tokenizer.decode(tokens[b, len(p) : ends[b]]) for b, p in enumerate(prompts)]


def _bucket(n: int, cap: int) -> int:
  """The power of two at or above n, at most cap."""
  return min(1 << (n - 1).bit_length(), cap)


def _cut(text: str, stops: list[str]) -> str:
  """text up to the first occurrence of any stop string."""
  return text[: min([text.find(s) for s in stops if s in text], default=len(text))]


def evaluate(
  lm: ArJaxLM,
  tasks: list[str],
  *,
  include_path: str | None = None,
  builtin_tasks: bool = True,
  **evaluate_kwargs: Any,
) -> dict:
  """lm_eval.simple_evaluate of lm on tasks found among include_path's task YAMLs and, with
  builtin_tasks, lm-eval's own (indexing them takes seconds)."""
  if include_path:
    check(os.path.isdir(include_path), f'--include_path={include_path} is not a directory')
  manager = TaskManager(include_path=include_path, include_defaults=builtin_tasks)
  unknown = [t for t in tasks if t not in manager.all_tasks and not os.path.isfile(t)]
  check(
    not unknown,
    f'no lm-eval task {", ".join(unknown)}: not a task, group or tag name '
    + ("of lm-eval's or " if builtin_tasks else '')
    + 'of a YAML in --include_path, nor a task YAML file',
  )
  return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, **evaluate_kwargs)
