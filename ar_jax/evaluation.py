"""Evaluation: an eval step that sums the token cross-entropy (objectives.cross_entropy) with
the tokens and bytes it covers, and the evaluation of a run's parameters over every token of
its eval splits."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ar_jax import metrics, objectives, state, workdir
from ar_jax import run as run_lib
from ar_jax.data import batches, tokenizers
from ar_jax.parallel import sharding


def eval_step(params, batch_BT, weights_BT, token_bytes_V, *, model, packed_eos=None):
  """Sums over a batch: negative log-likelihood (nats), predicted tokens, and their bytes.
  With packed_eos, each document in a window sees only itself (see train.train_step)."""
  inputs_BT = batch_BT[:, :-1]
  packed = batches.segments(inputs_BT, packed_eos)
  logits_BTV = model.apply({'params': params}, inputs_BT, **packed)
  nats, tokens = objectives.cross_entropy(logits_BTV, batch_BT[:, 1:], weights_BT)
  nbytes = jnp.sum(token_bytes_V[batch_BT[:, 1:]] * weights_BT)
  return {'nats': nats, 'tokens': tokens, 'bytes': nbytes}


class Evaluator:
  """The compiled eval step of one run, over its eval splits."""

  def __init__(self, run: run_lib.Run, params_shardings):
    self.run = run
    self.batch_sharding = sharding.batch_sharding(run.mesh)
    self._eval = jax.jit(
      functools.partial(eval_step, model=run.model, packed_eos=run.packed_eos),
      in_shardings=(params_shardings, self.batch_sharding, self.batch_sharding, None),
      out_shardings=sharding.replicated(run.mesh),
    )
    self._token_bytes = jnp.asarray(run.tokenizer.token_bytes)

  def evaluate(self, params, should_stop: Callable[[], bool] = lambda: False) -> dict | None:
    """The eval splits' metrics; None when should_stop() turns true first (it is asked
    between batches, with at most two batches in flight, so a stop request is prompt)."""
    cfg = self.run.config
    sums = []
    block, blocks = sharding.process_rows(
      self.run.mesh
    )  # this process reads that block of the rows
    with sharding.context(self.run.mesh, self.run.rules):
      for tokens in self.run.streams.eval.values():
        for batch, weights in batches.eval_batches(
          tokens,
          batch_size=cfg.eval_batch_size or cfg.batch_size,
          seq_len=cfg.data.seq_len,
          max_batches=cfg.eval_batches,
          process_index=block,
          process_count=blocks,
          examples=cfg.data.sampling == 'examples',
        ):
          sums.append(
            self._eval(
              params,
              sharding.global_batch(batch, self.batch_sharding),
              sharding.global_batch(weights, self.batch_sharding),
              self._token_bytes,
            )
          )
          if len(sums) > 2:
            jax.block_until_ready(sums[-3])
          if should_stop():
            return None
    # One transfer at the end keeps the batches in flight; float64 for the totals.
    totals = {
      k: float(np.sum(v, dtype=np.float64))
      for k, v in jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(sums)).items()
    }
    loss = totals['nats'] / totals['tokens']
    out = {
      'eval/loss': loss,
      'eval/perplexity': metrics.perplexity(loss),
      'eval/bits_per_byte': metrics.bits_per_unit(totals['nats'], totals['bytes']),
      'eval/tokens': totals['tokens'],
    }
    unit = tokenizers.unit(self.run.tokenizer)
    if unit:  # every target is one: a character, an image dimension
      out[f'eval/bits_per_{unit}'] = metrics.bits_per_unit(totals['nats'], totals['tokens'])
    if unit == 'dim':  # each example is one image of seq_len sub-pixels
      out['eval/nats_per_image'] = totals['nats'] / totals['tokens'] * cfg.data.seq_len
    return out


def evaluate_workdir(config: ml_collections.ConfigDict, path: str) -> dict[str, float]:
  """Evaluates the latest readable checkpoint of the workdir at path on config's eval splits,
  through the run's tokenizer. config.data may name other data than the run trained on
  (domain transfer); config.model must be the run's."""
  run = run_lib.setup(config, path, defining=('model',), train=False)
  abstract, shardings = state.abstract_state(run.model, run.tx, run.mesh, config)
  step, params = workdir.read_params(path, abstract.params, config)
  return {'step': float(step), **Evaluator(run, shardings.params).evaluate(params)}
