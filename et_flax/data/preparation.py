"""Preparing the tfds dataset once per source, safely on shared storage.

Processes that find a dataset unprepared at once (the hosts of a multi-host
run, two runs started together) prepare it in turn under a file lock: the
first prepares, the others wait and then reuse it. A prepared dataset keeps
the fingerprint of its source (`tiny_imagenet.SourceFingerprint`), and a
later run given another source is refused rather than silently trained on
the data prepared before. Only `prepare` needs tensorflow-datasets (and
TensorFlow); a prepared dataset, with its stored fingerprint or prepared
by an older et_flax without one, is read and checked as plain JSON
(`read_prepared_metadata`, `check_stored_source`).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging

from et_flax import console
from et_flax.data import filelock
from et_flax.data import tiny_imagenet

Builder = Any  # tiny_imagenet_builder.TinyImagenet, whose module imports tfds
Fingerprint = tiny_imagenet.SourceFingerprint
# tensorflow-datasets' names for a prepared dataset's files (tfds.core.constants).
DATASET_INFO_FILENAME = 'dataset_info.json'
METADATA_FILENAME = 'metadata.json'


def prepare(make_builder: Callable[[], Builder], source: Fingerprint | None,
            download_config: Any) -> Builder:
  """The builder `make_builder` makes, prepared once and checked against `source`.

  Preparing runs under an exclusive lock, `.<version>.lock` beside the
  prepared version folder (`<tfds_dir>/tiny_imagenet/<config>/`): of
  processes that find the dataset unprepared at once, the first prepares it
  and the others wait, then reuse it. tfds writes into an `incomplete.*`
  folder renamed into place at the end, so a killed preparer leaves nothing
  that passes for prepared; its folder is removed by the next preparer.

  Raises:
    ValueError: the dataset is prepared from another source than `source`
      (see `check_source`). None (no data.data_dir) uses it as it is.
  """
  tfds = console.import_tensorflow('preparing the dataset', 'tensorflow_datasets')
  builder = make_builder()
  if not builder.is_prepared():
    config_dir = pathlib.Path(builder.data_dir).parent
    label = f'{builder.name}/{builder.builder_config.name}'
    with filelock.exclusive(config_dir / f'.{builder.version}.lock',
                            f'{label} in {builder.data_dir_root}'):
      # A builder reads the prepared dataset's info when it is made: make it
      # again, in case another process prepared it while we waited.
      builder = make_builder()
      if not builder.is_prepared():
        # Under the lock nobody else prepares this version: an incomplete
        # folder of it is left over by a killed preparer.
        for stale in config_dir.glob(
            f'{tfds.core.constants.INCOMPLETE_PREFIX}*_{builder.version}'):
          logging.info('Removing %s, left over by an interrupted preparation', stale)
          shutil.rmtree(stale)
        previous = _prepared_before(builder, source)
        if previous is None:
          console.info('Preparing %s in %s (once)', label, builder.data_dir)
        else:
          console.info('%s changed since it was prepared in %s: preparing it anew in %s',
                       source.path, previous, builder.data_dir)
        with console.library_output():  # tfds prints its own notes
          builder.download_and_prepare(download_config=download_config)
        return builder
  if source is not None:
    check_source(builder, source)
  return builder


def _prepared_before(builder: Builder, source: Fingerprint | None) -> pathlib.Path | None:
  """Another config's prepared folder of the source at `source.path`, if any.

  A source prepared under a config named by its fingerprint's key (a tree
  not in the official layout, the digits) that has changed since is
  prepared under a new config; this finds the old one, for the log.
  """
  name = builder.builder_config.name
  if source is None or not name.endswith(f'_{source.key}'):
    return None
  dataset_dir = pathlib.Path(builder.data_dir).parent.parent
  pattern = f'{name[:-len(source.key)]}*/{builder.version}/{METADATA_FILENAME}'
  for metadata in sorted(dataset_dir.glob(pattern)):
    try:
      stored = json.loads(metadata.read_text()).get(tiny_imagenet.FINGERPRINT_KEY)
    except (OSError, ValueError) as error:
      # Only a log line depends on it: say so, and go on preparing.
      logging.warning('Cannot read %s (%s): not looking there for an earlier '
                      'preparation of %s', metadata, error, source.path)
      continue
    if stored is not None and stored['path'] == source.path:
      return metadata.parent
  return None


def check_source(builder: Builder, source: Fingerprint) -> None:
  """Refuses a prepared dataset whose stored source differs from `source`
  (`check_stored_source` on the builder's prepared folder).

  Raises:
    ValueError: naming the prepared folder, what differs and what to do.
  """
  check_stored_source(builder.data_dir, builder.builder_config.name,
                      builder.info.metadata, source)


def check_stored_source(data_dir: str | pathlib.Path, config_name: str,
                        metadata: Mapping[str, Any], source: Fingerprint) -> None:
  """Refuses the dataset prepared in `data_dir` (its `metadata`) when its
  source differs from `source`.

  A dataset prepared by an older et_flax has no stored fingerprint: what
  that version stored (the wnids, and the split sizes tfds recorded) is
  checked instead, and a match is used with a warning that the files could
  not be checked.

  Raises:
    ValueError: naming the prepared folder, what differs and what to do.
  """
  stored = metadata.get(tiny_imagenet.FINGERPRINT_KEY)
  if stored is not None:
    _refuse(data_dir, config_name, stored['path'], source,
            Fingerprint.from_json(stored).differences(source))
    return
  differences = []
  wnids = tuple(metadata.get('wnids', ()))
  if wnids != source.wnids:
    differences.append(f'wnids: {len(wnids)} prepared (first {list(wnids[:3])}), '
                       f'{len(source.wnids)} in the source (first '
                       f'{list(source.wnids[:3])})')
  prepared_sizes = {split: sum(shards) for split, (shards, _) in
                    _prepared_splits(data_dir).items()}
  if prepared_sizes != source.split_sizes():
    differences.append(f'split sizes: {prepared_sizes} prepared, '
                       f'{source.split_sizes()} in the source')
  if not differences:
    logging.warning(
        '%s was prepared by an older et_flax, which kept no fingerprint of its source: '
        'its wnids and split sizes match %s, so it is used, but its files could not '
        'be checked (remove that folder to prepare it again with a fingerprint)',
        data_dir, source.path)
  _refuse(data_dir, config_name, 'unknown: prepared by an older et_flax', source,
          differences)


def read_prepared_metadata(data_dir: pathlib.Path) -> dict[str, Any] | None:
  """The metadata of the dataset prepared in `data_dir` (None: not prepared
  there), read without tfds; one prepared by an older et_flax has no
  `tiny_imagenet.FINGERPRINT_KEY`."""
  if not (data_dir / DATASET_INFO_FILENAME).is_file():
    return None
  return json.loads((data_dir / METADATA_FILENAME).read_text())


def prepared_key(data_dir: str | pathlib.Path, metadata: Mapping[str, Any]) -> str:
  """A short hash of the dataset prepared in `data_dir`: 8 hex digits.

  What keys its decoded splits when it has no source fingerprint (prepared
  by an older et_flax): its wnids, and each split's examples per shard and
  bytes as tfds recorded them. The cache holds what this folder decodes to,
  so any source that passes `check_stored_source` may read it. A dataset
  prepared there anew is keyed by its fingerprint (by an older et_flax: by
  its records' bytes, which another source's images all but surely change).
  """
  content = json.dumps([list(metadata.get('wnids', ())),
                        sorted(_prepared_splits(data_dir).items())])
  return hashlib.sha256(content.encode()).hexdigest()[:8]


def _prepared_splits(data_dir: str | pathlib.Path) -> dict[str, tuple[list[int], int]]:
  """Each split's (examples per shard, bytes), from tfds's `dataset_info.json`."""
  info = json.loads((pathlib.Path(data_dir) / DATASET_INFO_FILENAME).read_text())
  splits = {split['name']: ([int(n) for n in split.get('shardLengths', ())],
                            int(split.get('numBytes', 0)))
            for split in info.get('splits', ())}
  return {split: splits.get(split, ([], 0)) for split in tiny_imagenet.SPLITS}


def _refuse(data_dir: str | pathlib.Path, config_name: str, stored_from: str,
            source: Fingerprint, differences: list[str]) -> None:
  if differences:
    raise ValueError(
        f'{data_dir} holds {tiny_imagenet.BUILDER_NAME}/{config_name} prepared '
        f'from another source ({stored_from}) than data.data_dir ({source.path}): '
        + '; '.join(differences) + f'. Remove {data_dir} to prepare it from '
        'data.data_dir, or set data.tfds_dir to another folder (an empty data.data_dir '
        'uses the prepared data as it is)')
