"""Scoring: the exact teacher-forced log-likelihood of given continuations of prompts, by the
full forward (no cache), for any model family.

Dimension legend: B prompts, P longest prompt, C longest continuation, L the scored width, V
vocab.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ar_jax.decode import sampling
from ar_jax.errors import check


def score(
  model: Any,
  params: Any,
  prompts_BP: jax.Array,
  continuations_BC: jax.Array,
  *,
  prompt_lengths: Any = None,
  continuation_lengths: Any = None,
  greedy: bool = False,
) -> tuple[jax.Array, ...]:
  """Exact log p(continuation | prompt) from the teacher-forced full forward (no cache).

  Both arrays are padded on the right; lengths default to their widths. Returns the sum per
  row [B] and each continuation token's log-probability [B, C] (0 past its length); with
  greedy=True also whether each row's continuation is the greedy one [B] (every token the
  argmax after the tokens before it: lm-eval's is_greedy), from the same forward.
  """
  prompts_BP = jnp.asarray(prompts_BP, jnp.int32)
  continuations_BC = jnp.asarray(continuations_BC, jnp.int32)
  (B, P), C = prompts_BP.shape, continuations_BC.shape[1]
  check(
    continuations_BC.shape[0] == B, f'{B} prompts but {continuations_BC.shape[0]} continuations'
  )
  prompt_B = sampling.checked_lengths(prompt_lengths, B, P, 'prompt')
  check(prompt_B.min() >= 1, 'scoring needs a prompt of at least one token in every row')
  continuation_B = sampling.checked_lengths(continuation_lengths, B, C, 'continuation')
  longest = int((prompt_B + continuation_B).max())
  if model.max_len:
    check(
      longest <= model.max_len,
      f"prompt + continuation of {longest} tokens exceeds the model's context of "
      f'{model.max_len} positions',
    )
  # A width from the padded shapes, not the data, so batches of one shape compile once.
  width = min(P + C, model.max_len or P + C)
  total_B, per_token_BC, greedy_B = _score(
    model,
    params,
    prompts_BP,
    jnp.asarray(prompt_B, jnp.int32),
    continuations_BC,
    jnp.asarray(continuation_B, jnp.int32),
    width,
  )
  return (total_B, per_token_BC, greedy_B) if greedy else (total_B, per_token_BC)


@functools.partial(jax.jit, static_argnames=('model', 'width'))
def _score(model, params, prompts_BP, prompt_B, continuations_BC, continuation_B, width):
  P, C = prompts_BP.shape[1], continuations_BC.shape[1]
  positions_L = jnp.arange(width)
  from_prompt_BL = prompts_BP[:, jnp.minimum(positions_L, P - 1)]
  into_continuation_BL = jnp.clip(positions_L - prompt_B[:, None], 0, C - 1)
  from_continuation_BL = jnp.take_along_axis(continuations_BC, into_continuation_BL, axis=1)
  tokens_BL = jnp.where(positions_L < prompt_B[:, None], from_prompt_BL, from_continuation_BL)
  tokens_BL = jnp.where(positions_L < (prompt_B + continuation_B)[:, None], tokens_BL, 0)
  log_p_BLV = jax.nn.log_softmax(model.apply({'params': params}, tokens_BL))
  # Position i predicts the token at i + 1.
  next_BL = jnp.pad(tokens_BL[:, 1:], ((0, 0), (0, 1)))
  log_p_BL = jnp.take_along_axis(log_p_BLV, next_BL[..., None], -1)[..., 0]
  predicted_at_BC = jnp.clip(prompt_B[:, None] - 1 + jnp.arange(C), 0, width - 1)
  scored_BC = jnp.arange(C) < continuation_B[:, None]
  per_token_BC = jnp.where(scored_BC, jnp.take_along_axis(log_p_BL, predicted_at_BC, axis=1), 0.0)
  # The first argmax, as torch's (lm-eval's reference), so ties count alike.
  argmax_BL = jnp.argmax(log_p_BLV, axis=-1) == next_BL
  greedy_BC = jnp.take_along_axis(argmax_BL, predicted_at_BC, axis=1) | ~scored_BC
  return per_token_BC.sum(-1), per_token_BC, greedy_BC.all(-1)
