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
dataset (`et_flax.digits`) is written in this layout too.
"""

from __future__ import annotations

import dataclasses
import pathlib

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
