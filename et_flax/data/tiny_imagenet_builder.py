"""The tensorflow-datasets builder of a tree in the Tiny ImageNet layout.

tfds has no Tiny ImageNet builder; `TinyImagenet` reads the extracted
`tiny-imagenet-200/` folder, the zip, or (when allowed) the course site's
URL, and stores the source's fingerprint with the prepared dataset, and how
it was checked: a zip against the official size and MD5 before it is
extracted. Only preparing needs it (and so tensorflow-datasets): a prepared
dataset is read by path (`et_flax.data.input_pipeline`).
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import pathlib
import shutil
import urllib.error
import urllib.request

import tensorflow_datasets as tfds

from et_flax import console
from et_flax.data import tiny_imagenet


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
  `manual_dir`; the official URL, only when `allow_download` is True
  (`download_official_zip`). A zip is checked against the official size and
  MD5 before it is extracted, unless `verify_source` is False (a zip
  repacked on purpose; never for a download); how the source was checked is
  in `info.metadata['source_check']`.
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
               verify_source: bool = True,
               source: tiny_imagenet.SourceFingerprint | None = None,
               **kwargs):
    self._extracted_dir = pathlib.Path(extracted_dir).expanduser() if extracted_dir else None
    self._allow_download = allow_download
    self._verify_source = verify_source
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

  def _source_root(self, dl_manager) -> tuple[pathlib.Path, str]:
    """The extracted tree to read, and how its source was checked."""
    if self._extracted_dir is not None:
      if not self._extracted_dir.is_dir():
        raise FileNotFoundError(f'{self._extracted_dir} is not a directory (expected '
                                f'the extracted {tiny_imagenet.TREE_NAME}/ folder)')
      return self._extracted_dir, tiny_imagenet.TREE_SOURCE
    try:
      manual_dir = pathlib.Path(dl_manager.manual_dir)
    except AssertionError:
      # tfds's way of saying that the manual_dir is missing or empty.
      manual_dir = None
    if manual_dir is not None and (manual_dir / tiny_imagenet.ZIP_NAME).exists():
      return self._extract(dl_manager, manual_dir / tiny_imagenet.ZIP_NAME)
    if not self._allow_download:
      raise FileNotFoundError(
          'No Tiny ImageNet source: no extracted_dir given and no '
          f'{tiny_imagenet.ZIP_NAME} in '
          f'the manual_dir ({manual_dir or "missing or empty"}). Set '
          f'config.data.data_dir to the extracted {tiny_imagenet.TREE_NAME}/ folder or to '
          'the '
          f'folder holding {tiny_imagenet.ZIP_NAME}, or set '
          'config.data.download=True to fetch it from the course site.')
    if not self._verify_source:
      raise ValueError(
          'data.verify_source=False is for a zip placed in data.data_dir: a download '
          'from the course site is always verified. Set config.data.data_dir to the '
          f'folder holding your {tiny_imagenet.ZIP_NAME}, or drop '
          'data.verify_source=False to download the official one')
    downloaded = download_official_zip(
        pathlib.Path(dl_manager.download_dir) / tiny_imagenet.BUILDER_NAME,
        tiny_imagenet.URL)
    return self._extract(dl_manager, downloaded)

  def _extract(self, dl_manager, zip_path: pathlib.Path) -> tuple[pathlib.Path, str]:
    """`zip_path` extracted, once checked against the official size and MD5."""
    if self._verify_source:
      tiny_imagenet.check_official_zip(zip_path)
    extracted = pathlib.Path(dl_manager.extract(zip_path)) / tiny_imagenet.TREE_NAME
    return extracted, (tiny_imagenet.VERIFIED if self._verify_source
                       else tiny_imagenet.UNVERIFIED)

  def _split_generators(self, dl_manager):
    root, source_check = self._source_root(dl_manager)
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
    self.info.metadata[tiny_imagenet.SOURCE_CHECK_KEY] = source_check
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


def download_official_zip(folder: pathlib.Path, url: str) -> pathlib.Path:
  """`folder/tiny-imagenet-200.zip`, downloaded from `url` unless already there.

  The download goes to `tiny-imagenet-200.zip.part`, resumed where an
  interrupted one stopped (restarted where the server ignores the Range
  request), and takes its final name only once complete and verified
  against the official size and MD5: a zip of that name here is never a
  partial or a wrong one. A complete download that is not the official zip
  is removed.

  Raises:
    ValueError: the download is not the official zip.
    OSError: the download stopped (the part is kept: the next call resumes it).
  """
  final = folder / tiny_imagenet.ZIP_NAME
  if final.exists():
    return final
  folder.mkdir(parents=True, exist_ok=True)
  partial = folder / f'{tiny_imagenet.ZIP_NAME}.part'
  if not partial.exists() or partial.stat().st_size < tiny_imagenet.ZIP_SIZE:
    _download(url, partial)
  found = tiny_imagenet.official_zip_mismatch(partial)
  if found is not None:
    partial.unlink()
    raise ValueError(
        f'{tiny_imagenet.describe_mismatch(partial, found)}: not the official zip, so '
        f'it was removed. Run again to download it again; if {url} now serves '
        'another archive, download it by hand, set config.data.data_dir to its folder '
        'and --config.data.verify_source=False (it is then recorded as unverified)')
  partial.replace(final)
  return final


def _download(url: str, partial: pathlib.Path) -> None:
  """Appends the rest of `url` to `partial` (all of it, if the server must)."""
  start = partial.stat().st_size if partial.exists() else 0
  headers = {'Range': f'bytes={start}-'} if start else {}
  try:
    try:
      response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                        timeout=60)
    except urllib.error.HTTPError as error:
      if error.code != 416:  # Range Not Satisfiable: the part is not of this file
        raise
      start, response = 0, urllib.request.urlopen(url, timeout=60)
    with response:
      if response.status == 206:
        content_range = response.headers.get('Content-Range', '')
        if not content_range.startswith(f'bytes {start}-'):
          raise OSError(f'asked for bytes {start}- and got {content_range!r}')
      console.info('%s %s (%s MB) into %s', 'Resuming' if response.status == 206
                   else 'Downloading', url, tiny_imagenet.ZIP_SIZE // 10**6, partial)
      with partial.open('ab' if response.status == 206 else 'wb') as file:
        shutil.copyfileobj(response, file, 1 << 20)
        received = file.tell() - (start if response.status == 206 else 0)
      # http.client ends a body cut short without an error.
      declared = response.headers.get('Content-Length')
      if declared is not None and received < int(declared):
        raise OSError('the connection closed early')
  except (OSError, http.client.HTTPException) as error:
    have = partial.stat().st_size if partial.exists() else 0
    raise OSError(f'Downloading {url} stopped at {have:,} of '
                  f'{tiny_imagenet.ZIP_SIZE:,} bytes ({error}): '
                  + (f'{partial} is kept, run again to resume it' if have else
                     'run again to try again')) from error
