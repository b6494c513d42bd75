"""PixelCNN: the masks of van den Oord et al. (2016), raster-order causality by gradients
(sub-pixels included), the gated version's missing blind spot, cached steps and whole-image
sampling."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ar_jax import decode, models
from ar_jax.errors import ConfigError
from ar_jax.models.families import pixelcnn
from tests.helpers import position_jacobian, random_params


def reference_mask(k, mask_type):
  """The masks as van den Oord et al. (2016) define them, written out in numpy."""
  m = np.ones((k, k))
  m[k // 2 + (mask_type == 'B') :] = 0
  m[k // 2, k // 2 + (mask_type == 'B') :] = 0
  return m


@pytest.mark.parametrize('k', [3, 5, 7])
def test_masks_are_the_papers(k):
  one = np.zeros(1, int)
  a = pixelcnn.mask((k, k), one, one, 'A')[:, :, 0, 0]
  b = pixelcnn.mask((k, k), one, one, 'B')[:, :, 0, 0]
  np.testing.assert_array_equal(b, reference_mask(k, 'B'))
  # In words: rows below the centre and the centre row from the centre (A) or after
  # it (B) are zero. Its code's first line for A also clears the centre row's left half (the
  # nearest context, still causal): A here is B without the centre tap, as the words say.
  rows, cols = np.indices((k, k))
  words_a = ~((rows > k // 2) | ((rows == k // 2) & (cols >= k // 2)))
  np.testing.assert_array_equal(a, words_a)
  np.testing.assert_array_equal(b - a, (rows == k // 2) & (cols == k // 2))
  assert not np.array_equal(a, reference_mask(k, 'A'))
  np.testing.assert_array_equal(reference_mask(k, 'A')[k // 2], 0)


def test_channel_groups_at_the_centre_tap():
  """RGB: features predicting G see R of the current pixel (A) and G too after (B)."""
  in_groups, out_groups = pixelcnn.groups(3, 3), pixelcnn.groups(6, 3)
  np.testing.assert_array_equal(out_groups, [0, 0, 1, 1, 2, 2])
  a = pixelcnn.mask((3, 3), in_groups, out_groups, 'A')[1, 1]
  b = pixelcnn.mask((3, 3), in_groups, out_groups, 'B')[1, 1]
  np.testing.assert_array_equal(a, [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b, [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
  # Off the centre, every channel of an earlier pixel is visible to every group.
  assert pixelcnn.mask((3, 3), in_groups, out_groups, 'A')[0].all()


def make(shape=(5, 5, 1), levels=256, **fields):
  H, W, C = shape
  base = dict(
    name='pixelcnn',
    image_height=H,
    image_width=W,
    image_channels=C,
    num_layers=4,
    features=6,
    kernel_size=3,
    first_kernel_size=3,
    head_features=12,
  )
  model = models.get_model(ml_collections.ConfigDict({**base, **fields}), levels + 1)
  N = H * W * C
  tokens = jax.random.randint(jax.random.key(0), (2, N), 0, levels).at[:, 0].set(levels)
  return model, random_params(model), tokens


def subpixel_jacobian(model, params, tokens):
  """[N, N]: |d (logits of sub-pixel i) / d sub-pixel j|. Position t predicts sub-pixel t
  (counting from 0) and holds sub-pixel t - 1 after BOS: the whole image and BOS is N + 1
  positions, the last of which predicts nothing."""
  whole = jnp.concatenate([tokens, tokens[:, -1:]], axis=1)
  return position_jacobian(model, params, whole)[:-1, 1:]


@pytest.mark.parametrize('shape', [(5, 5, 1), (4, 4, 3)])
@pytest.mark.parametrize('gated', [True, False])
def test_causal_in_raster_order_by_gradients(gated, shape):
  """Sub-pixel i depends on no sub-pixel at or after it (the pixel's later channels too).
  Gated: on every earlier one (no blind spot). Plain: not on some (its blind spot)."""
  # 4 features per channel group: with fewer, a ReLU dead at one pixel in every row can hide
  # the only path from a pixel's earlier channel.
  model, params, tokens = make(shape, gated=gated, features=12, head_features=24)
  jac_NN = subpixel_jacobian(model, params, tokens)
  i, j = np.indices(jac_NN.shape)
  assert np.all(jac_NN[j >= i] == 0.0)
  earlier_seen = jac_NN[j < i] > 0.0
  if gated:  # 5 layers of 3 x 3 reach every earlier pixel of these images
    assert earlier_seen.all()
  else:
    assert not earlier_seen.all()
    # The blind spot is up and to the right: pixel (2, 1) never sees (0, 4) at width 5.
    if shape == (5, 5, 1):
      assert jac_NN[2 * 5 + 1, 0 * 5 + 4] == 0.0 and jac_NN[2 * 5 + 1, 1 * 5 + 1] > 0.0


def test_bos_is_never_predicted():
  model, params, tokens = make((4, 4, 3))
  full = jax.jit(lambda t: model.apply({'params': params}, t))(tokens)
  assert full.shape == (2, 48, 257)
  assert np.all(np.isneginf(full[..., 256])) and np.all(np.isfinite(full[..., :256]))


def test_sampled_images_are_whole_and_follow_the_model():
  model, params, _ = make((2, 3, 1), levels=2, num_layers=1)
  # A head that says "1" with near certainty everywhere.
  params['head']['bias'] = jnp.array([-20.0, 20.0])
  images = decode.sample_images(model, params, jax.random.key(0), 4, (2, 3, 1), bos_id=2)
  assert images.shape == (4, 2, 3, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(images, 1)


@pytest.mark.parametrize(
  'fields, message',
  [
    (dict(features=8, image_channels=3), 'model.features=8 must be a positive multiple of'),
    (dict(kernel_size=4), 'model.kernel_size must be odd and positive, got 4'),
  ],
)
def test_bad_configs_are_named(fields, message):
  with pytest.raises(ConfigError, match=message):
    models.get_model(ml_collections.ConfigDict(dict(name='pixelcnn', **fields)), 257)


def test_too_long_a_sequence_is_refused():
  model, params, _ = make((2, 2, 1))
  with pytest.raises(ConfigError, match='sequence length 6 exceeds BOS \\+ the 4 sub-pixels'):
    model.apply({'params': params}, jnp.zeros((1, 6), jnp.int32))
