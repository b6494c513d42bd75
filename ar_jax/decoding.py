"""Generation for any model that implements the cached step of the model contract.

Sampling order: temperature first (softmax(logits / temperature); 0 means greedy), then
top-k, then top-p (the smallest set of tokens whose probability reaches p).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ar_jax.errors import check


def filter_logits(logits_BV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """Logits scaled by temperature, with the tokens top-k and top-p exclude set to -inf."""
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep a token while the probability of the tokens ranked above it is still below p.
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    threshold_B1 = jnp.min(jnp.where(before_BV < top_p, sorted_BV, jnp.inf), -1, keepdims=True)
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return logits_BV


def sample_token(
  logits_BV: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float
) -> jax.Array:
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits_BV, temperature, top_k, top_p)
  return jax.random.categorical(rng, filtered).astype(jnp.int32)


def generate(
  model: Any,
  params: Any,
  prompts_BP: jax.Array,
  max_new_tokens: int,
  rng: jax.Array,
  *,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
) -> jax.Array:
  """Prompt [B, P] -> prompt and continuation [B, P + max_new_tokens].

  The prompt is prefilled in one cached step; then one token per step in a compiled scan.
  """
  B, P = prompts_BP.shape
  check(P >= 1, 'generation needs a prompt of at least one token')
  check(max_new_tokens >= 1, f'max_new_tokens must be positive, got {max_new_tokens}')
  check(temperature >= 0.0, f'temperature must be >= 0, got {temperature}')
  check(top_k >= 0, f'top_k must be >= 0, got {top_k}')
  check(0.0 < top_p <= 1.0, f'top_p must be in (0, 1], got {top_p}')
  if model.max_len:
    check(
      P + max_new_tokens <= model.max_len,
      f'prompt of {P} tokens + {max_new_tokens} new tokens = {P + max_new_tokens} exceeds the '
      f"model's context of {model.max_len} positions",
    )
  return _generate(
    model,
    params,
    jnp.asarray(prompts_BP, jnp.int32),
    rng,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
  )


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _generate(model, params, prompts_BP, rng, max_new_tokens, temperature, top_k, top_p):
  B, P = prompts_BP.shape
  variables = {'params': params}
  sample = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)
  cache = model.init_cache(B, P + max_new_tokens)
  logits_BPV, cache = model.apply(variables, prompts_BP, cache, method=model.step)
  first_B = sample(logits_BPV[:, -1], jax.random.fold_in(rng, 0))

  def one_token(carry, i):
    token_B, cache = carry
    logits_B1V, cache = model.apply(variables, token_B[:, None], cache, method=model.step)
    return (sample(logits_B1V[:, -1], jax.random.fold_in(rng, i)), cache), token_B

  (last_B, _), tokens_NB = jax.lax.scan(one_token, (first_B, cache), jnp.arange(1, max_new_tokens))
  return jnp.concatenate([prompts_BP, tokens_NB.T, last_B[:, None]], axis=1)
