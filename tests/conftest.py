"""Shared fixtures: the digits tree, written once per test session."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # noqa: E402

from et_flax import digits  # noqa: E402


def counting_split(n):
  """A split of n 1x1 images whose pixel value and label are their index."""
  import numpy as np

  from et_flax import input_pipeline

  return input_pipeline.Split(
      images=np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(3, -1),
      labels=np.arange(n, dtype=np.int32), file_names=tuple(map(str, range(n))))


def tiny_config(data_dir, **overrides):
  """The quickstart config shrunk for tests: 8x8 digits, one module, batch 64."""
  from configs import quickstart

  config = quickstart.get_config()
  config.data.data_dir = str(data_dir)
  config.data.image_size = 8
  config.model.num_modules = 1
  config.batch_size = 64
  config.num_epochs = 1
  config.update(overrides)
  return config


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory):
  """A data dir holding the digits at 8x8 (the size tests train at)."""
  data_dir = tmp_path_factory.mktemp('data')
  digits.write_digits_tree(data_dir, 8)
  return data_dir


def make_tiny_imagenet_tree(root, wnids=('n02', 'n01', 'n03'), train_per_class=4,
                            num_val=5, num_test=3, size=64):
  """A small tree in the official Tiny ImageNet layout.

  wnids.txt is unsorted, words.txt lists extra synsets, the first training
  image of the first class is a grayscale JPEG, and every image's pixels
  encode its class (so tests can check labels after decoding).
  """
  import numpy as np
  from PIL import Image

  def save(path, label, grayscale=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    value = 40 + 80 * label
    if grayscale:
      Image.fromarray(np.full((size, size), value, np.uint8), 'L').save(path)
    else:
      Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path, quality=95)

  root.mkdir(parents=True)
  (root / 'wnids.txt').write_text(''.join(f'{w}\n' for w in wnids))
  (root / 'words.txt').write_text(
      'n00\tentity\n' + ''.join(f'{w}\tname of {w}, other\n' for w in wnids)
      + 'n99\tsomething else\n')
  labels = {w: i for i, w in enumerate(sorted(wnids))}
  for c, w in enumerate(wnids):
    for i in range(train_per_class):
      save(root / 'train' / w / 'images' / f'{w}_{i}.JPEG', labels[w],
           grayscale=(c == 0 and i == 0))
    (root / 'train' / w / f'{w}_boxes.txt').write_text('')
  lines = []
  for i in range(num_val):
    w = wnids[i % len(wnids)]
    save(root / 'val' / 'images' / f'val_{i}.JPEG', labels[w])
    lines.append(f'val_{i}.JPEG\t{w}\t0\t0\t{size - 1}\t{size - 1}\n')
  (root / 'val' / 'val_annotations.txt').write_text(''.join(lines))
  for i in range(num_test):
    save(root / 'test' / 'images' / f'test_{i}.JPEG', 0)
  return root
