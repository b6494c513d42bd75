"""Generation for any model that implements the model contract's cached step (scoring, by
the full forward, is in scoring.py).

Strategies: greedy (temperature 0), ancestral sampling, and its filters in one order:
temperature first (softmax(logits / temperature)), then top-k, then top-p (the smallest set
of tokens whose probability reaches p). Beam search, on the same prefill and loop, is in
beam.py.

Prompts of different lengths share a batch without left padding: the shortest common prefix
is prefilled in one cached step, then every row advances one position per step, fed its own
prompt token while it is still inside its prompt and its chosen token after. All rows stay at
one position (the transformer's cache keeps one index for the batch), and a recurrent carry
sees exactly its own tokens. Nothing here knows the family: caches are copied and reordered
along `model.cache_batch_axis`.

Dimension legend: B prompts, N samples per prompt, R rows decoded together (B * N, or B * W
beams), P longest prompt, L = P + new tokens, V vocab.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ar_jax.errors import check


class Generation(NamedTuple):
  """Sequences laid out as their prompt, then their continuation, then zeros.

  generate: [B * N] rows (sample n of prompt b is row b * N + n); beam.search: [B, W], the
  best hypothesis first. log_probs: log p(token | prefix) of each generated token under the
  model's own distribution (no temperature, no filter), 0 at prompt and padding positions.
  lengths: prompt + continuation, an end-of-sequence token included. scores: the sum of
  log_probs; beam search divides it by the length penalty (-inf: fewer hypotheses than W).
  """

  tokens: jax.Array  # [..., L] int32
  log_probs: jax.Array  # [..., L] float32
  lengths: jax.Array  # [...] int32
  scores: jax.Array  # [...] float32


def filter_logits(logits_BV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """Logits scaled by temperature, with the tokens top-k and top-p exclude set to -inf."""
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if 0 < top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    # Tokens by rank, ties by token id (the lower first), so the kept set is exactly the
    # smallest whose probability reaches p: a threshold on the value would keep every token
    # tied with the last one kept (all 50 of a uniform 50 at p = 0.1, not 5 or 6).
    order_BV = jnp.argsort(-logits_BV, axis=-1, stable=True)
    probs_BV = jax.nn.softmax(jnp.take_along_axis(logits_BV, order_BV, axis=-1), axis=-1)
    # Keep a token while the probability of the tokens ranked above it is below p, as the
    # definition (and Hugging Face's TopPLogitsWarper) says: the sums are float32's, so a
    # mass within its rounding (about 1e-7) of p may go either way, and none further.
    above_BV = jnp.pad(jnp.cumsum(probs_BV, axis=-1)[:, :-1], ((0, 0), (1, 0)))
    keep_BV = jnp.take_along_axis(above_BV < top_p, jnp.argsort(order_BV, axis=-1), axis=-1)
    logits_BV = jnp.where(keep_BV, logits_BV, -jnp.inf)
  return logits_BV


def sample_token(
  logits_BV: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float
) -> jax.Array:
  """One token per row: the argmax at temperature 0, else a draw from the filtered logits."""
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
  prompt_lengths: Any = None,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  eos_id: int | None = None,
  num_samples: int = 1,
) -> Generation:
  """Continues each prompt by up to max_new_tokens, stopping a row at eos_id.

  prompts_BP is padded on the right; prompt_lengths [B] (default: all P) says where each
  prompt ends. Greedy at temperature 0, else sampled (see the module docstring for the
  order of the filters). num_samples continuations of each prompt share its prefill.
  """
  check(temperature >= 0.0, f'temperature must be >= 0, got {temperature}')
  check(top_k >= 0, f'top_k must be >= 0, got {top_k}')
  check(0.0 < top_p <= 1.0, f'top_p must be in (0, 1], got {top_p}')
  check(num_samples >= 1, f'num_samples must be positive, got {num_samples}')
  prompts_BP, lengths_B, shortest = checked_prompts(
    model, prompts_BP, prompt_lengths, max_new_tokens
  )
  return _generate(
    model,
    params,
    prompts_BP,
    lengths_B,
    rng,
    max_new_tokens=max_new_tokens,
    shortest=shortest,
    num_samples=num_samples,
    temperature=float(temperature),
    top_k=top_k,
    top_p=float(top_p),
    eos_id=eos_arg(eos_id),
  )


def eos_arg(eos_id: int | None) -> jax.Array:
  """An argument, not a compile-time constant; -1 (no token id) for none."""
  return jnp.int32(-1 if eos_id is None else eos_id)


def checked_lengths(lengths: Any, batch: int, width: int, what: str) -> np.ndarray:
  """Lengths [B] as numpy, checked against their padded width."""
  lengths_B = np.full(batch, width) if lengths is None else np.asarray(lengths)
  check(lengths_B.shape == (batch,), f'{what}_lengths has shape {lengths_B.shape}, not ({batch},)')
  check(
    lengths_B.min() >= 0 and lengths_B.max() <= width,
    f'{what}_lengths must be in [0, {width}] (the padded width), got {lengths_B.tolist()}',
  )
  return lengths_B


def checked_prompts(model, prompts_BP, prompt_lengths, max_new_tokens):
  """(prompts cut to the longest, lengths [B], the shortest length), checked against the
  model's context."""
  prompts_BP = jnp.asarray(prompts_BP, jnp.int32)
  check(prompts_BP.ndim == 2, f'prompts must be [batch, length], got shape {prompts_BP.shape}')
  lengths_B = checked_lengths(prompt_lengths, *prompts_BP.shape, 'prompt')
  check(lengths_B.min() >= 1, 'generation needs a prompt of at least one token in every row')
  check(max_new_tokens >= 1, f'max_new_tokens must be positive, got {max_new_tokens}')
  P = int(lengths_B.max())
  if model.max_len:
    check(
      P + max_new_tokens <= model.max_len,
      f'prompt of {P} tokens + {max_new_tokens} new tokens = {P + max_new_tokens} exceeds the '
      f"model's context of {model.max_len} positions",
    )
  return prompts_BP[:, :P], jnp.asarray(lengths_B, jnp.int32), int(lengths_B.min())


def prefill(model, params, prompts_BP, lengths_B, max_new_tokens, shortest):
  """(prompts [B, L], zeros past each length; logits [B, V] for position `shortest`; cache)."""
  B, P = prompts_BP.shape
  L = P + max_new_tokens
  padded_BL = jnp.pad(prompts_BP, ((0, 0), (0, max_new_tokens)))
  prompts_BL = jnp.where(jnp.arange(L) < lengths_B[:, None], padded_BL, 0)
  cache = model.init_cache(B, L)
  logits_BTV, cache = model.apply(
    {'params': params}, prompts_BL[:, :shortest], cache, method=model.step
  )
  return prompts_BL, logits_BTV[:, -1], cache


def repeat_rows(model, cache, n):
  """The cache with each row repeated n times in place (row b becomes rows b*n .. b*n+n-1)."""
  axis = model.cache_batch_axis
  return jax.tree.map(lambda a: a if a.ndim == 0 else jnp.repeat(a, n, axis=axis), cache)


def decode_loop(model, params, choose, state, cache, logits_RV, start, stop):
  """Runs choose(t, logits_RV, state, cache) -> (state, cache, tokens_R, all_done) at
  position start, then at each later position after feeding it the tokens it chose, in one
  compiled loop, until every row is done or position stop. Returns the last state."""

  def cond(carry):
    t, *_, all_done = carry
    return (t < stop) & ~all_done

  def body(carry):
    t, state, cache, tokens_R, _ = carry
    logits_R1V, cache = model.apply({'params': params}, tokens_R[:, None], cache, method=model.step)
    return (t + 1, *choose(t, logits_R1V[:, 0], state, cache))

  carry = (jnp.int32(start + 1), *choose(start, logits_RV, state, cache))
  return jax.lax.while_loop(cond, body, carry)[1]


@functools.partial(
  jax.jit,
  static_argnames=(
    'model',
    'max_new_tokens',
    'shortest',
    'num_samples',
    'temperature',
    'top_k',
    'top_p',
  ),
)
def _generate(
  model,
  params,
  prompts_BP,
  lengths_B,
  rng,
  *,
  max_new_tokens,
  shortest,
  num_samples,
  temperature,
  top_k,
  top_p,
  eos_id,
):
  prompts_BL, logits_BV, cache = prefill(
    model, params, prompts_BP, lengths_B, max_new_tokens, shortest
  )
  # The samples of a prompt share its prefill: rows are copied after it, not before.
  prompts_RL, logits_RV, prompt_R = (
    jnp.repeat(a, num_samples, axis=0) for a in (prompts_BL, logits_BV, lengths_B)
  )
  cache = repeat_rows(model, cache, num_samples)
  limit_R = prompt_R + max_new_tokens

  def choose(t, logits_RV, state, cache):
    tokens_RL, log_probs_RL, lengths_R, done_R = state
    in_prompt_R = t < prompt_R
    live_R = ~in_prompt_R & ~done_R
    sampled_R = sample_token(logits_RV, jax.random.fold_in(rng, t), temperature, top_k, top_p)
    token_R = jnp.where(in_prompt_R, tokens_RL[:, t], jnp.where(live_R, sampled_R, 0))
    log_p_R = jnp.take_along_axis(jax.nn.log_softmax(logits_RV), token_R[:, None], -1)[:, 0]
    state = (
      tokens_RL.at[:, t].set(token_R),
      log_probs_RL.at[:, t].set(jnp.where(live_R, log_p_R, 0.0)),
      jnp.where(live_R, t + 1, lengths_R),
      done_R | (live_R & ((token_R == eos_id) | (t + 1 >= limit_R))),
    )
    return state, cache, token_R, jnp.all(state[3])

  state = (
    prompts_RL,
    jnp.zeros(prompts_RL.shape, jnp.float32),
    prompt_R,
    jnp.zeros(prompt_R.shape, bool),
  )
  tokens_RL, log_probs_RL, lengths_R, _ = decode_loop(
    model, params, choose, state, cache, logits_RV, shortest, prompts_RL.shape[1]
  )
  return Generation(tokens_RL, log_probs_RL, lengths_R, log_probs_RL.sum(-1))


@functools.partial(jax.jit, static_argnames=('model', 'num_new', 'cached', 'temperature'))
def sample_loop(
  model: Any,
  params: Any,
  prompt_BP: jax.Array,
  rng: jax.Array,
  *,
  num_new: int,
  cached: bool,
  temperature: float = 1.0,
) -> jax.Array:
  """The prompt and num_new tokens sampled the plain way, [B, P + num_new]; the token at
  position t is drawn with the key fold_in(rng, t), so both ways of computing the logits
  draw alike: the check on a family's cache, and the baseline its speed is measured against.

  cached=True: one prefill, then one cached step per token (for WaveNet, Fast WaveNet).
  cached=False: the full forward over the whole sequence buffer for every new token.
  """
  P = prompt_BP.shape[1]
  tokens_BL = jnp.pad(prompt_BP.astype(jnp.int32), ((0, 0), (0, num_new)))

  def draw(t, logits_BV, tokens_BL):
    token_B = sample_token(logits_BV, jax.random.fold_in(rng, t), temperature, 0, 1.0)
    return tokens_BL.at[:, t].set(token_B)

  if not cached:

    def naive(t, tokens_BL):
      logits_BLV = model.apply({'params': params}, tokens_BL)
      return draw(t, jax.lax.dynamic_index_in_dim(logits_BLV, t - 1, 1, keepdims=False), tokens_BL)

    return jax.lax.fori_loop(P, P + num_new, naive, tokens_BL)

  step = functools.partial(model.apply, {'params': params}, method=model.step)
  logits_BPV, cache = step(prompt_BP, model.init_cache(prompt_BP.shape[0], P + num_new))
  tokens_BL = draw(P, logits_BPV[:, -1], tokens_BL)

  def fast(t, carry):
    tokens_BL, cache = carry
    logits_B1V, cache = step(jax.lax.dynamic_slice_in_dim(tokens_BL, t - 1, 1, axis=1), cache)
    return draw(t, logits_B1V[:, 0], tokens_BL), cache

  return jax.lax.fori_loop(P + 1, P + num_new, fast, (tokens_BL, cache))[0]


def sample_images(
  model: Any,
  params: Any,
  rng: jax.Array,
  num_images: int,
  image_shape: tuple[int, int, int],
  bos_id: int,
  temperature: float = 1.0,
) -> np.ndarray:
  """Whole images, [num_images, H, W, C], drawn sub-pixel by sub-pixel in raster order after
  BOS: the token layout of the 'pixel' tokenizer (ar_jax/data/images.py)."""
  bos_B1 = jnp.full((num_images, 1), bos_id, jnp.int32)
  n = int(np.prod(image_shape))
  tokens = generate(model, params, bos_B1, n, rng, temperature=temperature).tokens
  return np.asarray(tokens[:, 1:]).reshape(num_images, *image_shape).astype(np.uint8)
