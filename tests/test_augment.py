"""The JAX augmentations against Keras's ImageDataGenerator functions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from et_flax import augment

keras_image = pytest.importorskip('keras.src.legacy.preprocessing.image')
scipy_ndimage = pytest.importorskip('scipy.ndimage')
scipy_stats = pytest.importorskip('scipy.stats')

SIZE = 12


@pytest.fixture(scope='module')
def image():
  """A smooth-ish random RGB image in 0-255 (float32, as Keras works on it)."""
  rng = np.random.default_rng(0)
  return (rng.uniform(0, 255, (SIZE, SIZE, 3))).astype(np.float32)


def _ours(image, theta=0.0, tx=0.0, ty=0.0, shear=0.0, zx=1.0, zy=1.0):
  def run(image):
    matrix = augment.keras_affine_matrix(
        jnp.float32(theta), jnp.float32(tx), jnp.float32(ty), jnp.float32(shear),
        jnp.float32(zx), jnp.float32(zy), SIZE, SIZE)
    return augment.apply_affine(image, matrix)
  return np.asarray(run(jnp.asarray(image))), np.asarray(jax.jit(run)(jnp.asarray(image)))


def _keras(image, **params):
  # ImageDataGenerator's channels-last axes for one image.
  return keras_image.apply_affine_transform(
      image, row_axis=0, col_axis=1, channel_axis=2, fill_mode='nearest', order=1,
      **params)


# Keras computes the matrix in float64 and scipy samples in float64; we do both
# in float32. A sampling coordinate off by ~1e-5 pixel moves a bilinear value
# by at most 255 * 1e-5 per unit of neighbouring difference, so 0.02 on a
# 0-255 scale bounds the rounding, while any wrong axis, sign or centre moves
# pixels by tens of units.
TOLERANCE = 0.02


@pytest.mark.parametrize('params', [
    {'theta': 17.0},
    {'theta': -33.0},
    {'tx': 2.5},
    {'ty': -3.25},
    {'shear': 12.0},
    {'zx': 1.2, 'zy': 0.85},
    {'zx': 0.9, 'zy': 0.9},
    {'theta': 25.0, 'tx': -1.5, 'ty': 2.0, 'shear': -8.0, 'zx': 1.1, 'zy': 0.95},
], ids=lambda p: '-'.join(f'{k}{v}' for k, v in p.items()))
def test_jit_affine_equals_keras(image, params):
  eager, jitted = _ours(image, **params)
  expected = _keras(image, **params)
  np.testing.assert_allclose(eager, expected, atol=TOLERANCE)
  np.testing.assert_allclose(jitted, expected, atol=TOLERANCE)


def test_jit_shift_moves_the_axis_keras_moves(image):
  """Keras's quirk, kept: tx (from height_shift_range) moves columns, ty rows.

  Eager and jitted against Keras's `apply_affine_transform`, and by whole
  pixels against the exact shift with the edge replicated (what Keras gives
  too, so a quirk Keras dropped would show here as well as a swap of ours).
  """
  for params, shifted in (
      ({'tx': 2.0}, np.concatenate([image[:, 2:], np.repeat(image[:, -1:], 2, axis=1)],
                                   axis=1)),
      ({'ty': -3.0}, np.concatenate([np.repeat(image[:1], 3, axis=0), image[:-3]],
                                    axis=0))):
    expected = _keras(image, **params)
    np.testing.assert_allclose(expected, shifted, atol=1e-4)
    for got in _ours(image, **params):
      np.testing.assert_allclose(got, expected, atol=1e-4)


def test_jit_identity_transform_is_exact(image):
  eager, jitted = _ours(image)
  np.testing.assert_array_equal(eager, image)
  np.testing.assert_array_equal(jitted, image)


@pytest.mark.parametrize('intensity', [30.0, -45.5, 0.0])
def test_jit_channel_shift_equals_keras_and_numpy(image, intensity):
  # A narrower range than 0-255 so that the clipping shows.
  narrow = 50 + image * 0.5
  expected = np.clip(narrow + intensity, narrow.min(), narrow.max())
  np.testing.assert_allclose(keras_image.apply_channel_shift(narrow, intensity, 2),
                             expected, rtol=1e-6)
  for fn in (augment.channel_shift, jax.jit(augment.channel_shift)):
    np.testing.assert_allclose(fn(jnp.asarray(narrow), jnp.float32(intensity)),
                               expected, rtol=1e-6)


def _fixed_params(**overrides):
  params = {'theta': 0.0, 'tx': 0.0, 'ty': 0.0, 'shear': 0.0, 'zx': 1.0, 'zy': 1.0,
            'channel_shift': 0.0, 'flip_horizontal': False, 'flip_vertical': False,
            'crop_height': float(SIZE), 'crop_width': float(SIZE), 'crop_top': 0.0,
            'crop_left': 0.0}
  params.update(overrides)
  return {k: jnp.asarray(v) for k, v in params.items()}


@pytest.mark.parametrize('flips,expected', [
    ((True, False), lambda x: x[:, ::-1]),
    ((False, True), lambda x: x[::-1]),
    ((True, True), lambda x: x[::-1, ::-1]),
    ((False, False), lambda x: x),
])
def test_jit_flips_equal_numpy(image, flips, expected):
  params = _fixed_params(flip_horizontal=flips[0], flip_vertical=flips[1])
  for fn in (augment.augment_image, jax.jit(augment.augment_image)):
    np.testing.assert_array_equal(fn(jnp.asarray(image), params), expected(image))


def test_jit_full_chain_equals_keras_apply_transform(image):
  """Affine, then channel shift, then flips, as ImageDataGenerator applies them."""
  keras_params = {'theta': 12.0, 'tx': 1.5, 'ty': -2.0, 'shear': 6.0, 'zx': 1.1,
                  'zy': 0.9, 'flip_horizontal': True, 'flip_vertical': True,
                  'channel_shift_intensity': 25.0}
  generator = keras_image.ImageDataGenerator(data_format='channels_last')
  expected = generator.apply_transform(image.copy(), keras_params)
  ours = _fixed_params(theta=12.0, tx=1.5, ty=-2.0, shear=6.0, zx=1.1, zy=0.9,
                       flip_horizontal=True, flip_vertical=True, channel_shift=25.0)
  got = jax.jit(augment.augment_image)(jnp.asarray(image), ours)
  np.testing.assert_allclose(got, expected, atol=TOLERANCE)


def test_jit_crop_matrix_equals_a_numpy_crop_and_resize():
  """A crop of half the side at an integer offset, resized 2x: bilinear upsampling."""
  image = np.arange(SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE, 1)
  params = _fixed_params(crop_height=6.0, crop_width=6.0, crop_top=2.0, crop_left=4.0)
  got = np.asarray(jax.jit(augment.augment_image)(jnp.asarray(image), params))[..., 0]
  # Output pixel i samples the crop at (i + 0.5) / 2 - 0.5 (half-pixel centres).
  coords = (np.arange(SIZE) + 0.5) / 2 - 0.5
  rows = np.clip(2 + coords, 0, SIZE - 1)
  cols = np.clip(4 + coords, 0, SIZE - 1)
  # The image is linear in (row, col), so bilinear sampling is exact there.
  expected = rows[:, None] * SIZE + cols[None, :]
  np.testing.assert_allclose(got, expected, atol=1e-3)


def test_jit_crop_then_affine_equals_numpy_crop_then_keras_affine():
  """The `heavy` composition `crop_matrix @ affine`, on a non-square image.

  One resampling through `crop_matrix(...) @ keras_affine_matrix(...)` is
  the crop (NumPy: half-pixel centres, bilinear) resized to the full image
  and then Keras's `apply_affine_transform` on that, as if the crop ran in
  the input pipeline before ImageDataGenerator. The image is linear in
  (row, col) and the zoom-in keeps every sample inside the image, so
  bilinear sampling is exact and two resamplings equal one: the reference
  is exact up to float64 rounding, ours up to float32 rounding of values
  up to ~250 (measured 2.5e-5; the bound 1e-3 is 40x that). The reversed
  product (the crop taken from the affine's output) is off by 2.4, and a
  height/width swap in either matrix fails as well.
  """
  height, width = 20, 24
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  image = np.stack([3.1 * rows + 1.7 * cols + 10, -2.3 * rows + 4.1 * cols + 100,
                    1.3 * rows - 0.9 * cols + 150], axis=-1).astype(np.float32)
  affine = {'theta': 12.0, 'tx': 1.0, 'ty': -1.0, 'shear': 6.0, 'zx': 0.6, 'zy': 0.65}
  top, left, crop_height, crop_width = 3.0, 5.0, 12.0, 16.0

  crop_rows = top + (np.arange(height) + 0.5) * crop_height / height - 0.5
  crop_cols = left + (np.arange(width) + 0.5) * crop_width / width - 0.5
  grid = np.meshgrid(crop_rows, crop_cols, indexing='ij')
  cropped = np.stack([scipy_ndimage.map_coordinates(image[..., c].astype(np.float64),
                                                    grid, order=1, mode='nearest')
                      for c in range(3)], axis=-1)
  expected = _keras(cropped, **affine)
  # Still linear: no sample fell outside the image (where edge fill bends it).
  assert np.abs(np.diff(expected, 2, axis=0)).max() < 1e-4
  assert np.abs(np.diff(expected, 2, axis=1)).max() < 1e-4

  params = _fixed_params(**affine, crop_top=top, crop_left=left,
                         crop_height=crop_height, crop_width=crop_width)
  for fn in (augment.augment_image, jax.jit(augment.augment_image)):
    np.testing.assert_allclose(fn(jnp.asarray(image), params), expected, atol=1e-3)


# Keras's legacy ImageDataGenerator draws ranges >= 1 as pixels only when they
# are floats (an int n draws integers from -(n-1)..n-1); ours are floats.
SAMPLING_RANGES = dict(rotation_range=20.0, width_shift_range=5.0, height_shift_range=0.25,
                       shear_range=10.0, zoom_range=0.2, channel_shift_range=20.0,
                       horizontal_flip=True, vertical_flip=True)


def test_jit_sampled_parameters_match_keras_get_random_transform():
  """Distributions of 4,000 draws each, on a 24x40 image, against Keras's.

  Non-square, with the height shift a fraction (0.25 x 24 = 6 pixels) and the
  width shift in pixels (5): a height/width swap draws tx from +-10 pixels,
  a range swap tx from +-5. Two-sample Kolmogorov-Smirnov per parameter,
  failing below p = 1e-3 (D above 0.044 for 4,000 + 4,000 draws); measured
  D 0.012-0.025 (p >= 0.17), and D = 0.21 (p ~ 1e-75) with height and width
  swapped. Flip rates: the difference of two proportions of 4,000 has a
  standard deviation of 0.011; the bound 0.045 is 4 of them (measured
  0.019 and 0.012).
  """
  height, width, draws = 24, 40, 4000
  generator = keras_image.ImageDataGenerator(data_format='channels_last',
                                             **SAMPLING_RANGES)
  np.random.seed(0)
  keras_draws = [generator.get_random_transform((height, width, 3)) for _ in range(draws)]
  config = augment.AugmentConfig(**SAMPLING_RANGES)
  keys = jax.random.split(jax.random.key(0), draws)
  ours = jax.jit(jax.vmap(lambda k: augment.sample_params(k, config, height, width)))(keys)
  names = {'theta': 'theta', 'tx': 'tx', 'ty': 'ty', 'shear': 'shear', 'zx': 'zx',
           'zy': 'zy', 'channel_shift_intensity': 'channel_shift'}
  for keras_name, our_name in names.items():
    expected = np.array([d[keras_name] for d in keras_draws], np.float64)
    result = scipy_stats.ks_2samp(expected, np.asarray(ours[our_name], np.float64))
    assert result.pvalue > 1e-3, (our_name, result)
  for name in ('flip_horizontal', 'flip_vertical'):
    expected = np.mean([bool(d[name]) for d in keras_draws])
    assert abs(np.asarray(ours[name]).mean() - expected) < 0.045, name


@pytest.mark.parametrize('preset', ['five', 'eight', 'heavy'])
def test_sampled_parameters_stay_in_range(preset):
  """Ranges on a non-square image (64 rows, 48 columns)."""
  config = augment.PRESETS[preset]
  height, width = 64, 48
  keys = jax.random.split(jax.random.key(0), 2000)
  params = jax.jit(jax.vmap(lambda k: augment.sample_params(k, config, height, width)))(
      keys)
  params = {k: np.asarray(v) for k, v in params.items()}

  def within(name, low, high):
    assert low <= params[name].min() and params[name].max() <= high, name
    if low < high:  # and the range is used, not a corner of it
      assert params[name].max() - params[name].min() > 0.8 * (high - low), name

  within('theta', -config.rotation_range, config.rotation_range)
  # tx from height_shift_range (in rows), ty from width_shift_range (Keras's names).
  within('tx', -0.1 * height, 0.1 * height)
  within('ty', -0.1 * width, 0.1 * width)
  within('shear', -config.shear_range, config.shear_range)
  within('zx', 1 - config.zoom_range, 1 + config.zoom_range)
  within('zy', 1 - config.zoom_range, 1 + config.zoom_range)
  within('channel_shift', -config.channel_shift_range, config.channel_shift_range)
  assert abs(params['flip_horizontal'].mean() - 0.5) < 0.05
  assert abs(params['flip_vertical'].mean() - 0.5) < 0.05
  if preset != 'heavy':
    assert (params['crop_height'] == height).all() and (params['crop_top'] == 0).all()
    assert (params['crop_width'] == width).all() and (params['crop_left'] == 0).all()
  else:
    area = params['crop_height'] * params['crop_width'] / (height * width)
    assert area.min() >= 0.25 * 0.75 - 1e-6 and area.max() <= 1 + 1e-6
    assert (params['crop_top'] >= 0).all() and (params['crop_left'] >= 0).all()
    assert (params['crop_top'] + params['crop_height'] <= height + 1e-4).all()
    assert (params['crop_left'] + params['crop_width'] <= width + 1e-4).all()
    # The crops reach the far edge of each axis (a swapped axis would not).
    assert (params['crop_top'] + params['crop_height']).max() > height - 1
    assert (params['crop_left'] + params['crop_width']).max() > width - 1
  # zx and zy are drawn independently.
  if config.zoom_range:
    assert abs(np.corrcoef(params['zx'], params['zy'])[0, 1]) < 0.1


def test_jit_none_is_the_identity(image, monkeypatch):
  """'none' through the whole per-image path, with the short-cut turned off.

  `augment_batch` returns an identity config's input untouched; this runs
  what it would run otherwise (sampling with every range zero, the affine and
  crop matrices, bilinear resampling, channel shift, flips) and expects the
  input back exactly, so the short-cut only saves time: it hides no offset.
  Bilinear sampling at whole-pixel coordinates with weights 1 and 0 is exact.
  """
  # The real config path: every range of a preset set to zero is 'none'.
  config = augment.config_from({
      'preset': 'heavy', 'rotation_range': 0.0, 'width_shift_range': 0.0,
      'height_shift_range': 0.0, 'shear_range': 0.0, 'zoom_range': 0.0,
      'channel_shift_range': 0.0, 'horizontal_flip': False, 'vertical_flip': False,
      'crop_min_area': 1.0})
  assert config == augment.PRESETS['none'] and config.is_identity
  monkeypatch.setattr(augment.AugmentConfig, 'is_identity', property(lambda self: False))
  batch = jnp.asarray(np.stack([image, image[::-1]]))
  # A fresh function for jit: JAX's trace cache must not hand back a trace made
  # with the short-cut (another test may have jitted augment_batch with 'none').
  run = lambda key, images: augment.augment_batch(key, images, config)
  assert len(jax.make_jaxpr(run)(jax.random.key(0), batch).eqns) > 10  # no short-cut
  for fn in (run, jax.jit(run)):
    np.testing.assert_array_equal(fn(jax.random.key(0), batch), batch)


def test_augment_batch_eager_equals_compiled_and_varies_per_image(image):
  batch = jnp.asarray(np.stack([image] * 4))
  config = augment.PRESETS['eight']
  eager = augment.augment_batch(jax.random.key(3), batch, config)
  jitted = jax.jit(augment.augment_batch, static_argnums=2)(jax.random.key(3), batch, config)
  np.testing.assert_allclose(eager, jitted, atol=1e-3)
  assert not np.allclose(eager[0], eager[1])
  again = augment.augment_batch(jax.random.key(3), batch, config)
  np.testing.assert_array_equal(eager, again)


def test_config_from_presets_and_overrides():
  assert augment.config_from({'preset': 'none'}).is_identity
  five = augment.config_from({'preset': 'five', 'rotation_range': None})
  assert five == augment.PRESETS['five']
  custom = augment.config_from({'preset': 'five', 'rotation_range': 5.0,
                                'vertical_flip': False})
  assert custom == dataclasses.replace(augment.PRESETS['five'], rotation_range=5.0,
                                       vertical_flip=False)
  with pytest.raises(ValueError, match="valid presets: \\['none', 'five', 'eight', 'heavy'\\]"):
    augment.config_from({'preset': 'ten'})
  with pytest.raises(ValueError, match="Unknown field\\(s\\) \\['rotate'\\]"):
    augment.config_from({'preset': 'none', 'rotate': 3})
  with pytest.raises(ValueError, match='config.augment.zoom_range must be below 1'):
    augment.config_from({'preset': 'none', 'zoom_range': 1.5})
  with pytest.raises(ValueError, match='rotation_range must be a number >= 0'):
    augment.config_from({'preset': 'none', 'rotation_range': -3})
