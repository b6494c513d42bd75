"""Beam search with GNMT's or Hugging Face's length penalty, for any model that implements
the model contract's cached step, on the prefill and decoding loop of decoding.py.

Dimension legend: B prompts, W beams, R rows decoded together (B * W), P longest prompt,
L = P + new tokens, V vocab, K beam candidates.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ar_jax.decode.sampling import (
  Generation,
  checked_prompts,
  decode_loop,
  eos_arg,
  prefill,
  repeat_rows,
)
from ar_jax.errors import check

# Beam scores are log p divided by a penalty growing with the new tokens' length (eos counted).
LENGTH_PENALTIES = {
  'gnmt': lambda length, alpha: ((5.0 + length) / 6.0) ** alpha,  # Wu et al. 2016, eq. 14
  'hf': lambda length, alpha: length**alpha,  # Hugging Face generate's length_penalty
}


def length_penalty(length: jax.Array, alpha: float, kind: str = 'gnmt') -> jax.Array:
  """The penalty a hypothesis of `length` new tokens is divided by: GNMT's
  ((5 + length) / 6) ** alpha or Hugging Face's length ** alpha."""
  return LENGTH_PENALTIES[kind](length, alpha)


def search(
  model: Any,
  params: Any,
  prompts_BP: jax.Array,
  max_new_tokens: int,
  *,
  beam_size: int,
  length_penalty_alpha: float = 0.6,
  length_penalty_kind: str = 'gnmt',
  early_stopping: bool = False,
  prompt_lengths: Any = None,
  eos_id: int | None = None,
) -> Generation:
  """The beam_size best continuations of each prompt, [B, W], best first.

  A hypothesis ends at eos_id (kept, included in its length) or after max_new_tokens; its
  score is its log-probability divided by length_penalty(new tokens, alpha, kind). A prompt's
  search stops once no unfinished beam can beat its W-th finished hypothesis (exact: Hugging
  Face's early_stopping='never'), or with early_stopping as soon as it has W finished ones
  (Hugging Face's early_stopping=True: faster, and it may miss a better longer hypothesis).
  """
  check(beam_size >= 1, f'beam_size must be positive, got {beam_size}')
  check(
    length_penalty_kind in LENGTH_PENALTIES,
    f'length_penalty_kind={length_penalty_kind!r}; allowed: {", ".join(LENGTH_PENALTIES)}',
  )
  # Log-probabilities only fall as a beam grows, so with alpha >= 0 a beam's score now,
  # divided by the longest length's penalty, bounds every score it can reach: the stop rule.
  check(
    length_penalty_alpha >= 0.0,
    f'the length penalty alpha must be >= 0, got {length_penalty_alpha}',
  )
  prompts_BP, lengths_B, shortest = checked_prompts(
    model, prompts_BP, prompt_lengths, max_new_tokens
  )
  return _search(
    model,
    params,
    prompts_BP,
    lengths_B,
    max_new_tokens=max_new_tokens,
    shortest=shortest,
    beam_size=beam_size,
    alpha=float(length_penalty_alpha),
    kind=length_penalty_kind,
    early_stopping=bool(early_stopping),
    eos_id=eos_arg(eos_id),
  )


class _Beams(NamedTuple):
  """Per prompt: W unfinished beams (score: their log-probability) and the W best finished
  hypotheses (score: divided by the length penalty), each best first."""

  alive_tokens: jax.Array  # [B, W, L]
  alive_log_probs: jax.Array  # [B, W, L]
  alive_scores: jax.Array  # [B, W]
  finished: Generation  # [B, W, ...]


@functools.partial(
  jax.jit,
  static_argnames=(
    'model',
    'max_new_tokens',
    'shortest',
    'beam_size',
    'alpha',
    'kind',
    'early_stopping',
  ),
)
def _search(
  model,
  params,
  prompts_BP,
  lengths_B,
  *,
  max_new_tokens,
  shortest,
  beam_size,
  alpha,
  kind,
  early_stopping,
  eos_id,
):
  prompts_BL, logits_BV, cache = prefill(
    model, params, prompts_BP, lengths_B, max_new_tokens, shortest
  )
  (B, L), W = prompts_BL.shape, beam_size
  logits_RV = jnp.repeat(logits_BV, W, axis=0)
  cache = repeat_rows(model, cache, W)
  limit_B = lengths_B + max_new_tokens
  best_penalty = length_penalty(max_new_tokens, alpha, kind)

  def take(a_BK, index_BW):
    """Entries [b, index[b, w]] of a [B, K, ...] array."""
    return jax.vmap(lambda a, i: a[i])(a_BK, index_BW)

  def choose(t, logits_RV, beams, cache):
    V = logits_RV.shape[-1]
    in_prompt_B = t < lengths_B
    log_p_BWV = jax.nn.log_softmax(logits_RV).reshape(B, W, V)
    # Inside its prompt, a row's one continuation is its prompt token, at no cost.
    forced_BV = jnp.where(jnp.arange(V) == prompts_BL[:, t, None], 0.0, -jnp.inf)
    log_p_BWV = jnp.where(in_prompt_B[:, None, None], forced_BV[:, None], log_p_BWV)
    # 2W candidates: at most W of them end here (one eos per beam), so W can go on.
    candidates_BK, index_BK = jax.lax.top_k(
      (beams.alive_scores[:, :, None] + log_p_BWV).reshape(B, W * V), min(2 * W, W * V)
    )
    beam_BK, token_BK = index_BK // V, (index_BK % V).astype(jnp.int32)
    tokens_BKL = take(beams.alive_tokens, beam_BK).at[:, :, t].set(token_BK)
    log_probs_BKL = (
      take(beams.alive_log_probs, beam_BK)
      .at[:, :, t]
      .set(jnp.take_along_axis(log_p_BWV.reshape(B, W * V), index_BK, axis=1))
    )
    ends_BK = ~in_prompt_B[:, None] & ((token_BK == eos_id) | (t + 1 >= limit_B)[:, None])

    alive_scores, pick_BW = jax.lax.top_k(jnp.where(ends_BK, -jnp.inf, candidates_BK), W)
    rows_R = (jnp.arange(B)[:, None] * W + take(beam_BK, pick_BW)).reshape(-1)
    cache = jax.tree.map(
      lambda a: a if a.ndim == 0 else jnp.take(a, rows_R, axis=model.cache_batch_axis), cache
    )

    new_B = t + 1 - lengths_B
    if early_stopping:
      # As Hugging Face's BeamSearchScorer: an ending candidate finishes only if it ranks
      # among the top W of the 2W, and a prompt with W finished hypotheses takes no more.
      # (The exact search lets any ending candidate finish: more can only find better.)
      top_w_K = jnp.arange(ends_BK.shape[1]) < W
      open_B1 = (beams.finished.scores[:, -1] == -jnp.inf)[:, None]
      ends_BK &= top_w_K & open_B1
    penalty_B = length_penalty(new_B, alpha, kind)
    ended_BK = jnp.where(ends_BK, candidates_BK / penalty_B[:, None], -jnp.inf)
    pool = Generation(
      tokens=jnp.concatenate([beams.finished.tokens, tokens_BKL], 1),
      log_probs=jnp.concatenate([beams.finished.log_probs, log_probs_BKL], 1),
      lengths=jnp.concatenate(
        [beams.finished.lengths, jnp.broadcast_to(t + 1, ends_BK.shape).astype(jnp.int32)], 1
      ),
      scores=jnp.concatenate([beams.finished.scores, ended_BK], 1),
    )
    finished_scores, keep_BW = jax.lax.top_k(pool.scores, W)
    finished = Generation(*(take(a, keep_BW) for a in pool[:3]), finished_scores)

    beams = _Beams(take(tokens_BKL, pick_BW), take(log_probs_BKL, pick_BW), alive_scores, finished)
    full_B = finished_scores[:, -1] > -jnp.inf
    done_B = (t + 1 >= limit_B) | (finished_scores[:, -1] >= alive_scores[:, 0] / best_penalty)
    done_B |= full_B if early_stopping else False
    return beams, cache, beams.alive_tokens[:, :, t].reshape(-1), jnp.all(done_B)

  tokens_BWL = jnp.repeat(prompts_BL[:, None], W, axis=1)
  # One live beam per prompt at first: the copies would only repeat its candidates.
  alive_scores = jnp.where(jnp.arange(W) == 0, 0.0, -jnp.inf) * jnp.ones((B, 1))
  empty = Generation(
    tokens=tokens_BWL,
    log_probs=jnp.zeros(tokens_BWL.shape, jnp.float32),
    lengths=jnp.zeros((B, W), jnp.int32),
    scores=jnp.full((B, W), -jnp.inf),
  )
  beams = _Beams(tokens_BWL, empty.log_probs, alive_scores, empty)
  return decode_loop(model, params, choose, beams, cache, logits_RV, shortest, L).finished
