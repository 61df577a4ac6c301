"""Fake Tiny ImageNet trees in the official layout, for tests and benchmarks.

Tiny ImageNet cannot be downloaded everywhere (and the tests run offline), so
the loading code is exercised on small trees written here in the layout of
the real `tiny-imagenet-200` folder: `wnids.txt`, `words.txt`,
`train/<wnid>/images/*.JPEG` with `<wnid>_boxes.txt`, `val/images/*.JPEG`
with `val/val_annotations.txt`, and `test/images/*.JPEG`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image


def write_tiny_imagenet_tree(root: str | pathlib.Path, wnids: Sequence[str],
                             train_per_class: int, num_val: int, num_test: int = 1,
                             size: int = 64, pixels: str = 'label', seed: int = 0,
                             extra_synsets: bool = False) -> pathlib.Path:
  """Writes a tree at `root` (which must not exist) and returns it.

  Args:
    wnids: the classes, in the order of wnids.txt (which need not be sorted).
    train_per_class, num_val, num_test: images per class in train/, in val/
      (classes in turn), in test/.
    size: image side.
    pixels: 'label': every image is flat grey 40 + 80 * its label (labels in
      sorted wnid order, as the dataset numbers them), so a test can read the
      label back after decoding, and the first image of the first class is a
      grayscale JPEG; 'random': smooth random colours (JPEG quality 75),
      for timing.
    seed: for 'random' pixels.
    extra_synsets: words.txt also lists synsets that are not classes, as the
      real one does.
  """
  if pixels not in ('label', 'random'):
    raise ValueError(f"pixels must be 'label' or 'random', got {pixels!r}")
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  labels = {w: i for i, w in enumerate(sorted(wnids))}

  def save(path: pathlib.Path, wnid: str | None, grayscale: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixels == 'random':
      small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
      Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR).save(
          path, quality=75)
      return
    value = 40 + 80 * (labels[wnid] if wnid is not None else 0)
    if grayscale:
      Image.fromarray(np.full((size, size), value, np.uint8), 'L').save(path)
    else:
      Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path, quality=95)

  root.mkdir(parents=True)
  (root / 'wnids.txt').write_text(''.join(f'{w}\n' for w in wnids))
  if extra_synsets:
    words = ('n00\tentity\n' + ''.join(f'{w}\tname of {w}, other\n' for w in wnids)
             + 'n99\tsomething else\n')
  else:
    words = ''.join(f'{w}\tclass {w}\n' for w in wnids)
  (root / 'words.txt').write_text(words)
  for c, w in enumerate(wnids):
    for i in range(train_per_class):
      save(root / 'train' / w / 'images' / f'{w}_{i}.JPEG', w,
           grayscale=pixels == 'label' and c == 0 and i == 0)
    (root / 'train' / w / f'{w}_boxes.txt').write_text('')
  lines = []
  for i in range(num_val):
    w = wnids[i % len(wnids)]
    save(root / 'val' / 'images' / f'val_{i}.JPEG', w)
    lines.append(f'val_{i}.JPEG\t{w}\t0\t0\t{size - 1}\t{size - 1}\n')
  (root / 'val' / 'val_annotations.txt').write_text(''.join(lines))
  for i in range(num_test):
    save(root / 'test' / 'images' / f'test_{i}.JPEG', None)
  return root


def random_wnids(num_classes: int, seed: int = 0) -> list[str]:
  """`num_classes` wnid-like names in a shuffled (unsorted) order."""
  return [f'n{i:08d}' for i in np.random.default_rng(seed).permutation(num_classes)]
