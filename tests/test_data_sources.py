"""Preparing data once per source: fingerprints, the lock, refusals."""

import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest

from helpers import make_tiny_imagenet_tree
from helpers import tiny_config
from et_flax import console
from et_flax import train
from et_flax.data import digits
from et_flax.data import filelock
from et_flax.data import input_pipeline
from et_flax.data import tiny_imagenet
from et_flax.data import tiny_imagenet_builder

REPO = pathlib.Path(__file__).resolve().parent.parent
WNIDS_A = ('n02', 'n01', 'n03')
WNIDS_B = ('n05', 'n04', 'n06')


def _config(tmp_path, root, **overrides):
  return {'name': 'tiny_imagenet', 'data_dir': str(root), 'image_size': 8,
          'tfds_dir': str(tmp_path / 'tfds'), **overrides}


def _tree(path, wnids, train_per_class=4):
  return make_tiny_imagenet_tree(path, wnids=wnids, train_per_class=train_per_class, size=8)


def _check_images(split, wnids, count):
  """The split holds `count` images of `wnids`, each image's pixels its label."""
  assert len(split) == count
  assert all(name.split('_')[0] in wnids for name in split.file_names)
  np.testing.assert_allclose(split.images.mean(axis=(1, 2, 3)), 40 + 80 * split.labels,
                             atol=2)


def test_two_trees_in_one_tfds_dir_each_give_their_own_data(tmp_path):
  tree_a = _tree(tmp_path / 'a', WNIDS_A, train_per_class=4)
  tree_b = _tree(tmp_path / 'b', WNIDS_B, train_per_class=5)
  for root, wnids, count in ((tree_a, WNIDS_A, 12), (tree_b, WNIDS_B, 15)):
    info = input_pipeline.get_dataset_info(_config(tmp_path, root))
    assert info.wnids == tuple(sorted(wnids))
    assert re.fullmatch(r'layout_3_classes_8px_[0-9a-f]{8}',
                        info.config_name)
    _check_images(input_pipeline.load_split(info, 'train'), wnids, count)

    config = tiny_config(root, batch_size=4, num_epochs=1)
    config.data.name = 'tiny_imagenet'
    config.data.tfds_dir = str(tmp_path / 'tfds')
    workdir = tmp_path / f'run_{root.name}'
    train.train_and_evaluate(config, str(workdir))
    assert json.loads((workdir / 'classes.json').read_text())['wnids'] == sorted(wnids)
  assert len(list((tmp_path / 'tfds' / 'tiny_imagenet').glob('layout_*/1.0.0'))) == 2


def test_a_changed_tree_is_prepared_anew(tmp_path, caplog):
  root = _tree(tmp_path / 'a', WNIDS_A)
  before = input_pipeline.get_dataset_info(_config(tmp_path, root))
  assert len(input_pipeline.load_split(before, 'train')) == 12
  (root / 'train' / 'n02' / 'images' / 'n02_3.JPEG').unlink()
  with caplog.at_level(logging.INFO):
    after = input_pipeline.get_dataset_info(_config(tmp_path, root))
  assert after.data_dir != before.data_dir
  assert f'{root} changed since it was prepared in {before.data_dir}' in caplog.text
  train_split = input_pipeline.load_split(after, 'train')
  _check_images(train_split, WNIDS_A, 11)
  assert 'n02_3.JPEG' not in train_split.file_names
  # The tree as it is now is reused, not prepared again.
  caplog.clear()
  with caplog.at_level(logging.INFO):
    again = input_pipeline.get_dataset_info(_config(tmp_path, root))
  assert again.data_dir == after.data_dir
  assert 'Preparing' not in caplog.text and 'changed since' not in caplog.text


@pytest.fixture
def official_is_3_classes_8px(monkeypatch):
  """Makes a 3-class 8px tree count as the official layout."""
  official = tiny_imagenet_builder.TinyImagenet.BUILDER_CONFIGS[0]
  monkeypatch.setattr(official, 'num_classes', 3)
  monkeypatch.setattr(official, 'image_size', 8)
  monkeypatch.setattr(tiny_imagenet, 'OFFICIAL_NUM_CLASSES', 3)
  monkeypatch.setattr(tiny_imagenet, 'OFFICIAL_IMAGE_SIZE', 8)
  return official


def test_official_layout_from_another_source_is_refused(tmp_path, official_is_3_classes_8px):
  tree_a = _tree(tmp_path / 'a', WNIDS_A)
  tree_b = _tree(tmp_path / 'b', WNIDS_B)
  info = input_pipeline.get_dataset_info(_config(tmp_path, tree_a))
  prepared = pathlib.Path(info.data_dir)
  assert prepared.parent.name == 'tiny_imagenet_200'
  files = sorted(prepared.iterdir())

  with pytest.raises(ValueError) as refusal:
    input_pipeline.get_dataset_info(_config(tmp_path, tree_b))
  message = str(refusal.value)
  assert f'{prepared} holds tiny_imagenet/tiny_imagenet_200 prepared from another ' \
         f'source ({tree_a})' in message
  assert "wnids: 3 added (first ['n04', 'n05', 'n06']), 3 removed" in message
  assert f'Remove {prepared} to prepare it from data.data_dir, or set data.tfds_dir' \
         in message
  assert sorted(prepared.iterdir()) == files  # nothing prepared is removed

  (tree_a / 'train' / 'n01' / 'images' / 'n01_2.JPEG').unlink()
  with pytest.raises(ValueError, match=r'image files: 0 added, 1 removed, 0 resized '
                                       r'\(first: train/n01/images/n01_2.JPEG\)'):
    input_pipeline.get_dataset_info(_config(tmp_path, tree_a))

  # No source given: the prepared dataset is used as it is.
  info = input_pipeline.get_dataset_info(_config(tmp_path, ''))
  assert info.wnids == ('n01', 'n02', 'n03')
  assert len(input_pipeline.load_split(info, 'train')) == 12

  # Another tfds_dir prepares tree B there.
  other = _config(tmp_path, tree_b, tfds_dir=str(tmp_path / 'tfds_b'))
  assert input_pipeline.get_dataset_info(other).wnids == ('n04', 'n05', 'n06')


def _prepared_as_by_an_older_et_flax(tmp_path, tree):
  """Prepares `tree` and drops its stored fingerprint, as an older et_flax
  kept none; returns the prepared folder."""
  prepared = pathlib.Path(input_pipeline.get_dataset_info(_config(tmp_path, tree)).data_dir)
  metadata = prepared / 'metadata.json'
  stored = json.loads(metadata.read_text())
  del stored[tiny_imagenet.FINGERPRINT_KEY]
  metadata.write_text(json.dumps(stored))
  return prepared


def test_official_layout_without_a_stored_fingerprint(tmp_path, official_is_3_classes_8px,
                                                      caplog):
  """Prepared by an older et_flax: its wnids and split sizes are checked."""
  tree_a = _tree(tmp_path / 'a', WNIDS_A)
  _prepared_as_by_an_older_et_flax(tmp_path, tree_a)

  with caplog.at_level(logging.WARNING):
    info = input_pipeline.get_dataset_info(_config(tmp_path, tree_a))
  assert info.wnids == ('n01', 'n02', 'n03')
  assert 'prepared by an older et_flax' in caplog.text
  with pytest.raises(ValueError, match=r'prepared from another source \(unknown: '
                                       r'prepared by an older et_flax\).*wnids'):
    input_pipeline.get_dataset_info(_config(tmp_path, _tree(tmp_path / 'b', WNIDS_B)))
  with pytest.raises(ValueError, match=r"split sizes: \{'train': 12, 'val': 5, "
                                       r"'test': 3\} prepared, \{'train': 15"):
    input_pipeline.get_dataset_info(_config(tmp_path, _tree(tmp_path / 'c', WNIDS_A, 5)))


def test_a_dataset_prepared_by_an_older_et_flax_is_decoded_once(
    tmp_path, official_is_3_classes_8px, monkeypatch):
  """Without a stored fingerprint, a split is still cached: a later run reads
  it without TensorFlow, keyed by what tfds recorded of the prepared data."""
  tree_a = _tree(tmp_path / 'a', WNIDS_A)
  prepared = _prepared_as_by_an_older_et_flax(tmp_path, tree_a)

  info = input_pipeline.get_dataset_info(_config(tmp_path, tree_a))
  decoded = input_pipeline.load_split(info, 'val')
  assert (input_pipeline.DecodedCache(info, 'val', None).path / 'meta.json').is_file()
  assert re.fullmatch(r'older_[0-9a-f]{8}', info.source_key)

  def no_tensorflow(purpose, module='tensorflow'):
    raise AssertionError(f'{module} imported for {purpose}')
  monkeypatch.setattr(console, 'import_tensorflow', no_tensorflow)
  for data_dir in (tree_a, ''):  # checked again, or used as it is
    again = input_pipeline.get_dataset_info(_config(tmp_path, data_dir))
    assert again.source_key == info.source_key
    cached = input_pipeline.load_split(again, 'val')
    assert isinstance(cached.images, np.memmap)
    np.testing.assert_array_equal(cached.images, decoded.images)

  # Another dataset prepared in that folder records other bytes: another key.
  dataset_info = prepared / 'dataset_info.json'
  recorded = json.loads(dataset_info.read_text())
  recorded['splits'][0]['numBytes'] = str(int(recorded['splits'][0]['numBytes']) + 1)
  dataset_info.write_text(json.dumps(recorded))
  other = input_pipeline.get_dataset_info(_config(tmp_path, tree_a))
  assert other.source_key != info.source_key


def _zip(tree, path, order=None):
  """Zips `tree` as tiny-imagenet-200/ (members in `order`'s order, if given)."""
  files = sorted(p for p in tree.rglob('*') if p.is_file())
  path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as archive:
    for file in (order(files) if order else files):
      archive.write(file, f'{tiny_imagenet.TREE_NAME}/{file.relative_to(tree)}')
  return path


def test_zip_fingerprint_follows_the_members(tmp_path):
  tree = _tree(tmp_path / 'tree', WNIDS_A)
  zip_name = tiny_imagenet.ZIP_NAME
  first = tiny_imagenet.zip_fingerprint(_zip(tree, tmp_path / 'one' / zip_name))
  same = tiny_imagenet.zip_fingerprint(_zip(tree, tmp_path / 'two' / zip_name,
                                            order=lambda files: files[::-1]))
  assert first.key == same.key
  assert not first.differences(same)
  assert first.wnids == ('n01', 'n02', 'n03')
  assert first.split_sizes() == {'train': 12, 'val': 5, 'test': 3}
  # The zip and the tree it holds agree on everything they both record.
  assert not first.differences(tiny_imagenet.tree_fingerprint(tree))

  # One image's bytes change, its size does not: the zip's CRC32 tells.
  image = tree / 'val' / 'images' / 'val_1.JPEG'
  data = bytearray(image.read_bytes())
  data[-3] ^= 0xFF
  image.write_bytes(bytes(data))
  changed = tiny_imagenet.zip_fingerprint(_zip(tree, tmp_path / 'three' / zip_name))
  assert changed.key != first.key
  assert first.differences(changed) == [
      "the images' contents differ (their CRC32s in the zip)"]
  # A member added.
  shutil.copy(image, tree / 'test' / 'images' / 'test_9.JPEG')
  added = tiny_imagenet.zip_fingerprint(_zip(tree, tmp_path / 'four' / zip_name))
  assert changed.differences(added) == [
      'image files: 1 added, 0 removed, 0 resized (first: test/images/test_9.JPEG)']

  not_a_zip = tmp_path / 'five' / zip_name
  not_a_zip.parent.mkdir()
  not_a_zip.write_text('no zip')
  with pytest.raises(ValueError, match='five/tiny-imagenet-200.zip is not a readable zip'):
    tiny_imagenet.zip_fingerprint(not_a_zip)


def test_official_layout_from_the_zip_then_its_tree(tmp_path, official_is_3_classes_8px):
  tree = _tree(tmp_path / 'src' / 'tiny-imagenet-200', WNIDS_A)
  downloads = tmp_path / 'downloads'
  # Zips of test trees: not the official zip's digest (tests/test_source_digest.py).
  _zip(tree, downloads / tiny_imagenet.ZIP_NAME)
  info = input_pipeline.get_dataset_info(_config(tmp_path, downloads, verify_source=False))
  _check_images(input_pipeline.load_split(info, 'train'), WNIDS_A, 12)
  # The extracted tree with the same content is the same source.
  assert input_pipeline.get_dataset_info(_config(tmp_path, tree)).wnids == info.wnids
  other = _tree(tmp_path / 'other', WNIDS_B)
  _zip(other, downloads / tiny_imagenet.ZIP_NAME)
  with pytest.raises(ValueError, match=f'prepared from another source '
                                       f'.{re.escape(str(downloads))}'):
    input_pipeline.get_dataset_info(_config(tmp_path, downloads, verify_source=False))
  # Removed as the refusal says, it is prepared from the new zip, not from
  # tfds's cached extraction of the first (named after the zip's file name).
  shutil.rmtree(info.data_dir)
  info = input_pipeline.get_dataset_info(_config(tmp_path, downloads, verify_source=False))
  assert info.wnids == ('n04', 'n05', 'n06')
  _check_images(input_pipeline.load_split(info, 'train'), WNIDS_B, 12)


_RACER = '''
import json, pathlib, sys, time
from absl import logging
logging.set_verbosity(logging.INFO)
from et_flax.data import input_pipeline
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
ready.touch()
deadline = time.monotonic() + 120
while not go.exists():
  if time.monotonic() > deadline:
    sys.exit('timed out waiting for ' + str(go))
  time.sleep(0.005)
for config in json.loads(sys.argv[3]):
  info = input_pipeline.get_dataset_info(config)
  print('WNIDS', json.dumps(list(info.wnids)), len(input_pipeline.load_split(info, 'val')))
'''


@pytest.mark.slow
def test_two_processes_prepare_the_data_once(tmp_path):
  root = _tree(tmp_path / 'tree', WNIDS_A)
  configs = [{'name': 'digits', 'data_dir': str(tmp_path / 'data'), 'image_size': 8},
             _config(tmp_path, root)]
  go = tmp_path / 'go'
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}
  processes = []
  try:
    for i in range(2):
      processes.append(subprocess.Popen(
          [sys.executable, '-c', _RACER, str(tmp_path / f'ready{i}'), str(go),
           json.dumps(configs)],
          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 120
    while not all((tmp_path / f'ready{i}').exists() for i in range(2)):
      assert time.monotonic() < deadline, 'the processes did not start in 120 s'
      assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
      time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=300) for p in processes]
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait(timeout=30)
  for process, (stdout, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]
    # tfds prints its own lines to stdout too.
    assert [line for line in stdout.splitlines() if line.startswith('WNIDS')] == [
        'WNIDS ' + json.dumps([digits.wnid(d) for d in range(10)]) + ' 270',
        'WNIDS ["n01", "n02", "n03"] 5']
  logs = ''.join(stderr for _, stderr in outputs)
  assert logs.count('Writing the digits at 8px') == 1
  assert len(re.findall(r'Preparing tiny_imagenet/digits_8px_[0-9a-f]{8} ', logs)) == 1
  assert len(re.findall(r'Preparing tiny_imagenet/layout_3_classes_8px_[0-9a-f]{8} ',
                        logs)) == 1


def test_stale_folders_of_a_killed_preparer_do_not_break_the_next(tmp_path, caplog):
  data_dir = tmp_path / 'data'
  stale_tree = data_dir / '.digits_tmp_8px_k1ll3d'
  (stale_tree / 'train').mkdir(parents=True)
  (stale_tree / 'wnids.txt').write_text('digit_0\n')
  other_size = data_dir / '.digits_tmp_16px_busy'  # another size's writer: left alone
  other_size.mkdir()
  with caplog.at_level(logging.INFO):
    root = digits.write_digits_tree(data_dir, 8)
  assert not stale_tree.exists() and other_size.exists()
  assert f'Removing {stale_tree}' in caplog.text

  key = tiny_imagenet.tree_fingerprint(root).key
  config_dir = data_dir / 'tfds' / 'tiny_imagenet' / f'digits_8px_{key}'
  stale_prepare = config_dir / 'incomplete.K1LL3D_1.0.0'
  stale_prepare.mkdir(parents=True)
  (stale_prepare / 'tiny_imagenet-train.tfrecord-00000-of-00001').write_bytes(b'cut')
  (stale_prepare / 'dataset_info.json').write_text('{"half": ')
  info = input_pipeline.get_dataset_info(
      {'name': 'digits', 'data_dir': str(data_dir), 'image_size': 8})
  assert info.data_dir == str(config_dir / '1.0.0')
  assert len(input_pipeline.load_split(info, 'val')) == 270
  assert not stale_prepare.exists()


def test_lock_waits_for_its_holder_and_says_so(tmp_path, caplog):
  path = tmp_path / 'deep' / 'x.lock'
  events = []

  def second():
    with filelock.exclusive(path, 'the thing'):
      events.append('second')

  with caplog.at_level(logging.INFO):
    with filelock.exclusive(path, 'the thing'):
      thread = threading.Thread(target=second)
      thread.start()
      deadline = time.monotonic() + 30
      while 'Waiting for another process' not in caplog.text:
        assert time.monotonic() < deadline, 'the second holder never waited'
        time.sleep(0.01)
      events.append('first')
    thread.join(timeout=30)
  assert not thread.is_alive()
  assert events == ['first', 'second']
  assert f'finish preparing the thing (lock {path})' in caplog.text


def test_lock_file_that_cannot_be_created_is_named(tmp_path):
  # A regular file where the folder should be fails for root too (a
  # read-only folder does not stop root).
  (tmp_path / 'file').write_text('')
  lock = re.escape(str(tmp_path / 'file' / '.digits_8px.lock'))
  with pytest.raises(OSError, match=f'Cannot create the lock file {lock} that guards'):
    digits.write_digits_tree(tmp_path / 'file', 8)
  if os.geteuid() != 0:
    read_only = tmp_path / 'read_only'
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
      with pytest.raises(OSError, match='Cannot create the lock file .*read_only'):
        digits.write_digits_tree(read_only, 8)
    finally:
      read_only.chmod(0o700)
  # A complete tree in a read-only place needs no lock.
  digits.write_digits_tree(tmp_path / 'ok', 4)
  (tmp_path / 'ok' / '.digits_4px.lock').unlink()
  shutil.move(tmp_path / 'ok', tmp_path / 'moved')
  assert digits.write_digits_tree(tmp_path / 'moved', 4).name == 'digits_4px'
  assert not (tmp_path / 'moved' / '.digits_4px.lock').exists()
