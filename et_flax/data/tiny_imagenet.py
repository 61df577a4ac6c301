"""Reading a tree in the official Tiny ImageNet layout.

`tiny-imagenet-200.zip` unpacks to:

  tiny-imagenet-200/
    wnids.txt                     the 200 WordNet ids, one a line, not sorted
    words.txt                     wnid<TAB>names for all ImageNet synsets
    train/<wnid>/images/<wnid>_<i>.JPEG
    val/images/val_<i>.JPEG, val/val_annotations.txt (file<TAB>wnid<TAB>box)
    test/images/test_<i>.JPEG     no labels

Class order: label i is the i-th wnid in sorted order, which is also the order
Keras' `flow_from_directory` gave the report's models. The embedded digits
dataset (`et_flax.data.digits`) is written in this layout too.

`SourceFingerprint` identifies the content of a tree or of the zip without
decoding an image; the tensorflow-datasets builder over such a tree
(`et_flax.data.tiny_imagenet_builder`) stores it with the prepared dataset, and
how the source was checked (`SOURCE_CHECK_KEY`): the official zip against
its published size and MD5 (`check_official_zip`). Nothing here needs
TensorFlow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

SPLITS = ('train', 'val', 'test')
IMAGE_SUFFIX = '.JPEG'


@dataclasses.dataclass(frozen=True)
class SplitFiles:
  """The image files of one split and their wnids (None where unlabeled)."""
  paths: tuple[pathlib.Path, ...]
  wnids: tuple[str | None, ...]

  @property
  def file_names(self) -> tuple[str, ...]:
    return tuple(p.name for p in self.paths)


def _require(path: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
  if not path.exists():
    raise FileNotFoundError(
        f'{path} is missing: {root} is not a tree in the Tiny ImageNet layout '
        '(expected wnids.txt, words.txt, train/, val/ and test/ as in the '
        'extracted tiny-imagenet-200.zip)')
  return path


def read_wnids(root: pathlib.Path) -> tuple[str, ...]:
  """The dataset's wnids in label order (sorted)."""
  path = _require(root / 'wnids.txt', root)
  wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if not wnids:
    raise ValueError(f'{path} lists no wnids')
  duplicates = sorted({w for w in wnids if wnids.count(w) > 1})
  if duplicates:
    raise ValueError(f'{path} lists these wnids more than once: {duplicates}')
  return tuple(sorted(wnids))


def read_class_names(root: pathlib.Path, wnids: tuple[str, ...]) -> tuple[str, ...]:
  """Human-readable names of `wnids` from words.txt (which lists many more)."""
  path = _require(root / 'words.txt', root)
  names = {}
  for line_number, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    wnid, sep, name = line.partition('\t')
    if not sep:
      raise ValueError(f'{path}:{line_number}: expected "wnid<TAB>names", got {line!r}')
    names[wnid.strip()] = name.strip()
  missing = [w for w in wnids if w not in names]
  if missing:
    raise ValueError(f'{path} has no names for wnids {missing}')
  return tuple(names[w] for w in wnids)


def list_split(root: pathlib.Path, split: str, wnids: tuple[str, ...]) -> SplitFiles:
  """The files of `split`, in a fixed order (by class, then by file name)."""
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; valid splits: {list(SPLITS)}')
  known = set(wnids)
  paths: list[pathlib.Path] = []
  labels: list[str | None] = []
  if split == 'train':
    for wnid in wnids:
      folder = _require(root / 'train' / wnid / 'images', root)
      files = sorted(folder.glob(f'*{IMAGE_SUFFIX}'))
      if not files:
        raise ValueError(f'{folder} holds no {IMAGE_SUFFIX} images')
      paths += files
      labels += [wnid] * len(files)
  elif split == 'val':
    annotations = _require(root / 'val' / 'val_annotations.txt', root)
    for line_number, line in enumerate(annotations.read_text().splitlines(), 1):
      if not line.strip():
        continue
      fields = line.split('\t')
      if len(fields) < 2 or fields[1] not in known:
        raise ValueError(
            f'{annotations}:{line_number}: expected "file<TAB>wnid<TAB>box" with '
            f'a wnid from wnids.txt, got {line!r}')
      path = _require(root / 'val' / 'images' / fields[0], root)
      paths.append(path)
      labels.append(fields[1])
    order = sorted(range(len(paths)), key=lambda i: paths[i].name)
    paths, labels = [paths[i] for i in order], [labels[i] for i in order]
  else:
    folder = _require(root / 'test' / 'images', root)
    paths = sorted(folder.glob(f'*{IMAGE_SUFFIX}'))
    labels = [None] * len(paths)
  if not paths:
    raise ValueError(f'The {split} split of {root} holds no images')
  return SplitFiles(tuple(paths), tuple(labels))


# ---------------------------------------------------------------------------
# Fingerprints of a source: what a prepared dataset was prepared from.

FINGERPRINT_KEY = 'source_fingerprint'  # in the prepared dataset's info.metadata


@dataclasses.dataclass(frozen=True)
class SourceFingerprint:
  """What identifies a source's content, read without decoding any image.

  For an extracted tree and for the zip alike: the wnids, the size in bytes
  of every image under train/, val/ and test/ (by path in the tree), and
  the CRC32s of val_annotations.txt and words.txt. A zip also gives every
  image's CRC32 (from its central directory), compared with another zip's.
  """
  path: str  # where it was read: for messages only, never compared
  kind: str  # 'tree' or 'zip'
  wnids: tuple[str, ...]
  image_bytes: Mapping[str, int]
  val_annotations_crc32: int
  words_crc32: int
  image_crc32s_digest: str = ''  # zip only: a digest of every image's CRC32

  @property
  def key(self) -> str:
    """A short hash of the content: 8 hex digits."""
    content = json.dumps([list(self.wnids), sorted(self.image_bytes.items()),
                          self.val_annotations_crc32, self.words_crc32,
                          self.image_crc32s_digest])
    return hashlib.sha256(content.encode()).hexdigest()[:8]

  def split_sizes(self) -> dict[str, int]:
    """The number of images under each split's folder."""
    return {split: sum(path.startswith(f'{split}/') for path in self.image_bytes)
            for split in SPLITS}

  def to_json(self) -> dict[str, Any]:
    return {'path': self.path, 'kind': self.kind, 'wnids': list(self.wnids),
            'image_bytes': dict(sorted(self.image_bytes.items())),
            'val_annotations_crc32': self.val_annotations_crc32,
            'words_crc32': self.words_crc32,
            'image_crc32s_digest': self.image_crc32s_digest}

  @classmethod
  def from_json(cls, value: Mapping[str, Any]) -> SourceFingerprint:
    return cls(path=value['path'], kind=value['kind'], wnids=tuple(value['wnids']),
               image_bytes=dict(value['image_bytes']),
               val_annotations_crc32=value['val_annotations_crc32'],
               words_crc32=value['words_crc32'],
               image_crc32s_digest=value['image_crc32s_digest'])

  def differences(self, other: SourceFingerprint) -> list[str]:
    """How `other` differs from this, in words; empty: the same content.

    Added means in `other` only, removed in this one only.
    """
    found = []
    if self.wnids != other.wnids:
      new = sorted(set(other.wnids) - set(self.wnids))
      gone = sorted(set(self.wnids) - set(other.wnids))
      found.append(f'wnids: {len(new)} added (first {new[:3]}), {len(gone)} removed '
                   f'(first {gone[:3]})')
    added = sorted(set(other.image_bytes) - set(self.image_bytes))
    removed = sorted(set(self.image_bytes) - set(other.image_bytes))
    resized = sorted(p for p in set(self.image_bytes) & set(other.image_bytes)
                     if self.image_bytes[p] != other.image_bytes[p])
    if added or removed or resized:
      first = (added + removed + resized)[0]
      found.append(f'image files: {len(added)} added, {len(removed)} removed, '
                   f'{len(resized)} resized (first: {first})')
    if self.val_annotations_crc32 != other.val_annotations_crc32:
      found.append('val/val_annotations.txt differs')
    if self.words_crc32 != other.words_crc32:
      found.append('words.txt differs')
    # Only a digest of the CRC32s is kept: it can name a change of contents
    # only where the files' names and sizes have not already told one.
    if (self.kind == other.kind == 'zip' and not (added or removed or resized)
        and self.image_crc32s_digest != other.image_crc32s_digest):
      found.append("the images' contents differ (their CRC32s in the zip)")
    return found


def _crc32(path: pathlib.Path) -> int:
  with path.open('rb') as file:
    crc = 0
    while chunk := file.read(1 << 20):
      crc = zlib.crc32(chunk, crc)
  return crc


def _scan_images(folder: str, relative: str, found: dict[str, int]) -> None:
  with os.scandir(folder) as entries:
    for entry in entries:
      if entry.is_dir():
        _scan_images(entry.path, f'{relative}/{entry.name}', found)
      elif entry.name.endswith(IMAGE_SUFFIX):
        found[f'{relative}/{entry.name}'] = entry.stat().st_size


def tree_fingerprint(root: pathlib.Path) -> SourceFingerprint:
  """The fingerprint of an extracted tree: one stat per image, nothing decoded."""
  root = pathlib.Path(root).expanduser()
  wnids = read_wnids(root)
  image_bytes: dict[str, int] = {}
  for split in SPLITS:
    _scan_images(os.fspath(_require(root / split, root)), split, image_bytes)
  return SourceFingerprint(
      path=str(root.resolve()), kind='tree', wnids=wnids, image_bytes=image_bytes,
      val_annotations_crc32=_crc32(_require(root / 'val' / 'val_annotations.txt', root)),
      words_crc32=_crc32(_require(root / 'words.txt', root)))


def zip_fingerprint(path: pathlib.Path) -> SourceFingerprint:
  """The fingerprint of `tiny-imagenet-200.zip`, from its central directory.

  Only wnids.txt is decompressed; the sizes and CRC32s of the other members
  are read from the zip's directory.
  """
  path = pathlib.Path(path).expanduser()
  prefix = f'{TREE_NAME}/'
  try:
    with zipfile.ZipFile(path) as archive:
      members = {info.filename[len(prefix):]: info for info in archive.infolist()
                 if info.filename.startswith(prefix) and not info.is_dir()}
      missing = [m for m in ('wnids.txt', 'words.txt', 'val/val_annotations.txt')
                 if m not in members]
      if missing:
        raise ValueError(f'{path} has no {[prefix + m for m in missing]}: expected the '
                         f'zip of the {TREE_NAME}/ folder in the Tiny ImageNet layout')
      wnids_text = archive.read(members['wnids.txt']).decode()
  except zipfile.BadZipFile as error:
    raise ValueError(f'{path} is not a readable zip: {error}') from error
  images = {name: info for name, info in members.items()
            if name.split('/')[0] in SPLITS and name.endswith(IMAGE_SUFFIX)}
  crcs = json.dumps(sorted((name, info.CRC) for name, info in images.items()))
  return SourceFingerprint(
      path=str(path.resolve()), kind='zip',
      wnids=tuple(sorted(w.strip() for w in wnids_text.splitlines() if w.strip())),
      image_bytes={name: info.file_size for name, info in images.items()},
      val_annotations_crc32=members['val/val_annotations.txt'].CRC,
      words_crc32=members['words.txt'].CRC,
      image_crc32s_digest=hashlib.sha256(crcs.encode()).hexdigest())


# ---------------------------------------------------------------------------
# Where a source is prepared: names that need no tensorflow-datasets.

URL = 'http://cs231n.stanford.edu/tiny-imagenet-200.zip'
ZIP_NAME = 'tiny-imagenet-200.zip'
TREE_NAME = 'tiny-imagenet-200'
# The tfds builder's name and version: a prepared dataset lives in
# <tfds_dir>/<BUILDER_NAME>/<config name>/<VERSION>/.
BUILDER_NAME = 'tiny_imagenet'
VERSION = '1.0.0'
OFFICIAL_CONFIG = 'tiny_imagenet_200'
OFFICIAL_NUM_CLASSES, OFFICIAL_IMAGE_SIZE = 200, 64


# ---------------------------------------------------------------------------
# The official zip: its published size and MD5, and how a source was checked.

# What the course site serves, as the dataset's published loaders check it
# (torchvision-style `md5 = '90528d7c...'`). tfds registers a download's
# SHA-256, which is published nowhere, so the builder checks these itself.
ZIP_SIZE = 248_100_043
ZIP_MD5 = '90528d7ca1a48142e341f4ef8d21d0de'

# How the prepared dataset's source was checked, in its metadata.
SOURCE_CHECK_KEY = 'source_check'
VERIFIED, UNVERIFIED, TREE_SOURCE = 'verified zip', 'unverified zip', 'tree'
_SOURCE_CHECKS = {
    VERIFIED: "the official zip (its size and MD5 verified)",
    UNVERIFIED: ("a zip NOT verified against the official size and MD5 "
                 "(prepared with data.verify_source=False)"),
    TREE_SOURCE: ("an extracted tree (its layout checked; a tree has no published "
                  "digest to verify)"),
}


def describe_source_check(check: str | None) -> str:
  """What a prepared dataset's `SOURCE_CHECK_KEY` says, in words."""
  if check is None:
    return 'a source whose check was not recorded (prepared by an older et_flax)'
  return _SOURCE_CHECKS[check]


def file_md5(path: pathlib.Path) -> str:
  digest = hashlib.md5()
  with pathlib.Path(path).open('rb') as file:
    while chunk := file.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def official_zip_mismatch(path: pathlib.Path, check_md5: bool = True) -> str | None:
  """How `path` differs from the official zip ('found ...'); None: it does not.

  The size first, a stat; the MD5 (half a second for the real zip) only
  when the size matches and `check_md5`.
  """
  size = pathlib.Path(path).stat().st_size
  if size != ZIP_SIZE:
    return f'found {size:,} bytes'
  if check_md5:
    md5 = file_md5(path)
    if md5 != ZIP_MD5:
      return f'found {size:,} bytes with MD5 {md5}'
  return None


def describe_mismatch(path: pathlib.Path, found: str) -> str:
  """The first sentence of a refusal of `path`: expected, found."""
  return (f'{path} is not the official {ZIP_NAME}: expected {ZIP_SIZE:,} bytes with '
          f'MD5 {ZIP_MD5}, {found}')


def check_official_zip(path: pathlib.Path, check_md5: bool = True) -> None:
  """Refuses `path` unless it has the official zip's size (and MD5).

  Raises:
    ValueError: naming the file, what was expected and found, and what to do.
  """
  found = official_zip_mismatch(path, check_md5)
  if found is not None:
    raise ValueError(
        f'{describe_mismatch(path, found)}. Download it again from {URL}; for an '
        'archive repacked on purpose, set --config.data.verify_source=False (the '
        'prepared dataset then records it as unverified)')


def digits_config_name(image_size: int, key: str) -> str:
  """The config under which the digits tree with fingerprint `key` is prepared."""
  return f'digits_{image_size}px_{key}'


def layout_config_name(num_classes: int, image_size: int, key: str) -> str:
  """The config of a tree in the layout with other classes or image sizes."""
  return f'layout_{num_classes}_classes_{image_size}px_{key}'


def stored_image_size(root: pathlib.Path) -> int:
  """The side of the tree's images, read off its first training image."""
  wnid = read_wnids(root)[0]
  folder = _require(root / 'train' / wnid / 'images', root)
  first = next(iter(sorted(folder.glob(f'*{IMAGE_SUFFIX}'))), None)
  if first is None:
    raise ValueError(f'{folder} holds no {IMAGE_SUFFIX} images')
  try:
    with Image.open(first) as image:
      return image.width
  except OSError as error:
    raise ValueError(f'Cannot decode {first}: {error}') from error


def read_image(path: pathlib.Path, image_size: int) -> np.ndarray:
  """Decodes a JPEG to uint8 RGB (grayscale replicated), checking its size."""
  try:
    with Image.open(path) as image:
      array = np.asarray(image.convert('RGB'))
  except OSError as error:
    raise ValueError(f'Cannot decode {path}: {error}') from error
  if array.shape != (image_size, image_size, 3):
    raise ValueError(f'{path} is {array.shape[1]}x{array.shape[0]}, expected '
                     f'{image_size}x{image_size}')
  return array
