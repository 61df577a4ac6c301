"""The official zip is checked against its published size and MD5 before it
is prepared, downloaded to a temporary name, and the check recorded."""

import hashlib
import http.server
import json
import logging
import pathlib
import threading
import zipfile

import pytest

from helpers import make_tiny_imagenet_tree
from et_flax import console
from et_flax.data import input_pipeline
from et_flax.data import tiny_imagenet
from et_flax.data import tiny_imagenet_builder

WNIDS = ('n02', 'n01', 'n03')


def test_the_published_digest_is_pinned():
  """The size and MD5 every published loader of the dataset checks."""
  assert tiny_imagenet.ZIP_SIZE == 248_100_043
  assert tiny_imagenet.ZIP_MD5 == '90528d7ca1a48142e341f4ef8d21d0de'
  assert tiny_imagenet.URL == 'http://cs231n.stanford.edu/tiny-imagenet-200.zip'


@pytest.fixture
def official_is_3_classes_8px(monkeypatch):
  """Makes a 3-class 8px tree count as the official layout."""
  official = tiny_imagenet_builder.TinyImagenet.BUILDER_CONFIGS[0]
  monkeypatch.setattr(official, 'num_classes', 3)
  monkeypatch.setattr(official, 'image_size', 8)
  monkeypatch.setattr(tiny_imagenet, 'OFFICIAL_NUM_CLASSES', 3)
  monkeypatch.setattr(tiny_imagenet, 'OFFICIAL_IMAGE_SIZE', 8)


@pytest.fixture
def official_zip(tmp_path, monkeypatch, official_is_3_classes_8px):
  """A small zip in the official layout whose digest is made the official one."""
  tree = make_tiny_imagenet_tree(tmp_path / 'src' / tiny_imagenet.TREE_NAME, WNIDS, size=8)
  path = tmp_path / 'downloads' / tiny_imagenet.ZIP_NAME
  path.parent.mkdir()
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as archive:
    for file in sorted(p for p in tree.rglob('*') if p.is_file()):
      archive.write(file, f'{tiny_imagenet.TREE_NAME}/{file.relative_to(tree)}')
  data = path.read_bytes()
  monkeypatch.setattr(tiny_imagenet, 'ZIP_SIZE', len(data))
  monkeypatch.setattr(tiny_imagenet, 'ZIP_MD5', hashlib.md5(data).hexdigest())
  return path


def _config(tmp_path, data_dir, **overrides):
  return {'name': 'tiny_imagenet', 'data_dir': str(data_dir), 'image_size': 8,
          'tfds_dir': str(tmp_path / 'tfds'), **overrides}


def _prepared(tmp_path):
  """What was prepared or extracted under the test's tfds_dir."""
  tfds_dir = tmp_path / 'tfds'
  return sorted(str(p.relative_to(tfds_dir)) for p in tfds_dir.rglob('*')
                if p.name == tiny_imagenet.VERSION or p.name.startswith('ZIP.'))


def test_the_official_zip_is_prepared_and_recorded_verified(tmp_path, official_zip):
  info = input_pipeline.get_dataset_info(_config(tmp_path, official_zip.parent))
  assert info.source_check == tiny_imagenet.VERIFIED
  metadata = json.loads((pathlib.Path(info.data_dir) / 'metadata.json').read_text())
  assert metadata['source_check'] == 'verified zip'
  assert info.describe_source() == 'the official zip (its size and MD5 verified)'
  assert len(input_pipeline.load_split(info, 'train')) == 12


def _truncated(data):
  return data[:len(data) // 2]


def _one_byte_changed(data):
  """One byte inside the first image's compressed bytes: the zip still reads."""
  changed = bytearray(data)
  changed[len(data) // 3] ^= 0x01
  return bytes(changed)


@pytest.mark.parametrize('damage', [_truncated, _one_byte_changed])
def test_a_damaged_zip_is_refused_before_anything_is_prepared(tmp_path, official_zip,
                                                              damage):
  official_zip.write_bytes(damage(official_zip.read_bytes()))
  with pytest.raises(ValueError) as refusal:
    input_pipeline.get_dataset_info(_config(tmp_path, official_zip.parent))
  message = console.user_error_message(refusal.value)  # one line, no traceback
  size, found_size = tiny_imagenet.ZIP_SIZE, official_zip.stat().st_size
  assert message.startswith(
      f'{official_zip} is not the official tiny-imagenet-200.zip: expected {size:,} '
      f'bytes with MD5 {tiny_imagenet.ZIP_MD5}, found {found_size:,} bytes')
  if found_size == size:
    assert f'with MD5 {tiny_imagenet.file_md5(official_zip)}' in message
  assert 'Download it again from http://cs231n.stanford.edu/' in message
  assert '--config.data.verify_source=False' in message
  assert '\n' not in message
  assert _prepared(tmp_path) == []


def test_verify_source_false_prepares_a_repacked_zip_as_unverified(tmp_path, official_zip,
                                                                   monkeypatch):
  monkeypatch.setattr(tiny_imagenet, 'ZIP_MD5', '0' * 32)  # a repacked archive
  with pytest.raises(ValueError, match='is not the official'):
    input_pipeline.get_dataset_info(_config(tmp_path, official_zip.parent))
  with pytest.raises(ValueError, match="data.verify_source must be True or False, got 'no'"):
    input_pipeline.get_dataset_info(_config(tmp_path, official_zip.parent,
                                            verify_source='no'))
  info = input_pipeline.get_dataset_info(_config(tmp_path, official_zip.parent,
                                                 verify_source=False))
  assert info.source_check == tiny_imagenet.UNVERIFIED
  assert 'NOT verified' in info.describe_source()
  assert len(input_pipeline.load_split(info, 'train')) == 12


def test_a_tree_is_recorded_as_a_tree(tmp_path, official_zip):
  tree = tmp_path / 'src' / tiny_imagenet.TREE_NAME
  info = input_pipeline.get_dataset_info(_config(tmp_path, tree))
  assert info.source_check == tiny_imagenet.TREE_SOURCE
  assert info.describe_source().startswith('an extracted tree')


def test_the_header_says_what_the_data_was_prepared_from(tmp_path, official_zip,
                                                         monkeypatch, caplog):
  from et_flax import distributed
  from et_flax import settings as settings_lib
  from et_flax import train
  from helpers import tiny_config

  monkeypatch.setattr(tiny_imagenet, 'ZIP_MD5', '0' * 32)
  config = tiny_config(official_zip.parent, batch_size=4)
  config.data.update(name='tiny_imagenet', tfds_dir=str(tmp_path / 'tfds'),
                     verify_source=False)
  info = input_pipeline.get_dataset_info(config.data)
  with caplog.at_level(logging.INFO):
    train._load_data(config, info, distributed.make_mesh(),  # pylint: disable=protected-access
                     settings_lib.Platform.current())
  assert ('Data prepared from a zip NOT verified against the official size and MD5 '
          '(prepared with data.verify_source=False)') in caplog.text


# ---------------------------------------------------------------------------
# Downloading: to a temporary name, resumed, renamed only once verified.

class _Server(http.server.ThreadingHTTPServer):
  """Serves `payload` at any path; honours Range unless `ranges` is False;
  closes the connection after `cut_at` bytes of the body, if set."""

  def __init__(self, payload):
    super().__init__(('127.0.0.1', 0), _Handler)
    self.payload, self.ranges, self.cut_at, self.requests = payload, True, None, []

  @property
  def url(self):
    return f'http://127.0.0.1:{self.server_port}/{tiny_imagenet.ZIP_NAME}'


class _Handler(http.server.BaseHTTPRequestHandler):

  def do_GET(self):  # pylint: disable=invalid-name
    server = self.server
    asked = self.headers.get('Range')
    server.requests.append(asked)
    start = int(asked[len('bytes='):].rstrip('-')) if asked and server.ranges else 0
    body = server.payload[start:]
    self.send_response(206 if start else 200)
    if start:
      self.send_header('Content-Range',
                       f'bytes {start}-{len(server.payload) - 1}/{len(server.payload)}')
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    sent = body if server.cut_at is None else body[:server.cut_at]
    self.wfile.write(sent)
    self.close_connection = True

  def log_message(self, *args):
    pass


@pytest.fixture
def server(official_zip):
  server = _Server(official_zip.read_bytes())
  thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
  thread.start()
  yield server
  server.shutdown()
  server.server_close()


def test_an_interrupted_download_is_resumed_and_renamed_once_verified(tmp_path, server):
  folder = tmp_path / 'dl'
  final, partial = folder / tiny_imagenet.ZIP_NAME, folder / f'{tiny_imagenet.ZIP_NAME}.part'
  server.cut_at = 1000
  with pytest.raises(OSError, match=f'stopped at 1,000 of {len(server.payload):,} bytes.*'
                                    'is kept, run again to resume it'):
    tiny_imagenet_builder.download_official_zip(folder, server.url)
  assert partial.stat().st_size == 1000 and not final.exists()
  server.cut_at = None
  assert tiny_imagenet_builder.download_official_zip(folder, server.url) == final
  assert server.requests == [None, 'bytes=1000-']
  assert final.read_bytes() == server.payload and not partial.exists()
  # A server that ignores the Range request: the part is downloaded anew.
  final.unlink()
  partial.write_bytes(b'x' * 1000)
  server.ranges = False
  tiny_imagenet_builder.download_official_zip(folder, server.url)
  assert final.read_bytes() == server.payload and not partial.exists()


def test_a_wrong_download_is_removed_not_renamed(tmp_path, server):
  folder = tmp_path / 'dl'
  server.payload = _one_byte_changed(server.payload)
  with pytest.raises(ValueError, match=r'\.part is not the official tiny-imagenet-200.zip: '
                                       r'expected .* with MD5 .*, found .* with MD5 .*'
                                       r'it was removed\. Run again to download it again'):
    tiny_imagenet_builder.download_official_zip(folder, server.url)
  assert list(folder.iterdir()) == []


def test_download_prepares_only_a_complete_verified_zip(tmp_path, server, monkeypatch):
  monkeypatch.setattr(tiny_imagenet, 'URL', server.url)
  config = _config(tmp_path, '', download=True)
  server.cut_at = 1000
  with pytest.raises(OSError, match='run again to resume it'):
    input_pipeline.get_dataset_info(config)
  assert _prepared(tmp_path) == []
  server.cut_at = None
  info = input_pipeline.get_dataset_info(config)
  assert info.source_check == tiny_imagenet.VERIFIED
  assert server.requests == [None, 'bytes=1000-']
  assert len(input_pipeline.load_split(info, 'train')) == 12
  with pytest.raises(ValueError, match='a download from the course site is always verified'):
    input_pipeline.get_dataset_info(_config(tmp_path / 'other', '', download=True,
                                            verify_source=False))


def test_a_workdir_saved_before_verify_source_existed_resumes():
  from configs import default
  from et_flax import checkpoints
  current = checkpoints.config_to_dict(default.get_config())
  saved = json.loads(json.dumps(current))
  del saved['data']['verify_source']
  assert checkpoints.config_differences(saved, current) == []
  saved['data']['verify_source'] = False  # and one may turn it off for a repacked zip
  assert checkpoints.config_differences(saved, current) == []
