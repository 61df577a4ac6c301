"""Measures the input pipeline on a generated tree in the Tiny ImageNet layout.

  python -m et_flax.benchmark pipeline --train_per_class=100 --workdir=/tmp/pipe

Writes a tree of random 64x64 JPEGs (200 classes by default), then times, as
a run would meet them: preparing the tfds dataset (once per machine), decoding
the training split into memory (once per run), and the training batches of
a few epochs (images/s). Random pixels compress worse than photographs, so
decoding real Tiny ImageNet is, if anything, faster. Prints a table and
writes `pipeline_benchmark.json` to the workdir.
"""

import json
import pathlib
import time

from absl import app
from absl import flags

from et_flax.data import fake_data
from et_flax.data import input_pipeline

FLAGS = flags.FLAGS


def main(argv):
  del argv
  workdir = pathlib.Path(FLAGS.workdir)
  root = workdir / 'tiny-imagenet-200'
  if not root.exists():
    fake_data.write_tiny_imagenet_tree(root, fake_data.random_wnids(FLAGS.num_classes),
                                       FLAGS.train_per_class, FLAGS.num_val,
                                       pixels='random')
  data_config = {'name': 'tiny_imagenet', 'data_dir': str(root), 'image_size': 64,
                 'tfds_dir': str(workdir / 'tfds')}
  num_train = FLAGS.num_classes * FLAGS.train_per_class

  start = time.perf_counter()
  info = input_pipeline.get_dataset_info(data_config)
  prepare_seconds = time.perf_counter() - start

  start = time.perf_counter()
  train = input_pipeline.load_split(info, 'train')
  decode_seconds = time.perf_counter() - start

  # What every later run does: the decoded split, memory-mapped from the cache.
  start = time.perf_counter()
  train = input_pipeline.load_split(info, 'train')
  read_seconds = time.perf_counter() - start

  train_input = input_pipeline.TrainInput(train, FLAGS.batch_size, seed=0)
  epoch_rates = []
  for epoch in range(FLAGS.epochs):
    start = time.perf_counter()
    count = sum(batch['image'].shape[0] for batch in train_input.epoch(epoch))
    epoch_rates.append(count / (time.perf_counter() - start))

  results = {
      'train_images': num_train,
      'prepare_seconds': prepare_seconds,
      'prepare_images_per_second': (num_train + FLAGS.num_val + 1) / prepare_seconds,
      'decode_and_cache_seconds': decode_seconds,
      'decode_images_per_second': num_train / decode_seconds,
      'cache_megabytes': train.images.nbytes / 2**20,
      'read_cached_seconds': read_seconds,
      'batch_size': FLAGS.batch_size,
      'epoch_images_per_second': epoch_rates,
  }
  (workdir / 'pipeline_benchmark.json').write_text(json.dumps(results, indent=1))
  print(f'{"stage":<34}{"seconds":>10}{"images/s":>12}')
  print(f'{"prepare tfds (once per machine)":<34}{prepare_seconds:>10.1f}'
        f'{results["prepare_images_per_second"]:>12.0f}')
  print(f'{"decode + cache train (once)":<34}{decode_seconds:>10.1f}'
        f'{results["decode_images_per_second"]:>12.0f}')
  print(f'{"read train from the cache (a run)":<34}{read_seconds:>10.3f}'
        f'{num_train / read_seconds:>12.0f}')
  for epoch, rate in enumerate(epoch_rates):
    print(f'{f"train batches, epoch {epoch}":<34}{num_train / rate:>10.2f}{rate:>12.0f}')


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'Scratch folder for the tree and the tfds data.')
  flags.DEFINE_integer('num_classes', 200, 'Classes in the generated tree.')
  flags.DEFINE_integer('train_per_class', 100,
                       'Training images per class (500 in Tiny ImageNet).')
  flags.DEFINE_integer('num_val', 1000, 'Validation images.')
  flags.DEFINE_integer('batch_size', 128, 'Training batch size.')
  flags.DEFINE_integer('epochs', 3, 'Training epochs to iterate.')
  flags.mark_flag_as_required('workdir')

