"""The tensorflow-datasets builder of a tree in the Tiny ImageNet layout.

tfds has no Tiny ImageNet builder; `TinyImagenet` reads the extracted
`tiny-imagenet-200/` folder, the zip, or (when allowed) the course site's
URL, and stores the source's fingerprint with the prepared dataset. Only
preparing needs it (and so tensorflow-datasets): a prepared dataset is read
by path (`et_flax.input_pipeline`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import tensorflow_datasets as tfds

from et_flax import tiny_imagenet


@dataclasses.dataclass
class TinyImagenetConfig(tfds.core.BuilderConfig):
  """One source layout: its number of classes and image side."""
  num_classes: int = 200
  image_size: int = 64


def digits_builder_config(image_size: int, key: str) -> TinyImagenetConfig:
  """The config under which the digits tree with fingerprint `key` is prepared."""
  return TinyImagenetConfig(name=tiny_imagenet.digits_config_name(image_size, key),
                            num_classes=10,
                            image_size=image_size,
                            description='scikit-learn digits in the Tiny ImageNet layout')


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
  """Tiny ImageNet 200: 100k train, 10k val (labeled), 10k test (unlabeled).

  Sources, in this order: the extracted `tiny-imagenet-200/` folder given as
  `extracted_dir`; `tiny-imagenet-200.zip` in the download config's
  `manual_dir`; the official URL, only when `allow_download` is True.
  Labels index the sorted wnids; the test split has label -1 and wnid ''.
  The human-readable class names are in `info.metadata['class_names']`;
  the fingerprint of the source (`source`, or the tree read when none is
  given) in `info.metadata['source_fingerprint']`, written with the rest of
  the prepared dataset.
  """

  VERSION = tfds.core.Version(tiny_imagenet.VERSION)
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [TinyImagenetConfig(name=tiny_imagenet.OFFICIAL_CONFIG,
                                        description='The official dataset.')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download {tiny_imagenet.ZIP_NAME} from {tiny_imagenet.URL} (the CS231n course
  site) and place it in the manual_dir, or pass the extracted
  {tiny_imagenet.TREE_NAME}/ folder as extracted_dir.
  """

  def __init__(self, *, extracted_dir: str | os.PathLike | None = None,
               allow_download: bool = False,
               source: tiny_imagenet.SourceFingerprint | None = None,
               **kwargs):
    self._extracted_dir = pathlib.Path(extracted_dir).expanduser() if extracted_dir else None
    self._allow_download = allow_download
    self._source = source
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description='Tiny ImageNet in the official layout (64x64, 200 classes).',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 3)),
            'label': tfds.features.ClassLabel(num_classes=self.builder_config.num_classes),
            'wnid': tfds.features.Text(),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://www.kaggle.com/c/tiny-imagenet',
        metadata=tfds.core.MetadataDict(),
    )

  def _source_root(self, dl_manager) -> pathlib.Path:
    if self._extracted_dir is not None:
      if not self._extracted_dir.is_dir():
        raise FileNotFoundError(f'{self._extracted_dir} is not a directory (expected '
                                f'the extracted {tiny_imagenet.TREE_NAME}/ folder)')
      return self._extracted_dir
    try:
      manual_dir = pathlib.Path(dl_manager.manual_dir)
    except AssertionError:
      # tfds's way of saying that the manual_dir is missing or empty.
      manual_dir = None
    if manual_dir is not None and (manual_dir / tiny_imagenet.ZIP_NAME).exists():
      extracted = dl_manager.extract(manual_dir / tiny_imagenet.ZIP_NAME)
      return pathlib.Path(extracted) / tiny_imagenet.TREE_NAME
    if not self._allow_download:
      raise FileNotFoundError(
          'No Tiny ImageNet source: no extracted_dir given and no '
          f'{tiny_imagenet.ZIP_NAME} in '
          f'the manual_dir ({manual_dir or "missing or empty"}). Set '
          f'config.data.data_dir to the extracted {tiny_imagenet.TREE_NAME}/ folder or to '
          'the '
          f'folder holding {tiny_imagenet.ZIP_NAME}, or set '
          'config.data.download=True to fetch it from the course site.')
    downloaded = dl_manager.download_and_extract(tiny_imagenet.URL)
    return pathlib.Path(downloaded) / tiny_imagenet.TREE_NAME

  def _split_generators(self, dl_manager):
    root = self._source_root(dl_manager)
    wnids = tiny_imagenet.read_wnids(root)
    if len(wnids) != self.builder_config.num_classes:
      raise ValueError(f'{root / "wnids.txt"} lists {len(wnids)} wnids, expected '
                       f'{self.builder_config.num_classes}')
    self.info.features['label'].names = list(wnids)
    self.info.metadata['wnids'] = list(wnids)
    self.info.metadata['class_names'] = list(tiny_imagenet.read_class_names(root, wnids))
    # A downloaded zip is fingerprinted as the tree it extracts to.
    source = self._source or tiny_imagenet.tree_fingerprint(root)
    self.info.metadata[tiny_imagenet.FINGERPRINT_KEY] = source.to_json()
    return {split: self._generate_examples(tiny_imagenet.list_split(root, split, wnids))
            for split in tiny_imagenet.SPLITS}

  def _generate_examples(self, files: tiny_imagenet.SplitFiles):
    size = self.builder_config.image_size
    for path, wnid in zip(files.paths, files.wnids):
      yield path.name, {
          'image': tiny_imagenet.read_image(path, size),
          'label': -1 if wnid is None else wnid,
          'wnid': wnid or '',
          'file_name': path.name,
      }
