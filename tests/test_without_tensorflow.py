"""TensorFlow where tf.data runs, and nowhere else.

A run whose splits are decoded and cached trains, evaluates, predicts and
times its steps in a process where TensorFlow, tensorflow-datasets and Keras
cannot be imported (tests/without_tensorflow.py), as on the GPU machine; where
TensorFlow is needed and missing, one line says so.
"""

import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from et_flax.data import input_pipeline
from tests.helpers import tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUNNER = ROOT / 'tests' / 'without_tensorflow.py'

DRIVER = textwrap.dedent('''
    import json, pathlib, sys
    from et_flax import evaluate, predict, train
    from et_flax.benchmark import steps
    from tests.helpers import tiny_config

    data_dir, workdir, out = sys.argv[1:]
    summary = train.train_and_evaluate(tiny_config(data_dir, num_epochs=2), workdir)
    report = evaluate.evaluate_run(workdir, figures=False)
    lines = predict.write_submission(workdir, out, split='val')
    timing = steps.run(tiny_config(data_dir), 64, 8, 1, 1, False, 0, 0, 1)
    json.dump({'summary': summary, 'top1': report['top1_accuracy'], 'lines': lines,
               'step_seconds': timing['train_step_seconds'],
               'tensorflow': sorted(m for m in sys.modules
                                    if m.split('.')[0] in ('tensorflow', 'keras',
                                                           'tensorflow_datasets'))},
              open(pathlib.Path(workdir) / 'driver.json', 'w'))
''')


def _without_tensorflow(*args, cwd=ROOT, timeout=300):
  return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], cwd=cwd,
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.mark.slow
def test_a_cached_run_trains_evaluates_and_predicts_without_tensorflow(
    digits_data_dir, two_epoch_run, tmp_path):
  # Two epochs of tiny_config, as the driver trains; it decoded (and cached) the splits.
  reference = two_epoch_run.summary
  driver = tmp_path / 'driver.py'
  driver.write_text(DRIVER)
  workdir = tmp_path / 'cached'
  result = _without_tensorflow(driver, digits_data_dir, workdir, tmp_path / 'val.csv')
  assert result.returncode == 0, result.stderr[-5000:]
  found = json.loads((workdir / 'driver.json').read_text())
  assert found['tensorflow'] == []
  assert 'Decoding' not in result.stderr  # read from the cache
  # The same batches and maths as the run that decoded them: the same epochs.
  timing = ('epoch_seconds', 'train_images_per_second', 'input_wait_fraction')
  assert ({k: v for k, v in found['summary'].items() if k not in timing}
          == {k: v for k, v in reference.items() if k not in timing})
  # float64 counts against the run's float32 mean: one image is 1/270.
  assert found['top1'] == pytest.approx(reference['val_top1_accuracy'], abs=1e-6)
  assert found['lines'] == 270  # a line per val image
  assert found['step_seconds'] > 0


def test_without_tensorflow_an_unprepared_dataset_is_one_line(tmp_path):
  result = _without_tensorflow(
      'et_flax.main', '--config=configs/quickstart.py', f'--workdir={tmp_path / "w"}',
      f'--config.data.data_dir={tmp_path / "data"}', '--config.data.image_size=8',
      timeout=120)
  assert result.returncode == 1, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert 'Traceback' not in result.stderr
  assert len(errors) == 1 and errors[0].startswith(
      'error: TensorFlow is not installed, and preparing digits in '), result.stderr
  assert "pip install -e '.[tf]'" in errors[0]
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_the_decoded_cache_is_keyed_by_classes_size_and_share(digits_data_dir, tmp_path):
  config = tiny_config(digits_data_dir).data
  info = input_pipeline.get_dataset_info(config)
  whole = input_pipeline.load_split(info, 'train')
  again = input_pipeline.load_split(info, 'train')
  assert isinstance(again.images, np.memmap)  # read back, memory-mapped
  np.testing.assert_array_equal(whole.images, again.images)
  np.testing.assert_array_equal(whole.labels, again.labels)
  assert whole.file_names == again.file_names

  share = input_pipeline.train_share(64, 0, slice(0, 32))
  half = input_pipeline.load_split(info, 'train', share)
  half_again = input_pipeline.load_split(info, 'train', share)
  np.testing.assert_array_equal(half.indices, half_again.indices)
  np.testing.assert_array_equal(half.images, whole.images[half.indices])
  assert half.split_size == half_again.split_size == len(whole)

  config.classes = 3
  three = input_pipeline.load_split(input_pipeline.get_dataset_info(config), 'train')
  assert set(np.unique(three.labels)) == {0, 1, 2}
  config.classes, config.image_size = 0, 4
  small = input_pipeline.load_split(input_pipeline.get_dataset_info(config), 'train')
  assert small.images.shape[1:] == (4, 4, 3)

  keys = {input_pipeline.DecodedCache(info, 'train', s).path
          for s in (None, share, input_pipeline.train_share(64, 1, slice(0, 32)))}
  assert len(keys) == 3


def test_a_damaged_or_unwritable_cache_is_decoded_again(digits_data_dir, tmp_path, caplog):
  config = tiny_config(digits_data_dir).data
  config.classes = 4  # an entry of this test's own
  info = input_pipeline.get_dataset_info(config)
  whole = input_pipeline.load_split(info, 'val')
  entry = input_pipeline.DecodedCache(info, 'val', None).path
  (entry / 'images.npy').write_bytes(b'')  # as a crash before the data reached the disk
  with caplog.at_level(logging.WARNING):
    again = input_pipeline.load_split(info, 'val')
  assert f'the decoded split in {entry} is damaged' in caplog.text
  np.testing.assert_array_equal(again.images, whole.images)
  assert isinstance(input_pipeline.load_split(info, 'val').images, np.memmap)  # cached anew

  # A prepared dataset in a folder this process cannot write: a warning, no cache.
  cache = input_pipeline.DecodedCache(info, 'val', input_pipeline.eval_share(64, slice(0, 32)))
  blocked = tmp_path / 'read-only'
  blocked.write_text('a file where the cache folder would go')
  cache.path = blocked / 'entry'
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    cache.write(whole)
  assert f'cannot cache the decoded split in {blocked}' in caplog.text
  assert cache.read() is None
