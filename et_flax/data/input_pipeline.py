"""Input: prepare the tfds dataset, decode each split once, then batch it.

Both datasets go through the `tiny_imagenet` tfds builder: Tiny ImageNet from
its extracted folder, its zip or (when allowed) its URL, and the embedded
digits from the tree `et_flax.data.digits` writes in the same layout. A split is
decoded once (in parallel, by tf.data) into uint8, and cached beside the
prepared dataset as memory-mapped NumPy files, keyed by the source's
fingerprint (for a dataset prepared by an older et_flax, without one: by
what tfds recorded of it), the image size, the classes and the host's share
(`DecodedCache`): a later run reads the cache and imports no TensorFlow at
all. Tiny ImageNet's training split is 1.2 GB that way.

Batches are gathered from the decoded arrays with NumPy. Each training epoch
is a fresh order drawn from (seed, epoch), so a run resumed at epoch e sees
exactly the batches it would have seen; evaluation batches are padded to full
size and carry a mask, so every image counts exactly once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from et_flax import console
from et_flax import run_files
from et_flax.data import digits
from et_flax.data import preparation
from et_flax.data import tiny_imagenet

DATASETS = ('digits', 'tiny_imagenet')
DEFAULT_TFDS_DIR = os.path.join('~', 'tensorflow_datasets')
_DECODE_BATCH = 1024
# Training batches gathered ahead of the step on a background thread.
_PREFETCH_BATCHES = 2


def _tensorflow(purpose: str) -> tuple[Any, Any]:
  """TensorFlow and tensorflow-datasets, set up for `purpose` (once per process)."""
  tf = console.import_tensorflow(purpose)
  tfds = console.import_tensorflow(purpose, 'tensorflow_datasets')
  _setup(tf, tfds)
  return tf, tfds


@functools.cache
def _setup(tf: Any, tfds: Any) -> None:
  """Keeps TensorFlow to tf.data on the CPU, and tfds quiet.

  TensorFlow must never take GPU memory that JAX needs (a no-op with
  tensorflow-cpu, but not with a GPU build of TensorFlow, as in Colab).
  """
  tf.config.set_visible_devices([], 'GPU')
  tfds.disable_progress_bar()


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a run needs to know about its data before decoding any image."""
  data_dir: str  # the prepared dataset: <tfds_dir>/tiny_imagenet/<config>/<version>
  config_name: str  # the tfds builder config it was prepared under
  all_wnids: tuple[str, ...]  # the prepared dataset's labels, in order
  wnids: tuple[str, ...]  # label i is wnids[i]
  class_names: tuple[str, ...]
  image_size: int
  source_labels: tuple[int, ...]  # label i is source_labels[i] in the prepared dataset
  # The fingerprint key of what it was prepared from; prepared by an older
  # et_flax (no fingerprint): `preparation.prepared_key`, prefixed 'older_'.
  source_key: str
  source_check: str | None = None  # how it was checked (tiny_imagenet.SOURCE_CHECK_KEY)

  @property
  def num_classes(self) -> int:
    return len(self.wnids)

  def describe_source(self) -> str:
    """What the dataset was prepared from, and how that was checked."""
    return tiny_imagenet.describe_source_check(self.source_check)

  def class_mapping(self) -> dict[str, Any]:
    return {'wnids': list(self.wnids), 'class_names': list(self.class_names)}


@dataclasses.dataclass(frozen=True)
class Split:
  """Decoded images of a split: uint8 [n, H, W, 3], int32 labels (-1: none).

  A whole split, or (on one host of several) a share of it: then `indices`
  are the held examples' positions in the whole split, in increasing order,
  and `split_size` is the whole split's size. The arrays may be memory-mapped
  from the decoded cache.
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


@dataclasses.dataclass(frozen=True)
class _Source:
  """Where `config.data`'s dataset is prepared, and what from (no tfds needed)."""
  name: str
  tfds_dir: str
  config_name: str
  fingerprint: tiny_imagenet.SourceFingerprint | None  # None: no data.data_dir
  extracted_dir: pathlib.Path | None = None
  manual_dir: pathlib.Path | None = None  # the folder holding the zip
  image_size: int | None = None  # a tree's stored image side
  verify_source: bool = True  # check a zip against the official size and MD5

  @property
  def prepared_dir(self) -> pathlib.Path:
    return (pathlib.Path(self.tfds_dir).expanduser() / tiny_imagenet.BUILDER_NAME
            / self.config_name / tiny_imagenet.VERSION)


def _locate(data_config: Mapping[str, Any]) -> _Source:
  """`config.data`'s source and where it is (or will be) prepared.

  The source's fingerprint is stored with the prepared dataset. The digits
  and trees not in the official layout are prepared under a config named by
  the fingerprint's key, so that each tree, and each change of one, is
  prepared apart; the official layout keeps its name, and one prepared from
  another source is refused (`preparation`).
  """
  name = data_config.get('name')
  data_dir = str(data_config.get('data_dir') or '')
  if name == 'digits':
    if not data_dir:
      raise ValueError('data.data_dir must name a folder to write the digits to')
    extracted_dir = digits.write_digits_tree(data_dir, data_config['image_size'])
    source = tiny_imagenet.tree_fingerprint(extracted_dir)
    return _Source(name, data_config.get('tfds_dir') or
                   str(pathlib.Path(data_dir).expanduser() / 'tfds'),
                   tiny_imagenet.digits_config_name(data_config['image_size'], source.key),
                   source, extracted_dir=extracted_dir, image_size=data_config['image_size'])
  if name != 'tiny_imagenet':
    raise ValueError(f'Unknown dataset {name!r} in config.data.name; valid names: '
                     f'{list(DATASETS)}')
  tfds_dir = data_config.get('tfds_dir') or DEFAULT_TFDS_DIR
  verify_source = data_config.get('verify_source', True)
  if not isinstance(verify_source, bool):
    raise ValueError(f'data.verify_source must be True or False, got {verify_source!r}')
  if not data_dir:
    return _Source(name, tfds_dir, tiny_imagenet.OFFICIAL_CONFIG, None,
                   verify_source=verify_source)
  path = pathlib.Path(data_dir).expanduser()
  if (path / tiny_imagenet.ZIP_NAME).exists() and not (path / 'wnids.txt').exists():
    if verify_source:
      # Its size now, before its members are read (its MD5 when it is prepared).
      tiny_imagenet.check_official_zip(path / tiny_imagenet.ZIP_NAME, check_md5=False)
    return _Source(name, tfds_dir, tiny_imagenet.OFFICIAL_CONFIG,
                   tiny_imagenet.zip_fingerprint(path / tiny_imagenet.ZIP_NAME),
                   manual_dir=path, verify_source=verify_source)
  if not (path / 'wnids.txt').exists():
    raise FileNotFoundError(
        f'data.data_dir {path} holds neither wnids.txt (the extracted '
        f'{tiny_imagenet.TREE_NAME}/ folder) nor {tiny_imagenet.ZIP_NAME}')
  source = tiny_imagenet.tree_fingerprint(path)
  # A tree in the layout with other classes or image sizes (a test tree, a
  # user's own subset) is prepared under a config of its own.
  num_classes, size = len(source.wnids), tiny_imagenet.stored_image_size(path)
  config_name = tiny_imagenet.OFFICIAL_CONFIG
  if (num_classes, size) != (tiny_imagenet.OFFICIAL_NUM_CLASSES,
                             tiny_imagenet.OFFICIAL_IMAGE_SIZE):
    config_name = tiny_imagenet.layout_config_name(num_classes, size, source.key)
  return _Source(name, tfds_dir, config_name, source, extracted_dir=path, image_size=size)


def _prepare(source: _Source, allow_download: bool) -> dict[str, Any]:
  """Prepares `source` with tfds (once), returning the prepared metadata."""
  _, tfds = _tensorflow(f'preparing {source.name} in {source.prepared_dir}')
  # pylint: disable-next=import-outside-toplevel
  from et_flax.data import tiny_imagenet_builder
  extract_dir = None
  if source.manual_dir is not None:
    # tfds names an extraction by the zip's file name alone, and would reuse
    # one of another zip of that name: one folder per zip content.
    extract_dir = (pathlib.Path(source.tfds_dir).expanduser() / 'downloads' / 'extracted'
                   / f'tiny_imagenet_{source.fingerprint.key}')
  if source.name == 'digits':
    config = tiny_imagenet_builder.digits_builder_config(source.image_size,
                                                         source.fingerprint.key)
  elif source.config_name == tiny_imagenet.OFFICIAL_CONFIG:
    config = tiny_imagenet_builder.TinyImagenet.BUILDER_CONFIGS[0]
  else:
    config = tiny_imagenet_builder.TinyImagenetConfig(
        name=source.config_name, num_classes=len(source.fingerprint.wnids),
        image_size=source.image_size)
  make_builder = functools.partial(
      tiny_imagenet_builder.TinyImagenet, extracted_dir=source.extracted_dir,
      allow_download=allow_download, verify_source=source.verify_source,
      source=source.fingerprint, config=config,
      data_dir=source.tfds_dir)
  builder = preparation.prepare(
      make_builder, source.fingerprint, tfds.download.DownloadConfig(
          manual_dir=source.manual_dir, extract_dir=extract_dir, try_download_gcs=False))
  metadata = dict(builder.info.metadata)
  metadata.setdefault('wnids', list(builder.info.features['label'].names))
  metadata.setdefault(tiny_imagenet.FINGERPRINT_KEY, None)
  return metadata


def get_dataset_info(data_config: Mapping[str, Any]) -> DatasetInfo:
  """Prepares (once) the dataset named by `config.data` and selects its classes.

  A dataset already prepared (by this or an older et_flax) is read and
  checked as plain JSON: only preparing imports tensorflow-datasets.
  """
  image_size = data_config.get('image_size')
  if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
    raise ValueError(f'data.image_size must be a positive integer, got {image_size!r}')
  source = _locate(data_config)
  prepared_dir = source.prepared_dir
  metadata = preparation.read_prepared_metadata(prepared_dir)
  if metadata is None:
    metadata = _prepare(source, source.name == 'tiny_imagenet'
                        and bool(data_config.get('download')))
  elif source.fingerprint is not None:
    preparation.check_stored_source(prepared_dir, source.config_name, metadata,
                                    source.fingerprint)
  all_wnids = tuple(metadata['wnids'])
  names = dict(zip(all_wnids, metadata['class_names']))
  wnids = select_classes(all_wnids, data_config.get('classes'))
  stored = metadata.get(tiny_imagenet.FINGERPRINT_KEY)
  return DatasetInfo(
      data_dir=str(prepared_dir), config_name=source.config_name, all_wnids=all_wnids,
      wnids=wnids, class_names=tuple(names[w] for w in wnids), image_size=image_size,
      source_labels=tuple(all_wnids.index(w) for w in wnids),
      source_key=(tiny_imagenet.SourceFingerprint.from_json(stored).key if stored
                  else f'older_{preparation.prepared_key(prepared_dir, metadata)}'),
      source_check=metadata.get(tiny_imagenet.SOURCE_CHECK_KEY))


def save_class_mapping(info: DatasetInfo, workdir: str | os.PathLike) -> pathlib.Path:
  """Writes the data's class mapping (`run_files.write_classes`: classes.json)
  to the workdir, refusing one that maps labels differently."""
  return run_files.write_classes(workdir, info.class_mapping())


# ---------------------------------------------------------------------------
# Decoding, once per (source, split, size, classes, share): the cache.

@dataclasses.dataclass(frozen=True)
class Share:
  """The examples of a split one host of several decodes (`train_share`,
  `eval_share`): `select(split_size)` gives their positions, increasing;
  `key` names the choice in the decoded cache."""
  key: str
  select: Callable[[int], np.ndarray]

  def __call__(self, split_size: int) -> np.ndarray:
    return self.select(split_size)


CACHE_FOLDER = 'decoded'
_CACHE_FORMAT = 1


class DecodedCache:
  """Decoded splits beside the prepared dataset: `<data_dir>/decoded/<key>/`.

  Each entry holds `images.npy` (uint8), `labels.npy`, `indices.npy` (a
  share's positions) and `meta.json` (what it was decoded from, the file
  names); it is written to a temporary folder and renamed into place, so a
  killed run leaves nothing that passes for an entry. The key covers the
  source's fingerprint (`DatasetInfo.source_key`), the split, the image
  size, the classes and the share: a change of any of them decodes anew.
  Removing the prepared dataset removes its cache.
  """

  def __init__(self, info: DatasetInfo, split: str, share: Share | None):
    self.description = {
        'format': _CACHE_FORMAT, 'source_key': info.source_key, 'split': split,
        'image_size': info.image_size, 'source_labels': list(info.source_labels),
        'share': None if share is None else share.key}
    digest = hashlib.sha256(json.dumps(self.description).encode()).hexdigest()[:16]
    self.path = pathlib.Path(info.data_dir) / CACHE_FOLDER / f'{split}_{digest}'

  def read(self) -> Split | None:
    """The cached split (memory-mapped), or None if it is not cached.

    An entry that cannot be read (damaged by a crash or a failing disk, or
    another user's without read permission) is warned about and decoded
    again; a damaged one is removed first (it is derived data).
    """
    try:
      if not (self.path / 'meta.json').is_file():
        return None
      return self._read()
    except (OSError, ValueError, KeyError, EOFError) as error:
      if isinstance(error, PermissionError):
        console.warning('cannot read the decoded split in %s (%s): decoding it again',
                        self.path, error.strerror or error)
        return None
      console.warning('the decoded split in %s is damaged (%s): removing it and decoding '
                      'it again', self.path, error)
      shutil.rmtree(self.path, ignore_errors=True)
      return None

  def _read(self) -> Split:
    meta = json.loads((self.path / 'meta.json').read_text())
    if meta['description'] != self.description:
      raise ValueError(f'it holds another split than its name says ({meta["description"]})')
    images = np.load(self.path / 'images.npy', mmap_mode='r')
    labels = np.load(self.path / 'labels.npy')
    indices = np.load(self.path / 'indices.npy') if meta['split_size'] is not None else None
    if len(images) != len(labels) or len(labels) != len(meta['file_names']):
      raise ValueError(f'{len(images)} images, {len(labels)} labels and '
                       f'{len(meta["file_names"])} names')
    return Split(images=images, labels=labels, file_names=tuple(meta['file_names']),
                 indices=indices, split_size=meta['split_size'])

  def write(self, split: Split) -> None:
    """Writes `split` as this entry, readable as the umask allows; where it
    cannot be written (a read-only folder, a full disk) it is warned about,
    and the split is decoded again by the next run."""
    tmp = None
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{self.path.name}.', dir=self.path.parent))
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide it from other users
      np.save(tmp / 'images.npy', split.images)
      np.save(tmp / 'labels.npy', split.labels)
      if split.indices is not None:
        np.save(tmp / 'indices.npy', split.indices)
      (tmp / 'meta.json').write_text(json.dumps({
          'description': self.description, 'split_size': split.split_size,
          'file_names': list(split.file_names)}))
      for name in os.listdir(tmp):  # on disk before the entry is renamed into place
        with open(tmp / name, 'rb') as file:
          os.fsync(file.fileno())
      os.rename(tmp, self.path)
    except OSError as error:
      if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
      if not self.path.is_dir():  # else another process cached the same split meanwhile
        console.warning('cannot cache the decoded split in %s (%s): it will be decoded '
                        'again by the next run', self.path.parent, error.strerror or error)
      return
    logging.info('Cached the decoded %s split in %s', self.description['split'], self.path)


def load_split(info: DatasetInfo, split: str, share: Share | None = None) -> Split:
  """Every image of `split` (of the selected classes), decoded.

  `share` selects the examples this host needs (`train_share`,
  `eval_share`): only those are decoded. None decodes the whole split. Read
  from the decoded cache when there; decoded with tf.data and cached
  otherwise.
  """
  if split not in tiny_imagenet.SPLITS:
    raise ValueError(f'Unknown split {split!r}; valid splits: {list(tiny_imagenet.SPLITS)}')
  cache = DecodedCache(info, split, share)
  cached = cache.read()
  if cached is not None:
    logging.info('Read the decoded %s split from %s', split, cache.path)
    return cached
  console.info('Decoding the %s split of %s at %dx%d%s (once: cached in %s)', split,
               info.data_dir, info.image_size, info.image_size,
               '' if share is None else f' ({share.key}: this host\'s share)',
               cache.path.parent)
  decoded = _decode_split(info, split, share)
  cache.write(decoded)
  return decoded


def _decoder(tf: Any, info: DatasetInfo, split: str):
  remap = np.full(len(info.all_wnids), -1, np.int32)
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



def _decode_split(info: DatasetInfo, split: str, share: Share | None) -> Split:
  """`split` decoded by tf.data (TensorFlow imported here, and only here)."""
  tf, tfds = _tensorflow(f'decoding the {split} split of {info.data_dir}')
  decode, keep = _decoder(tf, info, split)
  builder = tfds.builder_from_directory(info.data_dir)
  records = (builder.as_dataset(split=split, shuffle_files=False,
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
    raise ValueError(f'The {split} split of {info.data_dir} holds no images '
                     'of the selected classes')
  if not images:  # a host whose rows of the last batch are all padding
    size = info.image_size
    images, labels = [np.zeros((0, size, size, 3), np.uint8)], [np.zeros(0, np.int32)]
  return Split(images=np.concatenate(images), labels=np.concatenate(labels),
               file_names=tuple(file_names), indices=indices, split_size=split_size)


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


def train_share(batch_size: int, seed: int, rows: slice) -> Share:
  """For `load_split`: the examples of the lanes that feed `rows` of each batch."""
  def share(num_examples: int) -> np.ndarray:
    lanes = train_lanes(num_examples, batch_size, seed)[:, rows]
    return np.sort(lanes[lanes >= 0])
  return Share(f'train lanes: batch {batch_size}, seed {seed}, rows {rows.start}-'
               f'{rows.stop - 1}', share)


def eval_share(batch_size: int, rows: slice) -> Share:
  """For `load_split`: the examples at `rows` of each padded eval batch."""
  def share(num_examples: int) -> np.ndarray:
    positions = np.arange(num_examples)
    row = positions % batch_size
    return positions[(row >= rows.start) & (row < rows.stop)]
  return Share(f'eval rows: batch {batch_size}, rows {rows.start}-{rows.stop - 1}', share)


def prefetched(batches: Iterator[Any], size: int = _PREFETCH_BATCHES) -> Iterator[Any]:
  """`batches`, each made ahead on a background thread (at most `size` ahead).

  An error there is raised here, at the batch it stopped; closing this
  generator (a run stopped within an epoch) stops the thread.
  """
  ready: queue.Queue = queue.Queue(size)
  done = object()
  stopped = threading.Event()

  def put(item) -> bool:
    """Queues `item` unless the consumer has stopped; whether it was queued."""
    while not stopped.is_set():
      try:
        ready.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for batch in batches:
        if not put(batch):
          return
      put(done)
    except BaseException as error:  # pylint: disable=broad-except
      put(error)  # raised in the consumer, with its traceback

  thread = threading.Thread(target=produce, daemon=True, name='et_flax-batches')
  thread.start()
  try:
    while (item := ready.get()) is not done:
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stopped.set()
    thread.join()


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

  def epoch(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
    """This host's rows of `epoch`'s batches: {'image': uint8, 'label': int32}."""
    order = epoch_order(self.num_examples, self.batch_size, self.seed, epoch)
    local = self._split.positions(order[:, self.rows])
    images, labels = self._split.images, self._split.labels
    return prefetched({'image': images[rows], 'label': labels[rows]} for rows in local)


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
  step = rows.stop - rows.start
  for start in range(0, len(indices), step):
    batch = indices[start:start + step]
    yield {'image': images[batch], 'label': labels[batch], 'mask': mask[start:start + step]}
