"""The embedded default dataset: scikit-learn's handwritten digits.

`sklearn.datasets.load_digits` ships 1,797 real 8x8 grayscale images of the
digits 0-9 inside scikit-learn, so a fresh machine can train offline. They are
written to disk in the Tiny ImageNet layout (see `tiny_imagenet_layout`), so
that exactly the loader used for Tiny ImageNet reads them:

  digits_<size>px/
    wnids.txt, words.txt
    train/digit_<d>/images/digit_<d>_<i>.JPEG, train/digit_<d>/digit_<d>_boxes.txt
    val/images/val_<i>.JPEG, val/val_annotations.txt
    test/images/test_<i>.JPEG  (unlabeled, like Tiny ImageNet's test split)

The split is stratified and fixed (scikit-learn's `train_test_split` with
`random_state=0`): 10% test, 15% val, the rest train. Images are scaled from
0-16 to 0-255, resized bilinearly to `image_size`, replicated to RGB and saved
as JPEG of quality 95.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np
from absl import logging
from PIL import Image
from sklearn import datasets as sk_datasets
from sklearn import model_selection

from et_flax import console
from et_flax.data import filelock

DIGIT_NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven',
               'eight', 'nine')
TEST_FRACTION = 0.10
VAL_FRACTION = 0.15
SPLIT_SEED = 0
JPEG_QUALITY = 95
_MARKER = 'et_flax_digits.json'
_TMP_PREFIX = '.digits_tmp_'


def wnid(digit: int) -> str:
  return f'digit_{digit}'


def split_indices() -> dict[str, np.ndarray]:
  """Indices into `load_digits()` of the train, val and test splits."""
  labels = sk_datasets.load_digits().target
  indices = np.arange(len(labels))
  rest, test = model_selection.train_test_split(
      indices, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED)
  train, val = model_selection.train_test_split(
      rest, test_size=VAL_FRACTION / (1 - TEST_FRACTION), stratify=labels[rest],
      random_state=SPLIT_SEED)
  return {'train': np.sort(train), 'val': np.sort(val), 'test': np.sort(test)}


def _to_rgb(image_8x8: np.ndarray, image_size: int) -> Image.Image:
  gray = Image.fromarray(np.round(image_8x8 * (255 / 16)).astype(np.uint8), 'L')
  if image_size != gray.width:
    gray = gray.resize((image_size, image_size), Image.Resampling.BILINEAR)
  return gray.convert('RGB')


def write_digits_tree(data_dir: str | os.PathLike, image_size: int) -> pathlib.Path:
  """Writes the digits in the Tiny ImageNet layout, once, and returns the root.

  An existing complete tree for the same size is reused. The tree is built in
  a temporary folder and moved into place, so an interrupted write never
  leaves a half-written tree behind. Processes that find the tree missing at
  once (the hosts of a run, two runs) write it in turn under the lock
  `<data_dir>/.digits_<size>px.lock`: the first writes it, the others reuse it.
  """
  if not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f'data.image_size must be a positive integer, got {image_size!r}')
  data_dir = pathlib.Path(data_dir).expanduser()
  root = data_dir / f'digits_{image_size}px'
  marker = {'image_size': image_size, 'split_seed': SPLIT_SEED,
            'test_fraction': TEST_FRACTION, 'val_fraction': VAL_FRACTION,
            'jpeg_quality': JPEG_QUALITY}
  # A complete tree needs no lock (its folder may be read-only).
  if (root / _MARKER).exists():
    return _checked_tree(root, marker)
  with filelock.exclusive(data_dir / f'.{root.name}.lock', f'the digits tree {root}'):
    if (root / _MARKER).exists():  # written by another process while we waited
      return _checked_tree(root, marker)
    if root.exists():
      raise FileExistsError(f'{root} exists but is not a complete digits tree (no '
                            f'{_MARKER}); remove it or choose another data.data_dir')
    # Under the lock no other process writes this size: a temporary folder of
    # it is left over by a killed writer.
    for stale in data_dir.glob(f'{_TMP_PREFIX}{image_size}px_*'):
      logging.info('Removing %s, left over by an interrupted write of the digits', stale)
      shutil.rmtree(stale)
    console.info('Writing the digits at %dpx to %s (once)', image_size, root)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'{_TMP_PREFIX}{image_size}px_',
                                        dir=data_dir))
    try:
      _write_tree(tmp, image_size)
      (tmp / _MARKER).write_text(json.dumps(marker, indent=1))
      os.replace(tmp, root)
    finally:
      if tmp.exists():
        shutil.rmtree(tmp)
  return root


def _checked_tree(root: pathlib.Path, marker: dict[str, Any]) -> pathlib.Path:
  found = json.loads((root / _MARKER).read_text())
  if found != marker:
    raise ValueError(f'{root} holds digits written with {found}, expected '
                     f'{marker}; remove it to rewrite it')
  return root


def _write_tree(tmp: pathlib.Path, image_size: int) -> None:
  """Writes the digits tree (all but its marker) into the folder `tmp`."""
  digits = sk_datasets.load_digits()
  splits = split_indices()
  wnids = [wnid(d) for d in range(10)]
  (tmp / 'wnids.txt').write_text(''.join(f'{w}\n' for w in wnids))
  (tmp / 'words.txt').write_text(''.join(
      f'{wnid(d)}\t{DIGIT_NAMES[d]}, digit {d}\n' for d in range(10)))
  box = f'0\t0\t{image_size - 1}\t{image_size - 1}'

  per_class: dict[int, list[str]] = {d: [] for d in range(10)}
  for index in splits['train']:
    digit = int(digits.target[index])
    name = f'{wnid(digit)}_{len(per_class[digit])}.JPEG'
    folder = tmp / 'train' / wnid(digit) / 'images'
    folder.mkdir(parents=True, exist_ok=True)
    _to_rgb(digits.images[index], image_size).save(
        folder / name, 'JPEG', quality=JPEG_QUALITY)
    per_class[digit].append(name)
  for digit, names in per_class.items():
    (tmp / 'train' / wnid(digit) / f'{wnid(digit)}_boxes.txt').write_text(
        ''.join(f'{n}\t{box}\n' for n in names))

  for split in ('val', 'test'):
    folder = tmp / split / 'images'
    folder.mkdir(parents=True)
    lines = []
    for i, index in enumerate(splits[split]):
      name = f'{split}_{i}.JPEG'
      _to_rgb(digits.images[index], image_size).save(
          folder / name, 'JPEG', quality=JPEG_QUALITY)
      lines.append(f'{name}\t{wnid(int(digits.target[index]))}\t{box}\n')
    if split == 'val':
      (tmp / 'val' / 'val_annotations.txt').write_text(''.join(lines))
