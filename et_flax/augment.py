"""The report's augmentations as pure JAX functions, run on device in the step.

They reproduce Keras's `ImageDataGenerator` (the report's tool): per image,
one affine matrix composed as rotation . shift . shear . zoom about the image
centre and sampled bilinearly with edge replication (`fill_mode='nearest'`),
then a channel shift clipped to the image's own range, then the flips. Values
are in raw 0-255 units; rescaling to [0, 1] comes after, as in Keras.

Keras quirks kept on purpose: `tx` is drawn from `height_shift_range` and `ty`
from `width_shift_range`, but the matrix is built in (x, y) order and swapped
onto (row, col) indexing as `apply_affine_transform` does, so for
channels-last images `tx` moves columns and `ty` rows (the two ranges are equal
in every preset); zoom factors > 1 zoom out; one channel-shift offset is added
to every channel.

Presets (`config.augment.preset`; any range set beside it overrides it):
  none   no augmentation.
  five   the report's five: rotation 20 deg, width and height shift 0.1,
         horizontal and vertical flip.
  eight  the report's eight: five plus shear 10 deg, zoom 0.1 (zx, zy drawn
         independently) and channel shift 20. (The report gives no ranges;
         these are ours.)
  heavy  the heavier augmentation the report's future work asks for: eight,
         composed (one resampling) with an Inception-style random-resized
         crop of 25-100% of the area and aspect ratio 3/4 to 4/3.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Ranges as Keras's ImageDataGenerator takes them (0 disables)."""
  rotation_range: float = 0.0      # degrees
  width_shift_range: float = 0.0   # fraction of the width if < 1, else pixels
  height_shift_range: float = 0.0  # fraction of the height if < 1, else pixels
  shear_range: float = 0.0         # degrees
  zoom_range: float = 0.0          # zx, zy ~ U(1 - z, 1 + z)
  channel_shift_range: float = 0.0  # 0-255 units
  horizontal_flip: bool = False
  vertical_flip: bool = False
  crop_min_area: float = 1.0       # random-resized crop when < 1

  @property
  def is_identity(self) -> bool:
    return self == AugmentConfig()


_FIVE = dict(rotation_range=20.0, width_shift_range=0.1, height_shift_range=0.1,
             horizontal_flip=True, vertical_flip=True)
_EIGHT = dict(_FIVE, shear_range=10.0, zoom_range=0.1, channel_shift_range=20.0)
PRESETS: dict[str, AugmentConfig] = {
    'none': AugmentConfig(),
    'five': AugmentConfig(**_FIVE),
    'eight': AugmentConfig(**_EIGHT),
    'heavy': AugmentConfig(**_EIGHT, crop_min_area=0.25),
}
CROP_ASPECT_RANGE = (3 / 4, 4 / 3)


def config_from(augment_config: Mapping[str, Any]) -> AugmentConfig:
  """`config.augment` (a preset plus optional per-transform overrides)."""
  fields = dict(augment_config)
  preset = fields.pop('preset', 'none')
  if preset not in PRESETS:
    raise ValueError(f'Unknown augment preset {preset!r} in config.augment.preset; '
                     f'valid presets: {list(PRESETS)}')
  valid = {f.name for f in dataclasses.fields(AugmentConfig)}
  unknown = sorted(set(fields) - valid)
  if unknown:
    raise ValueError(f'Unknown field(s) {unknown} in config.augment; valid fields: '
                     f'{sorted(valid | {"preset"})}')
  overrides = {k: v for k, v in fields.items() if v is not None}
  for name, value in overrides.items():
    if name.endswith('_flip'):
      if not isinstance(value, bool):
        raise ValueError(f'config.augment.{name} must be True or False, got {value!r}')
    elif not isinstance(value, (int, float)) or value < 0:
      raise ValueError(f'config.augment.{name} must be a number >= 0, got {value!r}')
  if overrides.get('zoom_range', 0) >= 1:
    raise ValueError('config.augment.zoom_range must be below 1 (zoom factors '
                     f'1 - z to 1 + z), got {overrides["zoom_range"]}')
  if not 0 < overrides.get('crop_min_area', 1.0) <= 1:
    raise ValueError('config.augment.crop_min_area must be in (0, 1], got '
                     f'{overrides["crop_min_area"]}')
  return dataclasses.replace(PRESETS[preset], **overrides)


def keras_affine_matrix(theta: jax.Array, tx: jax.Array, ty: jax.Array,
                        shear: jax.Array, zx: jax.Array, zy: jax.Array,
                        height: int, width: int) -> jax.Array:
  """Keras's `apply_affine_transform` matrix: output (row, col, 1) -> input.

  Angles in degrees, shifts in pixels, as Keras takes them.
  """
  theta, shear = jnp.deg2rad(theta), jnp.deg2rad(shear)
  one, zero = jnp.ones_like(theta), jnp.zeros_like(theta)

  def matrix(rows):
    return jnp.stack([jnp.stack(row) for row in rows])

  rotation = matrix([[jnp.cos(theta), -jnp.sin(theta), zero],
                     [jnp.sin(theta), jnp.cos(theta), zero], [zero, zero, one]])
  shift = matrix([[one, zero, tx], [zero, one, ty], [zero, zero, one]])
  shear_matrix = matrix([[one, -jnp.sin(shear), zero], [zero, jnp.cos(shear), zero],
                         [zero, zero, one]])
  zoom = matrix([[zx, zero, zero], [zero, zy, zero], [zero, zero, one]])
  transform = rotation @ shift @ shear_matrix @ zoom
  o_x, o_y = height / 2 - 0.5, width / 2 - 0.5
  offset = jnp.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]], transform.dtype)
  reset = jnp.array([[1, 0, -o_x], [0, 1, -o_y], [0, 0, 1]], transform.dtype)
  transform = offset @ transform @ reset
  # Keras builds the matrix for (x, y) and swaps it onto (row, col) indexing.
  swap = jnp.array([1, 0, 2])
  return transform[swap][:, swap]


def crop_matrix(top: jax.Array, left: jax.Array, crop_height: jax.Array,
                crop_width: jax.Array, height: int, width: int) -> jax.Array:
  """Output (row, col, 1) -> input of a crop resized to the full image."""
  scale_r, scale_c = crop_height / height, crop_width / width
  zero, one = jnp.zeros_like(scale_r), jnp.ones_like(scale_r)
  return jnp.stack([
      jnp.stack([scale_r, zero, top + 0.5 * scale_r - 0.5]),
      jnp.stack([zero, scale_c, left + 0.5 * scale_c - 0.5]),
      jnp.stack([zero, zero, one])])


def apply_affine(image: jax.Array, matrix: jax.Array) -> jax.Array:
  """Samples `image` [H, W, C] at matrix @ (row, col, 1): bilinear, edge fill."""
  height, width = image.shape[:2]
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=image.dtype),
                            jnp.arange(width, dtype=image.dtype), indexing='ij')
  source_rows = matrix[0, 0] * rows + matrix[0, 1] * cols + matrix[0, 2]
  source_cols = matrix[1, 0] * rows + matrix[1, 1] * cols + matrix[1, 2]
  sample = lambda channel: jax.scipy.ndimage.map_coordinates(
      channel, [source_rows, source_cols], order=1, mode='nearest')
  return jax.vmap(sample, in_axes=-1, out_axes=-1)(image)


def channel_shift(image: jax.Array, intensity: jax.Array) -> jax.Array:
  """Keras's `apply_channel_shift`: add, then clip to the image's own range."""
  return jnp.clip(image + intensity, image.min(), image.max())


def _pixels(shift_range: float, size: int) -> float:
  return shift_range * size if shift_range < 1 else shift_range


def sample_params(key: jax.Array, config: AugmentConfig, height: int,
                  width: int) -> dict[str, jax.Array]:
  """One image's random parameters, drawn as Keras's get_random_transform does."""
  keys = jax.random.split(key, 12)

  def uniform(k, low, high):
    return jax.random.uniform(k, (), jnp.float32, low, high)

  z = config.zoom_range
  area = uniform(keys[8], config.crop_min_area, 1.0) * height * width
  log_aspect = uniform(keys[9], *(math.log(a) for a in CROP_ASPECT_RANGE))
  crop_height = jnp.minimum(jnp.sqrt(area / jnp.exp(log_aspect)), height)
  crop_width = jnp.minimum(jnp.sqrt(area * jnp.exp(log_aspect)), width)
  if config.crop_min_area == 1.0:
    crop_height, crop_width = jnp.float32(height), jnp.float32(width)
  rotation, shear = config.rotation_range, config.shear_range
  tx_range = _pixels(config.height_shift_range, height)
  ty_range = _pixels(config.width_shift_range, width)
  return {
      'theta': uniform(keys[0], -rotation, rotation),
      'tx': uniform(keys[1], -tx_range, tx_range),
      'ty': uniform(keys[2], -ty_range, ty_range),
      'shear': uniform(keys[3], -shear, shear),
      'zx': uniform(keys[4], 1 - z, 1 + z),
      'zy': uniform(keys[5], 1 - z, 1 + z),
      'channel_shift': uniform(keys[6], -config.channel_shift_range,
                               config.channel_shift_range),
      'flip_horizontal': jnp.logical_and(config.horizontal_flip,
                                         jax.random.bernoulli(keys[7])),
      'flip_vertical': jnp.logical_and(config.vertical_flip,
                                       jax.random.bernoulli(keys[10])),
      'crop_height': crop_height,
      'crop_width': crop_width,
      'crop_top': uniform(keys[11], 0.0, 1.0) * (height - crop_height),
      'crop_left': uniform(jax.random.fold_in(keys[11], 1), 0.0, 1.0)
                   * (width - crop_width),
  }


def augment_image(image: jax.Array, params: Mapping[str, jax.Array]) -> jax.Array:
  """Affine (with the crop) -> channel shift -> horizontal, vertical flip."""
  height, width = image.shape[:2]
  matrix = keras_affine_matrix(params['theta'], params['tx'], params['ty'],
                               params['shear'], params['zx'], params['zy'],
                               height, width)
  matrix = crop_matrix(params['crop_top'], params['crop_left'], params['crop_height'],
                       params['crop_width'], height, width) @ matrix
  image = apply_affine(image, matrix)
  image = channel_shift(image, params['channel_shift'])
  image = jnp.where(params['flip_horizontal'], image[:, ::-1], image)
  return jnp.where(params['flip_vertical'], image[::-1], image)


def augment_batch(key: jax.Array, images: jax.Array, config: AugmentConfig) -> jax.Array:
  """Augments a float batch [N, H, W, C] (0-255 values), one key per image."""
  if config.is_identity:
    return images
  height, width = images.shape[1:3]
  keys = jax.random.split(key, images.shape[0])
  params = jax.vmap(lambda k: sample_params(k, config, height, width))(keys)
  return jax.vmap(augment_image)(images, params)


# ---------------------------------------------------------------------------
# After the augmentations: the model's input.

PREPROCESSING = ('rescale', 'caffe')
# Keras's `preprocess_input(mode='caffe')` (VGG16, ResNet50): BGR means.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


def preprocess(images: jax.Array, mode: str = 'rescale') -> jax.Array:
  """0-255 RGB images (uint8, or float after augmentation) to model inputs.

  'rescale': Keras's `rescale=1/255`, after the augmentations as in Keras.
  'caffe': Keras Applications' ImageNet preprocessing for VGG16 and ResNet50
  (RGB to BGR, ImageNet mean subtracted, no scaling), for pretrained weights.
  """
  images = images.astype(jnp.float32)
  if mode == 'rescale':
    return images / 255.0
  if mode == 'caffe':
    return images[..., ::-1] - jnp.asarray(CAFFE_BGR_MEAN, jnp.float32)
  raise ValueError(f'Unknown preprocessing {mode!r}; valid: {list(PREPROCESSING)}')
