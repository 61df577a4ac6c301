"""tf.data input: decode a Tiny ImageNet-layout tree once, then batch it.

Images are decoded once (in parallel, by tf.data) and kept as uint8 in host
memory: Tiny ImageNet's training split is 1.2 GB that way. Each training
epoch is a fresh permutation drawn from (seed, epoch), so a run resumed at
epoch e sees exactly the batches it would have seen; evaluation batches are
padded to full size and carry a mask, so every image counts exactly once.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image

from et_flax import digits
from et_flax import tiny_imagenet

DATASETS = ('digits', 'tiny_imagenet')
_DECODE_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a run needs to know about its data before decoding any image."""
  root: pathlib.Path
  wnids: tuple[str, ...]  # label i is wnids[i]
  class_names: tuple[str, ...]
  image_size: int

  @property
  def num_classes(self) -> int:
    return len(self.wnids)


@dataclasses.dataclass(frozen=True)
class Split:
  """One decoded split: uint8 images [N, H, W, 3], int32 labels (-1: none)."""
  images: np.ndarray
  labels: np.ndarray
  file_names: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.labels)


def get_dataset_info(data_config: Mapping[str, Any]) -> DatasetInfo:
  """Locates (for digits: writes) the tree named by `config.data`."""
  name = data_config.get('name')
  image_size = data_config.get('image_size')
  if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
    raise ValueError(f'data.image_size must be a positive integer, got {image_size!r}')
  if name == 'digits':
    root = digits.write_digits_tree(data_config['data_dir'], image_size)
  elif name == 'tiny_imagenet':
    if not data_config.get('data_dir'):
      raise ValueError('data.data_dir must name the extracted tiny-imagenet-200/ '
                       'folder (set --config.data.data_dir=/path/to/tiny-imagenet-200)')
    root = pathlib.Path(data_config['data_dir']).expanduser()
    if not root.is_dir():
      raise FileNotFoundError(f'data.data_dir {root} is not a directory (expected '
                              'the extracted tiny-imagenet-200/ folder)')
  else:
    raise ValueError(f'Unknown dataset {name!r} in config.data.name; valid names: '
                     f'{list(DATASETS)}')
  wnids = tiny_imagenet.read_wnids(root)
  return DatasetInfo(root=root, wnids=wnids,
                     class_names=tiny_imagenet.read_class_names(root, wnids),
                     image_size=image_size)


def _decode(path: tf.Tensor, image_size: int) -> tf.Tensor:
  image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                             expand_animations=False)
  # Images of another size (data.image_size below Tiny ImageNet's 64, say) are
  # resized with an antialiased bilinear filter; same-size images pass as is.
  shape = tf.shape(image)
  image = tf.cond(
      tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size)),
      lambda: image,
      lambda: tf.cast(tf.clip_by_value(tf.round(tf.image.resize(
          image, (image_size, image_size), antialias=True)), 0, 255), tf.uint8))
  return tf.ensure_shape(image, (image_size, image_size, 3))


def _find_undecodable(paths: tuple[pathlib.Path, ...]) -> pathlib.Path | None:
  for path in paths:
    try:
      with Image.open(path) as image:
        image.load()
    except OSError:
      return path
  return None


def load_split(info: DatasetInfo, split: str) -> Split:
  """Decodes every image of `split` at `info.image_size` (grayscale to RGB)."""
  files = tiny_imagenet.list_split(info.root, split, info.wnids)
  label_of = {w: i for i, w in enumerate(info.wnids)}
  labels = np.array([-1 if w is None else label_of[w] for w in files.wnids], np.int32)
  dataset = (tf.data.Dataset.from_tensor_slices([str(p) for p in files.paths])
             .map(lambda p: _decode(p, info.image_size),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
             .batch(_DECODE_BATCH))
  try:
    images = np.concatenate(list(dataset.as_numpy_iterator()))
  except tf.errors.InvalidArgumentError as error:
    bad = _find_undecodable(files.paths)
    where = str(bad) if bad else f'an image of {info.root / split}'
    raise ValueError(f'Cannot decode {where}: {error.message}') from error
  return Split(images=images, labels=labels, file_names=files.file_names)


def _gather(images: tf.Tensor, labels: tf.Tensor, indices: tf.Tensor,
            batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  batch.update(image=tf.gather(images, indices), label=tf.gather(labels, indices))
  return batch


class TrainInput:
  """Training batches of one split, one deterministic permutation per epoch.

  With several hosts each takes every `process_count`-th example of the
  epoch's permutation, so hosts read disjoint data; `batch_size` is global.
  """

  def __init__(self, split: Split, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    if batch_size % process_count:
      raise ValueError(f'batch_size {batch_size} is not divisible by the '
                       f'{process_count} hosts')
    self.host_batch_size = batch_size // process_count
    self.num_examples = len(split)
    self.steps_per_epoch = self.num_examples // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f'batch_size {batch_size} is larger than the {len(split)} '
                       'training images: no full batch to train on')
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self._images = tf.constant(split.images)
    self._labels = tf.constant(split.labels)

  def epoch(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
    """The host's batches of `epoch`: {'image': uint8, 'label': int32}."""
    order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
    order = order[self.process_index::self.process_count]
    order = order[:self.steps_per_epoch * self.host_batch_size]
    dataset = (tf.data.Dataset.from_tensor_slices(order)
               .batch(self.host_batch_size, drop_remainder=True)
               .map(lambda i: _gather(self._images, self._labels, i, {}),
                    num_parallel_calls=tf.data.AUTOTUNE)
               .prefetch(tf.data.AUTOTUNE))
    return dataset.as_numpy_iterator()


def eval_batches(split: Split, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Every image once, in order; the last batch padded, `mask` False there."""
  num_batches = -(-len(split) // batch_size)
  padded = num_batches * batch_size
  indices = np.zeros(padded, np.int64)
  indices[:len(split)] = np.arange(len(split))
  mask = np.arange(padded) < len(split)
  images, labels = tf.constant(split.images), tf.constant(split.labels)
  dataset = (tf.data.Dataset.from_tensor_slices((indices, mask))
             .batch(batch_size)
             .map(lambda i, m: _gather(images, labels, i, {'mask': m}))
             .prefetch(tf.data.AUTOTUNE))
  return dataset.as_numpy_iterator()
