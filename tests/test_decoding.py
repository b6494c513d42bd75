"""Decoding: every strategy against its definition, on every model family available."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ar_jax import decode, models
from ar_jax.errors import ConfigError
from tests.helpers import random_model

V = 11
FAMILIES = [(name, '') for name in models.available()]


@pytest.fixture(scope='module', params=FAMILIES, ids=lambda f: f[0])
def family(request):
  return random_model(request.param[0], V)


# Copying and reordering caches (samples, beams) also on a cache whose batch axis is not 0.
@pytest.fixture(
  scope='module',
  params=[*FAMILIES, ('transformer', 'sinusoidal_scanned')],
  ids=lambda f: '-'.join(filter(None, f)),
)
def family_and_layout(request):
  name, variant = request.param
  return random_model(name, V, variant)


PROMPTS = np.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8], [9, 0, 0, 0, 0]])
LENGTHS = np.array([3, 5, 1])
NEW = 8  # new tokens per prompt in the family tests


def segments(a, starts, stops, width: int = NEW) -> np.ndarray:
  """Entries starts[r]:stops[r] of each row of a [..., L] array, left-aligned, zero-padded to
  width (one width: one compiled score)."""
  a = np.asarray(a).reshape(len(starts), -1)
  out = np.zeros((len(a), width), a.dtype)
  for r, (start, stop) in enumerate(zip(starts, stops, strict=True)):
    out[r, : stop - start] = a[r, start:stop]
  return out


def check_against_score(model, params, out: decode.Generation, prompts, prompt_lengths):
  """Asserts that out's log-probabilities (from the cached step) are those of a full forward;
  returns the teacher-forced total of each row and each row's continuation length."""
  ends = np.asarray(out.lengths).reshape(-1)
  new = ends - prompt_lengths
  total, per_token = decode.score(
    model,
    params,
    prompts,
    segments(out.tokens, prompt_lengths, ends),
    prompt_lengths=prompt_lengths,
    continuation_lengths=new,
  )
  np.testing.assert_allclose(per_token, segments(out.log_probs, prompt_lengths, ends), atol=1e-4)
  return np.asarray(total), new


def test_cached_greedy_equals_the_full_forward_for_prompts_of_any_length(family):
  model, params = family
  out = decode.generate(
    model, params, PROMPTS, NEW, jax.random.key(0), prompt_lengths=LENGTHS, temperature=0.0
  )
  # No cache: the whole prefix every step, each row fed its own prompt while inside it.
  # Zeros after the prefix change nothing (causal) and keep one compiled shape.
  forward = jax.jit(lambda t: jax.nn.log_softmax(model.apply({'params': params}, t)))
  L = PROMPTS.shape[1] + NEW
  tokens = np.zeros((3, L), np.int32)
  tokens[:, :5] = np.where(np.arange(5) < LENGTHS[:, None], PROMPTS, 0)
  log_probs = np.zeros((3, L), np.float32)
  for t in range(1, L):
    log_p = np.asarray(forward(tokens)[:, t - 1])
    for b in range(3):
      if LENGTHS[b] <= t < LENGTHS[b] + NEW:
        tokens[b, t] = np.argmax(log_p[b])
        log_probs[b, t] = log_p[b].max()
  np.testing.assert_array_equal(out.tokens, tokens)
  np.testing.assert_array_equal(out.lengths, LENGTHS + NEW)
  np.testing.assert_allclose(out.log_probs, log_probs, atol=1e-4)


def test_sampled_and_beam_log_probs_equal_the_teacher_forced_score(family_and_layout):
  """The cached step's log-probabilities along sampled paths and along beams (caches copied
  and reordered on the model's batch axis) equal one full forward's."""
  model, params = family_and_layout
  sample = functools.partial(
    decode.generate, model, params, PROMPTS, NEW, prompt_lengths=LENGTHS, top_k=6, num_samples=2
  )
  endless = np.asarray(sample(jax.random.key(1)).tokens)
  eos = int(endless[0, LENGTHS[0] + 2])  # the third token sampled in the first row
  out = sample(jax.random.key(1), eos_id=eos)
  rows = np.repeat(PROMPTS, 2, axis=0), np.repeat(LENGTHS, 2)
  total, new = check_against_score(model, params, out, *rows)
  np.testing.assert_allclose(total, out.scores, atol=1e-4)
  # The same draws (the key decides them), each row cut after its first eos.
  assert new[0] <= 3
  np.testing.assert_array_equal(
    out.tokens, np.where(np.arange(endless.shape[1]) < out.lengths[:, None], endless, 0)
  )
  samples = segments(out.tokens, rows[1], rows[1] + new)
  assert not np.array_equal(samples[0::2], samples[1::2]), 'the samples of each prompt agree'
  assert not np.array_equal(sample(jax.random.key(2), eos_id=eos).tokens, out.tokens)

  beams = decode.search(
    model, params, PROMPTS, NEW, beam_size=2, prompt_lengths=LENGTHS, eos_id=eos
  )
  total, new = check_against_score(model, params, beams, *rows)
  penalized = total / decode.length_penalty(new, 0.6)
  np.testing.assert_allclose(np.asarray(beams.scores).reshape(-1), penalized, atol=1e-4)
  assert (beams.scores[:, 0] >= beams.scores[:, 1]).all()


def test_greedy_equals_beam_of_one_top_k_one_and_a_tiny_top_p():
  model, params = random_model('transformer', V)
  one_beam = decode.search(
    model, params, PROMPTS, NEW, beam_size=1, length_penalty_alpha=0.0, prompt_lengths=LENGTHS
  )
  # Beam search without an end-of-sequence token: with one, a beam of one keeps a hypothesis
  # that ended at an eos ranked second, and greedy decoding does not.
  beam_tokens = np.asarray(one_beam.tokens[:, 0])
  eos = int(beam_tokens[0, LENGTHS[0] + 2])  # the third token generated in the first row
  run = functools.partial(
    decode.generate, model, params, PROMPTS, NEW, prompt_lengths=LENGTHS, eos_id=eos
  )
  greedy = run(jax.random.key(0), temperature=0.0)
  ends = np.asarray(greedy.lengths)
  assert ends[0] <= LENGTHS[0] + 3 and greedy.tokens[0, ends[0] - 1] == eos
  # Greedy with eos is greedy without it, cut after the first eos.
  cut = np.where(np.arange(beam_tokens.shape[1]) < ends[:, None], beam_tokens, 0)
  np.testing.assert_array_equal(greedy.tokens, cut)
  for other in (run(jax.random.key(3), top_k=1), run(jax.random.key(4), top_p=1e-6)):
    np.testing.assert_array_equal(other.tokens, greedy.tokens)
    np.testing.assert_array_equal(other.lengths, greedy.lengths)
    np.testing.assert_allclose(other.log_probs, greedy.log_probs, atol=1e-5)


@functools.partial(jax.jit, static_argnames='model')
def log_softmax_forward(model, params, tokens_BT):
  return jax.nn.log_softmax(model.apply({'params': params}, tokens_BT))


def brute_force(model, params, prompt, new: int, eos: int, width: int) -> dict:
  """Every hypothesis of up to `new` tokens after prompt (ended by eos or by the length), and
  its log-probability, from the full forward (over `width` positions: one compiled shape)."""
  vocab = model.config.vocab_size
  every = np.array(list(itertools.product(range(vocab), repeat=new)))
  tokens = np.zeros((len(every), width), np.int32)
  tokens[:, : len(prompt)], tokens[:, len(prompt) : len(prompt) + new] = prompt, every
  log_p = np.asarray(log_softmax_forward(model, params, tokens))
  hypotheses = {}
  for row, continuation in enumerate(every):
    n = next((i + 1 for i, tok in enumerate(continuation) if tok == eos), new)
    hypotheses[tuple(continuation[:n])] = sum(
      log_p[row, len(prompt) - 1 + i, continuation[i]] for i in range(n)
    )
  return hypotheses


# The length penalties by their published formulas, written out here.
PENALTIES = {'gnmt': lambda n, alpha: ((5 + n) / 6) ** alpha, 'hf': lambda n, alpha: n**alpha}


def check_beams(beams, b: int, prompt_length: int, log_p: dict, alpha, kind='gnmt'):
  """Asserts that row b of beams holds the W best hypotheses, by log p / the length
  penalty, best first; returns them."""
  W = beams.scores.shape[1]
  scores = {h: lp / PENALTIES[kind](len(h), alpha) for h, lp in log_p.items()}
  best = sorted(scores, key=scores.get, reverse=True)[:W]
  found = [tuple(beams.tokens[b, w, prompt_length : beams.lengths[b, w]]) for w in range(W)]
  assert found == best
  np.testing.assert_allclose(beams.scores[b], [scores[h] for h in best], rtol=1e-5)
  return best


def test_beam_search_returns_the_top_w_of_brute_force_enumeration():
  """V = 4 with eos = 3 and 3 new tokens: a beam of W = 9 (every unfinished prefix of two
  tokens) must find exactly the 9 best of the 40 hypotheses, with and without a length
  penalty, for prompts of different lengths."""
  eos, new, W = 3, 3, 9
  model, params = random_model('transformer', 4, seed=1)
  prompts, lengths = np.array([[2, 0], [1, 2]]), np.array([1, 2])
  log_p = [brute_force(model, params, prompts[b, :P], new, eos, 5) for b, P in enumerate(lengths)]
  assert [len(h) for h in log_p] == [40, 40]
  for alpha, kind in ((0.0, 'gnmt'), (1.5, 'gnmt'), (0.7, 'hf')):
    beams = decode.search(
      model,
      params,
      prompts,
      new,
      beam_size=W,
      length_penalty_alpha=alpha,
      length_penalty_kind=kind,
      prompt_lengths=lengths,
      eos_id=eos,
    )
    for b, P in enumerate(lengths):
      best = check_beams(beams, b, P, log_p[b], alpha, kind)
      assert len({len(h) for h in best}) > 1, 'no best hypothesis ended at eos: too easy a case'


def test_beam_search_stops_only_when_no_unfinished_beam_can_win():
  """V = 2 (a token and eos): one unfinished prefix at each length, so W = 2 is exact. Two
  hypotheses have ended after two steps, yet under a strong length penalty a longer one
  wins: the search must go on while an unfinished beam could still beat them."""
  eos, new, alpha = 1, 8, 2.0
  model, params = random_model('transformer', 2, seed=1)
  beams = decode.search(
    model, params, np.array([[0]]), new, beam_size=2, length_penalty_alpha=alpha, eos_id=eos
  )
  log_p = brute_force(model, params, [0], new, eos, 1 + new)
  best = check_beams(beams, 0, 1, log_p, alpha)
  assert len(best[0]) > 2, 'the best hypothesis ended within two steps: too easy a case'

  # Hugging Face's early_stopping=True stops at the first W finished hypotheses instead:
  # those that end soonest, by log p / length^alpha among them.
  early = decode.search(
    model,
    params,
    np.array([[0]]),
    new,
    beam_size=2,
    length_penalty_alpha=alpha,
    length_penalty_kind='hf',
    early_stopping=True,
    eos_id=eos,
  )
  tokens, lengths = np.asarray(early.tokens), np.asarray(early.lengths)
  found = [tuple(tokens[0, w, 1 : lengths[0, w]].tolist()) for w in range(2)]
  assert sorted(map(len, found)) == [1, 2]  # eos at once, and after one token
  np.testing.assert_allclose(early.scores[0], [log_p[h] / len(h) ** alpha for h in found], 1e-5)


def next_log_probs(model, params, prompt, new: int, width: int) -> dict:
  """log p(next token | prompt + prefix) for every prefix of fewer than `new` tokens, from the
  full forward."""
  vocab = model.config.vocab_size
  every = np.array(list(itertools.product(range(vocab), repeat=new - 1)))
  tokens = np.zeros((len(every), width), np.int32)
  tokens[:, : len(prompt)], tokens[:, len(prompt) : len(prompt) + new - 1] = prompt, every
  log_p = np.asarray(log_softmax_forward(model, params, tokens), np.float64)
  return {
    tuple(row[:i]): log_p[r, len(prompt) - 1 + i] for r, row in enumerate(every) for i in range(new)
  }


def hf_early_stopping(next_log_p: dict, W: int, new: int, eos: int, alpha: float, top_w=True):
  """Hugging Face's beam search with early_stopping=True, written out from its
  _beam_search: 2W candidates a step; an ending one (eos, or the last step) is finished
  only if it ranks in the top W (top_w) and the prompt has fewer than W finished; the W best
  that do not end go on; it stops once W have finished. Returns [(score, hypothesis)]."""
  running, finished = [((), 0.0)] + [((), -1e9)] * (W - 1), []
  for t in range(new):
    candidates = sorted(
      ((score + lp, (*h, v)) for h, score in running for v, lp in enumerate(next_log_p[h])),
      key=lambda c: -c[0],
    )[: 2 * W]
    ends = [v[-1] == eos or t + 1 == new for _, v in candidates]
    if len(finished) < W:
      finished += [
        (score / (t + 1) ** alpha, h)
        for rank, ((score, h), end) in enumerate(zip(candidates, ends, strict=True))
        if end and (rank < W or not top_w)
      ]
      finished = sorted(finished, key=lambda f: -f[0])[:W]
    running = [(h, score) for (score, h), end in zip(candidates, ends, strict=True) if not end]
    running = running[:W]
    if len(finished) == W:
      break
  return finished


def test_early_stopping_finishes_only_the_top_w_candidates_as_hugging_face():
  """Against Hugging Face's rule written out (hf_early_stopping) on random models with a
  likely eos: the same hypotheses and scores; and in some of them the rule matters (letting
  any of the 2W candidates finish returns others)."""
  eos, new, W, alpha, differs = 4, 4, 2, 1.0, 0
  for seed in range(12):
    model, params = random_model('transformer', 5, seed=seed)
    next_log_p = next_log_probs(model, params, [1], new, 1 + new)
    expected = hf_early_stopping(next_log_p, W, new, eos, alpha)
    differs += expected != hf_early_stopping(next_log_p, W, new, eos, alpha, top_w=False)
    beams = decode.search(
      model,
      params,
      np.array([[1]]),
      new,
      beam_size=W,
      length_penalty_alpha=alpha,
      length_penalty_kind='hf',
      early_stopping=True,
      eos_id=eos,
    )
    found = [tuple(np.asarray(beams.tokens)[0, w, 1 : beams.lengths[0, w]]) for w in range(W)]
    assert found == [h for _, h in expected], seed
    np.testing.assert_allclose(beams.scores[0], [s for s, _ in expected], rtol=1e-5)
  assert differs > 0, 'no case where the top-W rule changes the result: too easy'


def filtered_probs(logits, temperature, top_k, top_p):
  """The distribution sampling should draw from, computed here with numpy alone."""
  z = np.asarray(logits, np.float64) / temperature
  probs = np.exp(z - z.max())
  order = np.argsort(-probs)
  if top_k:
    probs[order[top_k:]] = 0.0
  probs /= probs.sum()
  before = np.cumsum(probs[order]) - probs[order]
  probs[order[before >= top_p]] = 0.0
  return probs / probs.sum()


# Upper 0.001 points of the chi-square distribution by degrees of freedom (NIST/SEMATECH
# e-Handbook, table 1.3.6.7.4): a correct sampler fails one of these tests once in 1,000 seeds.
CHI2_CRITICAL_0_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458}


@pytest.mark.parametrize(
  'temperature, top_k, top_p', [(0.6, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8), (1.7, 5, 0.75)]
)
def test_sampled_frequencies_match_the_filtered_distribution(temperature, top_k, top_p):
  logits = np.log([0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05])
  draws = 20_000
  tokens = decode.sample_token(
    jnp.tile(jnp.asarray(logits, jnp.float32), (draws, 1)),
    jax.random.key(0),
    temperature,
    top_k,
    top_p,
  )
  counts = np.bincount(np.asarray(tokens), minlength=len(logits))
  expected = draws * filtered_probs(logits, temperature, top_k, top_p)
  kept = expected > 0
  assert counts[~kept].sum() == 0, f'drew filtered-out tokens: {counts} vs {expected}'
  chi2 = (((counts - expected)[kept]) ** 2 / expected[kept]).sum()
  critical = CHI2_CRITICAL_0_001[kept.sum() - 1]
  assert chi2 < critical, f'chi2 {chi2:.1f} >= {critical} with {kept.sum() - 1} df'
  # The test has power: the same draws are far from the unfiltered, untempered distribution.
  plain = draws * filtered_probs(logits, 1.0, 0, 1.0)
  assert ((counts - plain) ** 2 / plain).sum() > 10 * CHI2_CRITICAL_0_001[len(logits) - 1]


@pytest.mark.parametrize('p, kept', [(0.5, 1), (0.7, 2), (0.8, 2), (0.81, 3), (1.0, 4)])
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  filtered = decode.filter_logits(logits, 1.0, 0, p)
  order = [1, 3, 2, 0]  # tokens by probability
  assert np.isfinite(np.asarray(filtered[0, order[:kept]])).all()
  assert np.isneginf(np.asarray(filtered[0, order[kept:]])).all()


def test_top_p_breaks_ties_by_rank():
  """Uniform over 64 tokens at p = 0.125 (sums of 1/64 are exact in float32): the smallest
  set reaching p is the 8 lowest token ids, not all 64 tied with the eighth."""
  filtered = np.asarray(decode.filter_logits(jnp.zeros((1, 64)), 1.0, 0, 0.125))
  np.testing.assert_array_equal(np.flatnonzero(np.isfinite(filtered[0])), np.arange(8))


def top_p_reference(probs_RV: np.ndarray, p: float) -> np.ndarray:
  """The definition in float64: by probability (ties by token id), keep a token while the
  mass of those ranked above it is below p. Also returns each row's smallest distance from p
  of such a mass."""
  order = np.argsort(-probs_RV, axis=-1, kind='stable')
  ranked = np.take_along_axis(probs_RV, order, axis=-1)
  above = np.cumsum(ranked, axis=-1) - ranked
  keep = np.zeros_like(probs_RV, bool)
  np.put_along_axis(keep, order, above < p, axis=-1)
  return keep, np.abs(above - p).min(axis=-1)


def test_top_p_equals_the_definition_at_its_boundary():
  """Random rows against the float64 definition, and rows built so that the mass above a
  token falls 1e-6 and 5e-7 under p (as measured against Hugging Face's warper at p = 0.95,
  temperature 1.7): that token is kept. Rows within float32's rounding of the boundary (a
  sum off by about 1e-7) are left out of the random comparison."""
  p, temperature = 0.95, 1.7
  logits_RV = np.random.default_rng(0).normal(0, 3, (8192, 32)).astype(np.float32)
  kept = np.isfinite(np.asarray(decode.filter_logits(jnp.asarray(logits_RV), temperature, 0, p)))
  probs_RV = np.asarray(jax.nn.softmax(jnp.asarray(logits_RV) / temperature), np.float64)
  expected, margin = top_p_reference(probs_RV, p)
  clear = margin > 1e-6
  assert clear.mean() > 0.99
  np.testing.assert_array_equal(kept[clear], expected[clear])
  for below in (1e-6, 5e-7):
    q = p - below  # the first token's mass: just under p, so the second must be kept too
    edge = jnp.log(jnp.array([[q, (1 - q) * 0.7, (1 - q) * 0.3]]))
    filtered = np.asarray(decode.filter_logits(edge, 1.0, 0, p))
    np.testing.assert_array_equal(np.isfinite(filtered[0]), [True, True, False])


def test_temperature_scales_before_top_k():
  logits = jnp.array([[1.0, 3.0, 2.0]])
  filtered = decode.filter_logits(logits, 0.5, 2, 1.0)
  np.testing.assert_allclose(filtered, [[-np.inf, 6.0, 4.0]])


def test_more_tokens_than_the_context_is_refused():
  model, params = random_model('transformer', V)
  with pytest.raises(ConfigError, match="= 33 exceeds the model's context of 32 positions"):
    decode.generate(model, params, jnp.zeros((1, 5), jnp.int32), 28, jax.random.key(0))
  with pytest.raises(ConfigError, match=r'prompt_lengths must be in \[0, 5\]'):
    decode.search(
      model, params, jnp.zeros((2, 5), jnp.int32), 4, beam_size=2, prompt_lengths=[2, 6]
    )
