import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ar_jax import models, objectives
from tests.helpers import family_config, one_step


def schedule(name, max_prob=0.5, steps=100):
  return ml_collections.ConfigDict(dict(schedule=name, max_prob=max_prob, steps=steps))


def test_schedules_rise_to_max_prob():
  linear = schedule('linear')
  assert [float(objectives.probability(linear, s)) for s in (0, 50, 100, 500)] == [
    0.0,
    0.25,
    0.5,
    0.5,
  ]
  sigmoid = schedule('inverse_sigmoid')
  eps = [float(objectives.probability(sigmoid, s)) for s in range(0, 400, 10)]
  assert eps[0] < 0.05 and eps[-1] == pytest.approx(0.5, abs=1e-3)
  assert all(a <= b for a, b in zip(eps, eps[1:], strict=False))
  assert float(objectives.probability(schedule('constant'), 7)) == 0.5


@pytest.mark.parametrize('family', ['transformer', 'rnn'])
def test_eps_zero_is_teacher_forcing(text_file, tmp_path, family):
  forced, loss, _ = one_step(family_config(text_file, family), tmp_path / 'forced')
  cfg = family_config(text_file, family)
  cfg.scheduled_sampling.schedule, cfg.scheduled_sampling.max_prob = 'constant', 0.0
  sampled, ss_loss, _ = one_step(cfg, tmp_path / 'scheduled')
  if family == 'transformer':  # two passes: the second sees exactly the true inputs
    assert ss_loss == loss
    jax.tree.map(np.testing.assert_array_equal, sampled.params, forced.params)
  else:  # one position at a time instead of the whole sequence: equal up to float rounding
    assert ss_loss == pytest.approx(loss, rel=1e-6)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), sampled.params, forced.params
    )


def test_eps_one_feeds_the_recurrent_model_its_own_samples():
  cfg = ml_collections.ConfigDict(
    dict(name='rnn', cell='gru', num_layers=1, d_embed=8, d_hidden=16)
  )
  model = models.get_model(cfg, 11)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))['params'])

  def run(tokens_BT):
    step = lambda t_B1, c, t: model.apply({'params': params}, t_B1, c, method=model.step)
    return objectives.step_by_step(step, tokens_BT, model.init_cache(3), 1.0, jax.random.key(1))

  truth = jax.random.randint(jax.random.key(2), (3, 9), 0, 11)
  logits, _, fed = run(truth)
  np.testing.assert_array_equal(fed[:, 0], truth[:, 0])  # the first input is always given
  for t in range(1, 9):  # then its own: the draw from the logits it produced one step before
    sample_rng = jax.random.split(jax.random.fold_in(jax.random.key(1), t - 1))[1]
    np.testing.assert_array_equal(fed[:, t], jax.random.categorical(sample_rng, logits[:, t - 1]))
  assert (fed[:, 1:] != truth[:, 1:]).any()
  other = truth.at[:, 1:].set((truth[:, 1:] + 5) % 11)  # the truth after step 0 is unused
  logits_other, _, fed_other = run(other)
  np.testing.assert_array_equal(fed_other, fed)
  np.testing.assert_allclose(logits_other, logits)
