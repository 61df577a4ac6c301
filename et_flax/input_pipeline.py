"""tf.data input: prepare the tfds dataset, decode it once, then batch it.

Both datasets go through the `tiny_imagenet` tfds builder: Tiny ImageNet from
its extracted folder, its zip or (when allowed) its URL, and the embedded
digits from the tree `et_flax.digits` writes in the same layout. Images are
decoded once (in parallel, by tf.data) and kept as uint8 in host memory:
Tiny ImageNet's training split is 1.2 GB that way. Each training epoch is a
fresh permutation drawn from (seed, epoch), so a run resumed at
epoch e sees exactly the batches it would have seen; evaluation batches are
padded to full size and carry a mask, so every image counts exactly once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from et_flax import digits
from et_flax import preparation
from et_flax import tiny_imagenet

DATASETS = ('digits', 'tiny_imagenet')
DEFAULT_TFDS_DIR = os.path.join('~', 'tensorflow_datasets')
_DECODE_BATCH = 1024



@functools.cache
def setup() -> None:
  """Keeps TensorFlow to tf.data on the CPU, and tfds quiet; once per process.

  TensorFlow must never take GPU memory that JAX needs (a no-op with
  tensorflow-cpu, but not with a GPU build of TensorFlow, as in Colab).
  Called by `get_dataset_info`, before TensorFlow touches a device.
  """
  tf.config.set_visible_devices([], 'GPU')
  tfds.disable_progress_bar()


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a run needs to know about its data before decoding any image."""
  builder: tfds.core.DatasetBuilder
  wnids: tuple[str, ...]  # label i is wnids[i]
  class_names: tuple[str, ...]
  image_size: int
  source_labels: tuple[int, ...]  # label i is source_labels[i] in the builder

  @property
  def num_classes(self) -> int:
    return len(self.wnids)

  def class_mapping(self) -> dict[str, Any]:
    return {'wnids': list(self.wnids), 'class_names': list(self.class_names)}


@dataclasses.dataclass(frozen=True)
class Split:
  """Decoded images of a split: uint8 [n, H, W, 3], int32 labels (-1: none).

  A whole split, or (on one host of several) a share of it: then `indices`
  are the held examples' positions in the whole split, in increasing order,
  and `split_size` is the whole split's size.
  """
  images: np.ndarray
  labels: np.ndarray
  file_names: tuple[str, ...]
  indices: np.ndarray | None = None  # None: the whole split, in order
  split_size: int | None = None

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def total(self) -> int:
    """The number of examples of the whole split."""
    return len(self.labels) if self.split_size is None else self.split_size

  @property
  def example_indices(self) -> np.ndarray:
    """Positions of the held examples in the whole split."""
    return np.arange(len(self.labels)) if self.indices is None else self.indices

  def positions(self, examples: np.ndarray) -> np.ndarray:
    """Where examples (positions in the whole split) are held in this share."""
    held = self.example_indices
    found = np.minimum(np.searchsorted(held, examples), len(held) - 1)
    if not np.array_equal(held[found], examples):
      missing = sorted(set(np.ravel(examples)) - set(held))[:5]
      raise AssertionError(f'Examples {missing} are not in this host\'s share')
    return found


def select_classes(wnids: tuple[str, ...], classes: Any) -> tuple[str, ...]:
  """The class subset named by `config.data.classes`, in label order.

  0 (or None) keeps every class. A count n takes n wnids evenly spaced over
  the sorted wnids (the i-th is wnids[i * len(wnids) // n]), which spreads a
  subset across WordNet rather than taking one branch of it. A list of wnids
  takes exactly those. From the command line a string arrives: digits are a
  count ('5'), anything else comma-separated wnids ('n01443537,n01629819').
  """
  if isinstance(classes, str):
    text = classes.strip()
    classes = (int(text) if text.isdigit() else
               [wnid.strip() for wnid in text.split(',') if wnid.strip()])
  if classes is None or (isinstance(classes, int) and not isinstance(classes, bool)
                         and classes == 0):
    return wnids
  if isinstance(classes, int) and not isinstance(classes, bool):
    if not 0 < classes <= len(wnids):
      raise ValueError(f'data.classes={classes} but the dataset has {len(wnids)} '
                       'classes: expected a count from 1 to that, 0 for all, or a '
                       'list of wnids')
    return tuple(wnids[i * len(wnids) // classes] for i in range(classes))
  if isinstance(classes, (list, tuple)) and all(isinstance(w, str) for w in classes):
    unknown = [w for w in classes if w not in wnids]
    if unknown:
      raise ValueError(f'data.classes names wnids the dataset does not have: {unknown}')
    if len(set(classes)) != len(classes) or not classes:
      raise ValueError(f'data.classes must list distinct wnids, got {list(classes)}')
    return tuple(sorted(classes))
  raise ValueError('data.classes must be 0 (all), a class count or a list of wnids '
                   f'(on the command line: n01443537,n01629819), got {classes!r}')


def _builder(data_config: Mapping[str, Any]) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder for `config.data` (preparing it once).

  The source's fingerprint is stored with the prepared dataset. The digits
  and trees not in the official layout are prepared under a config named by
  the fingerprint's key, so that each tree, and each change of one, is
  prepared apart; the official layout keeps its name, and one prepared from
  another source is refused (`preparation.prepare`).
  """
  name = data_config.get('name')
  data_dir = str(data_config.get('data_dir') or '')
  manual_dir = extracted_dir = source = extract_dir = None
  if name == 'digits':
    if not data_dir:
      raise ValueError('data.data_dir must name a folder to write the digits to')
    extracted_dir = digits.write_digits_tree(data_dir, data_config['image_size'])
    source = tiny_imagenet.tree_fingerprint(extracted_dir)
    config = tiny_imagenet.digits_builder_config(data_config['image_size'], source.key)
    tfds_dir = data_config.get('tfds_dir') or str(pathlib.Path(data_dir).expanduser() / 'tfds')
  elif name == 'tiny_imagenet':
    if data_dir:
      path = pathlib.Path(data_dir).expanduser()
      if (path / 'wnids.txt').exists():
        extracted_dir = path
        source = tiny_imagenet.tree_fingerprint(path)
      elif (path / tiny_imagenet.ZIP_NAME).exists():
        manual_dir = path
        source = tiny_imagenet.zip_fingerprint(path / tiny_imagenet.ZIP_NAME)
      else:
        raise FileNotFoundError(
            f'data.data_dir {path} holds neither wnids.txt (the extracted '
            f'{tiny_imagenet.TREE_NAME}/ folder) nor {tiny_imagenet.ZIP_NAME}')
    config = tiny_imagenet.TinyImagenet.BUILDER_CONFIGS[0]
    if extracted_dir is not None:
      # A tree in the layout with other classes or image sizes (a test tree,
      # a user's own subset) is prepared under a config of its own.
      num_classes = len(source.wnids)
      size = tiny_imagenet.stored_image_size(extracted_dir)
      if (num_classes, size) != (config.num_classes, config.image_size):
        config = tiny_imagenet.TinyImagenetConfig(
            name=f'layout_{num_classes}_classes_{size}px_{source.key}',
            num_classes=num_classes, image_size=size)
    tfds_dir = data_config.get('tfds_dir') or DEFAULT_TFDS_DIR
  else:
    raise ValueError(f'Unknown dataset {name!r} in config.data.name; valid names: '
                     f'{list(DATASETS)}')
  if manual_dir is not None:
    # tfds names an extraction by the zip's file name alone, and would reuse
    # one of another zip of that name: one folder per zip content.
    extract_dir = (pathlib.Path(tfds_dir).expanduser() / 'downloads' / 'extracted'
                   / f'tiny_imagenet_{source.key}')
  make_builder = functools.partial(
      tiny_imagenet.TinyImagenet, extracted_dir=extracted_dir,
      allow_download=name == 'tiny_imagenet' and bool(data_config.get('download')),
      source=source, config=config, data_dir=tfds_dir)
  return preparation.prepare(make_builder, source, tfds.download.DownloadConfig(
      manual_dir=manual_dir, extract_dir=extract_dir, try_download_gcs=False))


def get_dataset_info(data_config: Mapping[str, Any]) -> DatasetInfo:
  """Prepares (once) the dataset named by `config.data` and selects its classes."""
  setup()
  image_size = data_config.get('image_size')
  if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
    raise ValueError(f'data.image_size must be a positive integer, got {image_size!r}')
  builder = _builder(data_config)
  all_wnids = tuple(builder.info.features['label'].names)
  names = dict(zip(all_wnids, builder.info.metadata['class_names']))
  wnids = select_classes(all_wnids, data_config.get('classes'))
  return DatasetInfo(builder=builder, wnids=wnids,
                     class_names=tuple(names[w] for w in wnids),
                     image_size=image_size,
                     source_labels=tuple(all_wnids.index(w) for w in wnids))


def save_class_mapping(info: DatasetInfo, workdir: str | os.PathLike) -> pathlib.Path:
  """Writes `classes.json` (label i: wnid and name) to the workdir.

  A workdir that already maps labels differently is refused: its
  checkpoints and results would name the wrong classes.
  """
  path = pathlib.Path(workdir) / 'classes.json'
  mapping = info.class_mapping()
  if path.exists():
    found = json.loads(path.read_text())
    if found != mapping:
      raise ValueError(f'{path} maps labels to other classes ({len(found["wnids"])} '
                       f'classes, first {found["wnids"][:3]}) than this config '
                       f'({info.num_classes}, first {list(info.wnids[:3])}); use '
                       'another workdir')
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(mapping, indent=1))
  return path


def _decoder(info: DatasetInfo, split: str):
  remap = np.full(len(info.builder.info.features['label'].names), -1, np.int32)
  remap[list(info.source_labels)] = np.arange(info.num_classes)
  remap = tf.constant(remap)
  size = info.image_size

  def decode(example):
    image = tf.io.decode_image(example['image'], channels=3, expand_animations=False)
    # Another data.image_size than the stored one (below Tiny ImageNet's 64,
    # say): resize with an antialiased bilinear filter.
    shape = tf.shape(image)
    image = tf.cond(
        tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size)),
        lambda: image,
        lambda: tf.cast(tf.clip_by_value(tf.round(tf.image.resize(
            image, (size, size), antialias=True)), 0, 255), tf.uint8))
    label = tf.cast(example['label'], tf.int32)
    label = tf.where(label < 0, label, tf.gather(remap, tf.maximum(label, 0)))
    return {'image': tf.ensure_shape(image, (size, size, 3)), 'label': label,
            'file_name': example['file_name']}

  def keep(example):
    if split == 'test':
      return tf.constant(True)
    return tf.reduce_any(tf.equal(tf.cast(example['label'], tf.int32),
                                  tf.constant(info.source_labels, tf.int32)))
  return decode, keep


def load_split(info: DatasetInfo, split: str,
               share: Callable[[int], np.ndarray] | None = None) -> Split:
  """Decodes every image of `split` (of the selected classes) into memory.

  `share`, given the split's size, returns the positions (increasing) of the
  examples this host needs: only those are decoded (`train_share`,
  `eval_share`). None decodes the whole split.
  """
  if split not in tiny_imagenet.SPLITS:
    raise ValueError(f'Unknown split {split!r}; valid splits: {list(tiny_imagenet.SPLITS)}')
  decode, keep = _decoder(info, split)
  records = (info.builder.as_dataset(split=split, shuffle_files=False,
                                     decoders={'image': tfds.decode.SkipDecoding()})
             .filter(keep))
  split_size = indices = None
  if share is not None:
    # A pass over the labels alone (no image decoded) gives the split's size.
    split_size = int(records.reduce(np.int64(0), lambda count, _: count + 1))
    indices = np.asarray(share(split_size), np.int64)
    wanted = np.zeros(split_size, bool)
    wanted[indices] = True
    wanted = tf.constant(wanted)
    records = (records.enumerate()
               .filter(lambda i, example: tf.gather(wanted, i))
               .map(lambda i, example: example))
  dataset = (records
             .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
             .batch(_DECODE_BATCH))
  images, labels, file_names = [], [], []
  for batch in dataset.as_numpy_iterator():
    images.append(batch['image'])
    labels.append(batch['label'])
    file_names += [f.decode() for f in batch['file_name']]
  if not images and (share is None or not split_size):
    raise ValueError(f'The {split} split of {info.builder.data_dir} holds no images '
                     'of the selected classes')
  if not images:  # a host whose rows of the last batch are all padding
    size = info.image_size
    images, labels = [np.zeros((0, size, size, 3), np.uint8)], [np.zeros(0, np.int32)]
  return Split(images=np.concatenate(images), labels=np.concatenate(labels),
               file_names=tuple(file_names), indices=indices, split_size=split_size)


def _gather(images: tf.Tensor, labels: tf.Tensor, indices: tf.Tensor,
            batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  batch.update(image=tf.gather(images, indices), label=tf.gather(labels, indices))
  return batch


def train_lanes(num_examples: int, batch_size: int, seed: int) -> np.ndarray:
  """[ceil(N / B), B] example positions: column j lists the examples of lane j.

  Lane j is the set of examples that take row j of every batch (-1 pads the
  last row). The lanes are a fixed random partition drawn from `seed`.
  """
  rows = -(-num_examples // batch_size)
  lanes = np.full(rows * batch_size, -1, np.int64)
  lanes[:num_examples] = np.random.default_rng([seed]).permutation(num_examples)
  return lanes.reshape(rows, batch_size)


def epoch_order(num_examples: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
  """The examples of `epoch`'s batches: [steps, batch_size] positions.

  Each epoch draws, from (seed, epoch), a fresh order of every lane
  (`train_lanes`); batch i takes the i-th example of each lane, so the lanes
  shuffle independently and only full batches are kept (the examples left
  over change from epoch to epoch). An example always sits in its lane's row
  of the batch, which is what lets each host of a multi-host run read only
  the lanes of the rows it feeds: the batches are the same whatever the
  number of hosts, so a run resumes exactly on any topology.
  """
  lanes = train_lanes(num_examples, batch_size, seed)
  keys = np.random.default_rng([seed, epoch]).random(lanes.shape)
  keys[lanes < 0] = np.inf  # padding sorts last: every lane has `steps` examples
  shuffled = np.take_along_axis(lanes, np.argsort(keys, axis=0, kind='stable'), axis=0)
  return shuffled[:num_examples // batch_size]


def train_share(batch_size: int, seed: int, rows: slice) -> Callable[[int], np.ndarray]:
  """For `load_split`: the examples of the lanes that feed `rows` of each batch."""
  def share(num_examples: int) -> np.ndarray:
    lanes = train_lanes(num_examples, batch_size, seed)[:, rows]
    return np.sort(lanes[lanes >= 0])
  return share


def eval_share(batch_size: int, rows: slice) -> Callable[[int], np.ndarray]:
  """For `load_split`: the examples at `rows` of each padded eval batch."""
  def share(num_examples: int) -> np.ndarray:
    positions = np.arange(num_examples)
    row = positions % batch_size
    return positions[(row >= rows.start) & (row < rows.stop)]
  return share


def _check_rows(rows: slice | None, batch_size: int) -> slice:
  rows = slice(0, batch_size) if rows is None else rows
  if not 0 <= rows.start < rows.stop <= batch_size:
    raise ValueError(f'rows {rows} do not lie in a batch of {batch_size}')
  return rows


class TrainInput:
  """Training batches of one split, one deterministic order per epoch.

  `batch_size` is global; a host of several feeds `rows` of each batch and
  holds (in `split`) at least the examples of those rows' lanes.
  """

  def __init__(self, split: Split, batch_size: int, seed: int, rows: slice | None = None):
    self.rows = _check_rows(rows, batch_size)
    self.batch_size = batch_size
    self.num_examples = split.total
    self.steps_per_epoch = self.num_examples // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f'batch_size {batch_size} is larger than the {split.total} '
                       'training images: no full batch to train on')
    self.seed = seed
    self._split = split
    self._images = tf.constant(split.images)
    self._labels = tf.constant(split.labels)

  def epoch(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
    """This host's rows of `epoch`'s batches: {'image': uint8, 'label': int32}."""
    order = epoch_order(self.num_examples, self.batch_size, self.seed, epoch)
    local = self._split.positions(order[:, self.rows])
    dataset = (tf.data.Dataset.from_tensor_slices(local)
               .map(lambda i: _gather(self._images, self._labels, i, {}),
                    num_parallel_calls=tf.data.AUTOTUNE)
               .prefetch(tf.data.AUTOTUNE))
    return dataset.as_numpy_iterator()


class DeviceTrainInput:
  """The whole uint8 training split on the accelerator, batched there.

  The images go to device memory once; each epoch sends only the epoch's
  order (the same as `TrainInput`'s, so the batches are the same),
  and each step gathers its batch on device: no host round trip per step.
  `sharding` is where batches go (the data axis of the mesh); the split
  itself is replicated on every device. One host only.
  """

  def __init__(self, split: Split, batch_size: int, seed: int,
               sharding: jax.sharding.NamedSharding):
    if split.indices is not None:
      raise ValueError('DeviceTrainInput needs the whole split, not a host\'s share')
    self.steps_per_epoch = len(split) // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f'batch_size {batch_size} is larger than the {len(split)} '
                       'training images: no full batch to train on')
    self.num_examples, self.batch_size, self.seed = len(split), batch_size, seed
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    self._images = jax.device_put(split.images, replicated)
    self._labels = jax.device_put(split.labels, replicated)
    self._sharding = sharding
    self._gather = jax.jit(
        lambda images, labels, order, step: {
            'image': images[jax.lax.dynamic_index_in_dim(order, step, keepdims=False)],
            'label': labels[jax.lax.dynamic_index_in_dim(order, step, keepdims=False)]},
        out_shardings=sharding)

  def epoch(self, epoch: int) -> Iterator[dict[str, jax.Array]]:
    order = epoch_order(self.num_examples, self.batch_size, self.seed, epoch)
    order = jax.device_put(order.astype(np.int32))
    for step in range(self.steps_per_epoch):
      yield self._gather(self._images, self._labels, order, step)


def eval_batches(split: Split, batch_size: int, rows: slice | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Every image once, in order; the last batch padded, `mask` False there.

  `batch_size` is global; a host of several feeds `rows` of each batch and
  holds (in `split`) the examples there (`eval_share`), so the hosts
  together see every image once.
  """
  rows = _check_rows(rows, batch_size)
  num_batches = -(-split.total // batch_size)
  positions = (np.arange(num_batches)[:, None] * batch_size
               + np.arange(rows.start, rows.stop)[None, :]).ravel()
  mask = positions < split.total
  indices = np.zeros(len(positions), np.int64)
  indices[mask] = split.positions(positions[mask])
  images, labels = split.images, split.labels
  if not len(split):  # every row of this host is padding: gather a blank
    images = np.zeros((1, *images.shape[1:]), images.dtype)
    labels = np.zeros(1, labels.dtype)
  images, labels = tf.constant(images), tf.constant(labels)
  dataset = (tf.data.Dataset.from_tensor_slices((indices, mask))
             .batch(rows.stop - rows.start)
             .map(lambda i, m: _gather(images, labels, i, {'mask': m}))
             .prefetch(tf.data.AUTOTUNE))
  return dataset.as_numpy_iterator()
