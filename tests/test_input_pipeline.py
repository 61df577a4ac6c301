"""The digits tree, the Tiny ImageNet layout reader and the batches."""

import json
import shutil
import threading
import time
import urllib.request

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets

from helpers import counting_split
from helpers import make_tiny_imagenet_tree
from et_flax.data import digits
from et_flax.data import input_pipeline


def _digits_info(data_dir, size=8):
  return input_pipeline.get_dataset_info(
      {'name': 'digits', 'data_dir': str(data_dir), 'image_size': size})


def test_digits_split_is_stratified_disjoint_and_complete():
  splits = digits.split_indices()
  all_indices = np.concatenate(list(splits.values()))
  assert sorted(all_indices) == list(range(1797))
  assert [len(splits[s]) for s in ('train', 'val', 'test')] == [1347, 270, 180]
  target = sk_datasets.load_digits().target
  for split in splits.values():
    counts = np.bincount(target[split], minlength=10)
    assert counts.min() >= 0.8 * counts.mean()
  np.testing.assert_array_equal(splits['val'], digits.split_indices()['val'])


def test_digits_tree_in_tiny_imagenet_layout(digits_data_dir):
  info = _digits_info(digits_data_dir)
  assert info.wnids == tuple(f'digit_{d}' for d in range(10))
  assert info.class_names[3] == 'three, digit 3'
  root = digits_data_dir / 'digits_8px'
  assert len(list((root / 'train' / 'digit_0' / 'images').glob('*.JPEG'))) > 100
  assert (root / 'train' / 'digit_0' / 'digit_0_boxes.txt').exists()
  assert len((root / 'val' / 'val_annotations.txt').read_text().splitlines()) == 270
  assert len(list((root / 'test' / 'images').glob('test_*.JPEG'))) == 180


def test_digits_decode_to_the_sklearn_images(digits_data_dir):
  info = _digits_info(digits_data_dir)
  val = input_pipeline.load_split(info, 'val')
  sk_digits = sk_datasets.load_digits()
  val_indices = digits.split_indices()['val']
  # Files are listed by name (val_0, val_1, val_10, ...): map back by number.
  order = [val_indices[int(name[len('val_'):-len('.JPEG')])] for name in val.file_names]
  np.testing.assert_array_equal(val.labels, sk_digits.target[order])
  expected = sk_digits.images[order] * (255 / 16)
  assert val.images.shape == (270, 8, 8, 3) and val.images.dtype == np.uint8
  np.testing.assert_array_equal(val.images[..., 0], val.images[..., 2])
  # JPEG at quality 95 moves a pixel by a few levels on average.
  assert np.abs(val.images[..., 0] - expected).mean() < 4.0


def test_digits_tree_is_reused_not_rewritten(tmp_path):
  root = digits.write_digits_tree(tmp_path, 4)
  marker = root / 'et_flax_digits.json'
  stamp = marker.stat().st_mtime_ns
  assert digits.write_digits_tree(tmp_path, 4) == root
  assert marker.stat().st_mtime_ns == stamp
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.digits_tmp')]


def test_digits_refuses_an_incomplete_tree(tmp_path):
  (tmp_path / 'digits_4px').mkdir()
  (tmp_path / 'digits_4px' / 'keep.txt').write_text('user data')
  with pytest.raises(FileExistsError, match='not a complete digits tree'):
    digits.write_digits_tree(tmp_path, 4)
  assert (tmp_path / 'digits_4px' / 'keep.txt').read_text() == 'user data'


def _tiny_config(tmp_path, root, **overrides):
  return {'name': 'tiny_imagenet', 'data_dir': str(root), 'image_size': 64,
          'tfds_dir': str(tmp_path / 'tfds'), **overrides}


def test_tiny_imagenet_tree_reads_labels_names_and_grayscale(tmp_path):
  root = make_tiny_imagenet_tree(tmp_path / 'tiny-imagenet-200')
  info = input_pipeline.get_dataset_info(_tiny_config(tmp_path, root))
  assert info.wnids == ('n01', 'n02', 'n03')
  assert info.class_names == ('name of n01, other', 'name of n02, other',
                              'name of n03, other')
  train = input_pipeline.load_split(info, 'train')
  assert train.images.shape == (12, 64, 64, 3)
  # Each image's pixel value encodes its label (40 + 80 * label), grayscale too.
  np.testing.assert_allclose(train.images.mean(axis=(1, 2, 3)), 40 + 80 * train.labels,
                             atol=2)
  assert 'n02_0.JPEG' in train.file_names
  val = input_pipeline.load_split(info, 'val')
  np.testing.assert_allclose(val.images.mean(axis=(1, 2, 3)), 40 + 80 * val.labels,
                             atol=2)
  test = input_pipeline.load_split(info, 'test')
  assert len(test) == 3 and (test.labels == -1).all()


def test_tfds_builder_counts_labels_names_and_determinism(tmp_path):
  root = make_tiny_imagenet_tree(tmp_path / 'tiny-imagenet-200')
  builders = []
  for i in range(2):
    info = input_pipeline.get_dataset_info(
        _tiny_config(tmp_path, root, tfds_dir=str(tmp_path / f'tfds{i}')))
    builders.append(tfds.builder_from_directory(info.data_dir))
  builder = builders[0]
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      'train': 12, 'val': 5, 'test': 3}
  assert builder.info.features['label'].names == ['n01', 'n02', 'n03']
  assert builder.info.metadata['class_names'][1] == 'name of n02, other'
  annotations = dict(line.split('\t')[:2] for line in
                     (root / 'val' / 'val_annotations.txt').read_text().splitlines())
  for example in tfds.as_numpy(builder.as_dataset(split='val')):
    name = example['file_name'].decode()
    assert example['wnid'].decode() == annotations[name]
    assert example['label'] == ['n01', 'n02', 'n03'].index(annotations[name])
  for example in tfds.as_numpy(builder.as_dataset(split='test')):
    assert example['label'] == -1 and example['wnid'] == b''
  for split in ('train', 'val', 'test'):
    a, b = (list(tfds.as_numpy(x.as_dataset(split=split, shuffle_files=False)))
            for x in builders)
    assert [e['file_name'] for e in a] == [e['file_name'] for e in b]
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x['image'], y['image'])


def test_tfds_builder_takes_the_zip_from_the_data_dir(tmp_path):
  root = make_tiny_imagenet_tree(tmp_path / 'src' / 'tiny-imagenet-200')
  downloads = tmp_path / 'downloads'
  downloads.mkdir()
  shutil.make_archive(str(downloads / 'tiny-imagenet-200'), 'zip', root.parent,
                      'tiny-imagenet-200')
  shutil.rmtree(root.parent)
  # The builder's config for a zip is the official 200-class one: this tree's
  # three classes are refused with the file named (past the zip's digest,
  # which this repacked zip is not checked against).
  with pytest.raises(ValueError, match='wnids.txt lists 3 wnids, expected 200'):
    input_pipeline.get_dataset_info(_tiny_config(tmp_path, downloads, verify_source=False))


def test_tfds_builder_never_downloads_unless_told(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError('tried to download')

  monkeypatch.setattr(tfds.download.DownloadManager, 'download_and_extract', no_network)
  monkeypatch.setattr(urllib.request, 'urlopen', no_network)  # the builder's download
  with pytest.raises(FileNotFoundError, match='config.data.download=True'):
    input_pipeline.get_dataset_info(_tiny_config(tmp_path, ''))


def test_tiny_imagenet_resized_on_decode(tmp_path):
  root = make_tiny_imagenet_tree(tmp_path / 't', size=64)
  info = input_pipeline.get_dataset_info(_tiny_config(tmp_path, root, image_size=32))
  val = input_pipeline.load_split(info, 'val')
  assert val.images.shape == (5, 32, 32, 3)
  np.testing.assert_allclose(val.images.mean(axis=(1, 2, 3)), 40 + 80 * val.labels,
                             atol=2)


def test_class_subsets(tmp_path):
  wnids = tuple(f'n{i:02d}' for i in range(10))
  assert input_pipeline.select_classes(wnids, 0) == wnids
  assert input_pipeline.select_classes(wnids, 5) == ('n00', 'n02', 'n04', 'n06', 'n08')
  assert input_pipeline.select_classes(wnids, 3) == ('n00', 'n03', 'n06')
  assert input_pipeline.select_classes(wnids, ['n07', 'n01']) == ('n01', 'n07')
  with pytest.raises(ValueError, match='data.classes=11 but the dataset has 10'):
    input_pipeline.select_classes(wnids, 11)
  with pytest.raises(ValueError, match="does not have: \\['n99'\\]"):
    input_pipeline.select_classes(wnids, ['n01', 'n99'])
  with pytest.raises(ValueError, match='must be 0'):
    input_pipeline.select_classes(wnids, 2.5)

  root = make_tiny_imagenet_tree(tmp_path / 't')
  info = input_pipeline.get_dataset_info(_tiny_config(tmp_path, root, classes=['n03', 'n01']))
  assert info.wnids == ('n01', 'n03') and info.num_classes == 2
  train = input_pipeline.load_split(info, 'train')
  assert len(train) == 8 and sorted(set(train.labels)) == [0, 1]
  # n01 keeps pixel value 40 (source label 0), n03 has 200 (source label 2).
  np.testing.assert_allclose(train.images.mean(axis=(1, 2, 3)),
                             np.where(train.labels == 0, 40, 200), atol=2)
  assert all(name.startswith(('n01', 'n03')) for name in train.file_names)
  assert len(input_pipeline.load_split(info, 'test')) == 3

  workdir = tmp_path / 'workdir'
  path = input_pipeline.save_class_mapping(info, workdir)
  assert json.loads(path.read_text()) == {
      'wnids': ['n01', 'n03'], 'class_names': ['name of n01, other', 'name of n03, other']}
  other = input_pipeline.get_dataset_info(_tiny_config(tmp_path, root, classes=2))
  with pytest.raises(ValueError, match='classes.json maps labels to other classes'):
    input_pipeline.save_class_mapping(other, workdir)
  assert json.loads(path.read_text())['wnids'] == ['n01', 'n03']


def test_bad_trees_are_clear_errors(tmp_path):
  config = _tiny_config(tmp_path, tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='nowhere holds neither wnids.txt'):
    input_pipeline.get_dataset_info(config)
  with pytest.raises(ValueError, match="valid names: \\['digits', 'tiny_imagenet'\\]"):
    input_pipeline.get_dataset_info({**config, 'name': 'cifar'})
  with pytest.raises(ValueError, match='data.image_size must be a positive integer'):
    input_pipeline.get_dataset_info({**config, 'image_size': 0})

  def prepare(root):
    return input_pipeline.get_dataset_info(
        _tiny_config(tmp_path, root, tfds_dir=str(root) + '_tfds'))

  root = make_tiny_imagenet_tree(tmp_path / 'unknown_wnid')
  annotations = root / 'val' / 'val_annotations.txt'
  annotations.write_text(annotations.read_text() + 'val_0.JPEG\tn77\t0\t0\t1\t1\n')
  with pytest.raises(ValueError, match='val_annotations.txt:6: .*a wnid from wnids.txt'):
    prepare(root)

  root = make_tiny_imagenet_tree(tmp_path / 'no_annotations')
  (root / 'val' / 'val_annotations.txt').unlink()
  with pytest.raises(FileNotFoundError, match='val_annotations.txt is missing'):
    prepare(root)

  root = make_tiny_imagenet_tree(tmp_path / 'corrupt')
  (root / 'train' / 'n03' / 'images' / 'n03_1.JPEG').write_bytes(b'not a jpeg')
  with pytest.raises(ValueError, match='Cannot decode .*n03_1.JPEG'):
    prepare(root)


@pytest.mark.parametrize('batch_size', [1, 3, 4, 7, 16])
def test_eval_batches_count_every_image_once(batch_size):
  split = counting_split(7)
  batches = list(input_pipeline.eval_batches(split, batch_size))
  assert all(b['image'].shape[0] == batch_size for b in batches)
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  np.testing.assert_array_equal(labels, split.labels)
  np.testing.assert_array_equal(images[:, 0, 0, 0], split.labels)


def test_train_epochs_are_deterministic_permutations():
  split = counting_split(10)
  train_input = input_pipeline.TrainInput(split, batch_size=3, seed=5)
  assert train_input.steps_per_epoch == 3
  epoch1 = [b['label'] for b in train_input.epoch(1)]
  assert [len(b) for b in epoch1] == [3, 3, 3]
  seen = np.concatenate(epoch1)
  assert len(set(seen)) == 9
  again = input_pipeline.TrainInput(split, batch_size=3, seed=5)
  np.testing.assert_array_equal(seen, np.concatenate([b['label'] for b in again.epoch(1)]))
  epoch2 = np.concatenate([b['label'] for b in train_input.epoch(2)])
  assert not np.array_equal(seen, epoch2)
  for batch in train_input.epoch(1):
    np.testing.assert_array_equal(batch['image'][:, 0, 0, 0], batch['label'])


def _share(split, examples):
  indices = np.asarray(examples)
  return input_pipeline.Split(images=split.images[indices], labels=split.labels[indices],
                              file_names=tuple(split.file_names[i] for i in indices),
                              indices=indices, split_size=len(split))


@pytest.mark.parametrize('num_hosts', [2, 4])
def test_hosts_read_disjoint_shares_and_feed_the_one_host_batches(num_hosts):
  """Hosts hold disjoint lanes; their rows of each batch make the one-host batch."""
  split, batch_size = counting_split(23), 8
  whole = input_pipeline.TrainInput(split, batch_size=batch_size, seed=0)
  rows = [slice(h * batch_size // num_hosts, (h + 1) * batch_size // num_hosts)
          for h in range(num_hosts)]
  shares = [input_pipeline.train_share(batch_size, 0, r)(len(split)) for r in rows]
  assert sum(len(s) for s in shares) == len(split)
  assert sorted(np.concatenate(shares)) == list(range(len(split)))
  hosts = [input_pipeline.TrainInput(_share(split, s), batch_size=batch_size, seed=0, rows=r)
           for s, r in zip(shares, rows)]
  assert all(h.steps_per_epoch == whole.steps_per_epoch == 2 for h in hosts)
  for epoch in (1, 2, 3):
    for one, parts in zip(whole.epoch(epoch), zip(*[h.epoch(epoch) for h in hosts])):
      np.testing.assert_array_equal(np.concatenate([p['label'] for p in parts]),
                                    one['label'])
      np.testing.assert_array_equal(np.concatenate([p['image'] for p in parts]),
                                    one['image'])


def test_lanes_shuffle_every_epoch_and_keep_each_example_in_its_row():
  order = [input_pipeline.epoch_order(100, 10, seed=1, epoch=e) for e in range(1, 4)]
  assert all(o.shape == (10, 10) for o in order)
  assert all(sorted(o.ravel()) == list(range(100)) for o in order)  # no remainder here
  assert not np.array_equal(order[0], order[1])
  for column in range(10):  # a lane's examples stay in their row of the batch
    assert set(order[0][:, column]) == set(order[2][:, column])
  batches = [set(b) for b in order[0]] + [set(b) for b in order[1]]
  assert len({frozenset(b) for b in batches}) == len(batches)


@pytest.mark.parametrize('num_hosts', [2, 3])
def test_hosts_evaluate_disjoint_shares_of_every_batch(num_hosts):
  split, batch_size = counting_split(11), 6
  rows = [slice(h * batch_size // num_hosts, (h + 1) * batch_size // num_hosts)
          for h in range(num_hosts)]
  shares = [_share(split, input_pipeline.eval_share(batch_size, r)(len(split)))
            for r in rows]
  assert sorted(np.concatenate([s.labels for s in shares])) == list(range(11))
  one = list(input_pipeline.eval_batches(split, batch_size))
  hosts = [list(input_pipeline.eval_batches(s, batch_size, r)) for s, r in zip(shares, rows)]
  assert all(len(h) == len(one) == 2 for h in hosts)
  for b, whole in enumerate(one):
    mask = np.concatenate([h[b]['mask'] for h in hosts])
    np.testing.assert_array_equal(mask, whole['mask'])
    labels = np.concatenate([h[b]['label'] for h in hosts])
    np.testing.assert_array_equal(labels[mask], whole['label'][whole['mask']])


def test_batch_larger_than_split_is_a_clear_error():
  with pytest.raises(ValueError, match='batch_size 64 is larger than the 10 training'):
    input_pipeline.TrainInput(counting_split(10), batch_size=64, seed=0)


def _within(seconds, function):
  """`function()`'s result, or a failure if it takes longer than `seconds`."""
  result = {}
  thread = threading.Thread(target=lambda: result.update(value=function()), daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f'still running after {seconds} s'
  return result.get('value')


@pytest.mark.parametrize('taken', [0, 1, 3, 5])
def test_prefetched_batches_stop_whenever_the_consumer_stops(taken):
  """A run stopped at any step, the last ones included, closes its batches at once."""
  def take():
    batches = input_pipeline.prefetched(iter(range(5)), size=2)
    got = [next(batches) for _ in range(taken)]
    time.sleep(0.3)  # the producer runs ahead and fills the queue
    batches.close()
    return got
  assert _within(10, take) == list(range(taken))


def test_prefetched_batches_raise_the_producers_error_in_order():
  def failing():
    yield 1
    raise OSError('disk gone')
  batches = input_pipeline.prefetched(failing())
  assert next(batches) == 1
  with pytest.raises(OSError, match='disk gone'):
    next(batches)
