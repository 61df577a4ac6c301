"""The package's design rules: one owner per fact, no import side effects.

A model says what the settings need of it (`models.ModelFacts`), so a new
model needs no edit of settings.py; importing any et_flax module only
defines things (no TensorFlow, no file descriptor, environment or sys.argv
touched).
"""

import pathlib
import subprocess
import sys
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import pytest

from et_flax import models
from et_flax import settings

REPO = pathlib.Path(__file__).resolve().parent.parent
CPU = settings.Platform('cpu')  # XLA's convolutions: oneDNN is not asked for


class PlainConvNet(nn.Module):
  """A new model as a newcomer would write it: flax's own nn.Conv and a head."""
  num_classes: int
  channels: int = 8
  batch_norm: bool = False
  dtype: Any = jnp.float32
  conv: models.ModuleDef = models.Conv  # create_model passes it; unused here

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x = nn.relu(nn.Conv(self.channels, (3, 3))(x))
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class PlainConvNetWithFacts(PlainConvNet):

  def facts(self) -> models.ModelFacts:
    return models.ModelFacts(batch_norm=self.batch_norm, widest_channels=self.channels)


def _config(name: str, **model_fields):
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.conv_impl = 'xla'
  config.data.image_size = 16
  config.batch_size = 64
  config.model = {'name': name, **model_fields}
  return config


@pytest.fixture
def new_models(monkeypatch):
  monkeypatch.setitem(models.MODELS, 'plain', PlainConvNet)
  monkeypatch.setitem(models.MODELS, 'plain_facts', PlainConvNetWithFacts)


def test_a_model_without_facts_is_a_clear_error(new_models):
  with pytest.raises(TypeError, match='PlainConvNet does not say its facts.*ModelFacts'):
    settings.resolve(_config('plain'), CPU)


def test_the_settings_ask_the_model_not_its_name(new_models):
  # 8 channels at 16x16: 8 KiB an image, all 64 fit XLA's 2 MiB, and the
  # nn.Conv's outputs are counted against its kernel: whole batches.
  assert settings.resolve(_config('plain_facts'), CPU).micro_batch_size == 0
  assert models.facts(_config('plain_facts').model).widest_channels == 8
  # 128 channels: 128 KiB an image, parts of 16 fit.
  assert settings.resolve(_config('plain_facts', channels=128), CPU).micro_batch_size == 16
  # The same model with batch norm, as its facts say: whole batches.
  assert settings.resolve(_config('plain_facts', channels=128, batch_norm=True),
                          CPU).micro_batch_size == 0


def test_the_report_models_say_their_facts():
  assert models.facts({'name': 'et'}) == models.ModelFacts(False, 16, 1)
  assert models.facts({'name': 'et', 'width': 4, 'batch_norm': True,
                       'stem_pool': True}) == models.ModelFacts(True, 64, 2)
  assert models.facts({'name': 'vgg16'}) == models.ModelFacts(False, 64, 32, 'VGG16')
  assert models.facts({'name': 'resnet50'}) == models.ModelFacts(True, 16, 32, 'ResNet50')


# Imports each et_flax module in one fresh process, in turn, after the
# libraries they import (JAX sets environment variables of its own), with a
# sys.argv that raises when read.
_IMPORT_EVERY_MODULE = r'''
import ast, importlib, os, pathlib, sys

package = pathlib.Path(sys.argv[1])
modules = sorted('.'.join(path.relative_to(package.parent).with_suffix('').parts)
                 .removesuffix('.__init__') for path in package.rglob('*.py'))
libraries = set()
for path in package.rglob('*.py'):
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Import):
      libraries.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      libraries.add(node.module)
for name in sorted(libraries):
  if not name.startswith(('et_flax', '__future__', 'tensorflow')):
    importlib.import_module(name)
if 'tensorflow' in sys.modules:
  sys.exit('the libraries et_flax imports loaded TensorFlow')


class Unreadable(list):
  def _refuse(self, *args):
    raise AssertionError('sys.argv was read')
  __getitem__ = __iter__ = __len__ = __contains__ = __eq__ = _refuse


def fds():
  return [os.fstat(fd) for fd in (0, 1, 2)]


# Every write, a setdefault included (this process inherits what the test's
# process set: a diff alone would miss it).
written = []
Environ = type(os.environ)
set_item, del_item, set_default = Environ.__setitem__, Environ.__delitem__, Environ.setdefault


def recorded(write):
  def record(self, key, *args):
    written.append(key)
    return write(self, key, *args)
  return record


Environ.__setitem__, Environ.__delitem__ = recorded(set_item), recorded(del_item)
Environ.setdefault = recorded(set_default)


problems = []
for name in modules:
  environ, before = dict(os.environ), fds()
  sys.argv = Unreadable(['python', '--definitely-not-a-flag'])
  try:
    importlib.import_module(name)
  except AssertionError as error:
    problems.append(f'{name}: {error}')
  finally:
    sys.argv = ['python']
  if 'tensorflow' in sys.modules:
    problems.append(f'{name}: imported TensorFlow')
    break
  if fds() != before:
    problems.append(f'{name}: changed a standard file descriptor')
  if dict(os.environ) != environ or written:
    changed = sorted(set(os.environ.items()) ^ set(environ.items()))
    problems.append(f'{name}: set environment variables: {changed or written}')
    written.clear()
print('\n'.join(problems) or f'{len(modules)} modules imported')
sys.exit(1 if problems else 0)
'''


def test_importing_any_module_only_defines():
  """No TensorFlow, no file descriptor or environment variable changed, no
  read of sys.argv: the commands set their console up in their main."""
  result = subprocess.run([sys.executable, '-c', _IMPORT_EVERY_MODULE, REPO / 'et_flax'],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_a_config_file_that_fails_to_load_is_one_error_line(tmp_path, run_command):
  """Found through ml_collections' public behaviour (the failed config raises
  its loading error when used), not its private _ErrorConfig."""
  code, _, output = run_command('et_flax.main', '--config=configs/no_such_config.py',
                                f'--workdir={tmp_path / "run"}')
  assert code == 1 and 'Traceback' not in output, output
  assert output.splitlines()[0].startswith(
      'error: cannot load --config=configs/no_such_config.py: '), output
  assert output.splitlines()[0].endswith('(config paths are relative to the current '
                                         'directory)'), output


# The rooms: et_flax/data/, et_flax/keras/, et_flax/cpu/. What was made
# before the move (a prepared dataset, a workdir) names no module path that
# moved, or names one only where nothing reads it back.

_MOVED = ('input_pipeline', 'tiny_imagenet', 'tiny_imagenet_builder', 'preparation', 'digits',
          'fake_data', 'filelock', 'keras_graph', 'keras_import', 'keras_models',
          'keras_structure', 'onednn', 'host_memory', 'findings', 'analysis')


def test_the_moved_modules_are_gone_from_the_top():
  """No shims: each moved module lives in its room only."""
  top = {path.stem for path in (REPO / 'et_flax').glob('*.py')}
  assert not top & set(_MOVED)
  assert not (REPO / 'et_flax' / 'csrc').exists()
  from et_flax.cpu import onednn  # pylint: disable=import-outside-toplevel
  assert onednn.SOURCE == REPO / 'et_flax' / 'cpu' / 'csrc' / 'onednn_conv.cc'
  assert onednn.SOURCE.is_file()


def test_a_dataset_prepared_before_the_move_still_loads(tmp_path):
  """tfds records the builder's module in dataset_info.json ("moduleName") and
  nothing else of et_flax; reading a prepared dataset never imports it. One
  prepared by the builder at its old path (et_flax.tiny_imagenet_builder) is
  found prepared, not prepared again, and decodes the same."""
  import json  # pylint: disable=import-outside-toplevel

  from helpers import make_tiny_imagenet_tree  # pylint: disable=import-outside-toplevel
  from et_flax.data import input_pipeline  # pylint: disable=import-outside-toplevel

  tree = make_tiny_imagenet_tree(tmp_path / 'tree', size=8)
  data_config = {'name': 'tiny_imagenet', 'data_dir': str(tree),
                 'tfds_dir': str(tmp_path / 'tfds'), 'image_size': 8}
  info = input_pipeline.get_dataset_info(data_config)
  prepared = pathlib.Path(info.data_dir)
  info_file = prepared / 'dataset_info.json'
  stored = json.loads(info_file.read_text())
  assert stored['name'] == 'tiny_imagenet'
  assert stored['moduleName'] == 'et_flax.data.tiny_imagenet_builder'
  for path in prepared.rglob('*.json'):
    text = path.read_text().replace(str(tmp_path), '')
    if path != info_file:
      assert 'et_flax' not in text, path
  # As the builder wrote it before the move.
  stored['moduleName'] = 'et_flax.tiny_imagenet_builder'
  info_file.write_text(json.dumps(stored, indent=4))
  files = {path: path.stat().st_mtime_ns for path in prepared.iterdir() if path.is_file()}

  again = input_pipeline.get_dataset_info(data_config)
  assert again == info
  assert {path: path.stat().st_mtime_ns for path in files} == files  # not prepared again
  for split, count in (('train', 12), ('val', 5), ('test', 3)):
    data = input_pipeline.load_split(again, split)
    assert len(data) == count
  train = input_pipeline.load_split(again, 'train')
  # make_tiny_imagenet_tree's pixels encode the class: decoded as before.
  assert sorted(set(train.labels.tolist())) == [0, 1, 2]
  assert json.loads(info_file.read_text())['moduleName'] == 'et_flax.tiny_imagenet_builder'


def test_a_workdir_names_no_module_path(one_epoch_run):
  """A workdir made before the move resumes after it: its checkpoints, meta
  and history name no et_flax module (the log aside, which nothing reads)."""
  names = [f'et_flax.{name}' for name in _MOVED] + ['et_flax.data', 'et_flax.keras',
                                                     'et_flax.cpu']
  for path in one_epoch_run.rglob('*'):
    if path.is_file() and path.name != 'log.txt':
      content = path.read_bytes()
      assert not [name for name in names if name.encode() in content], path


def test_the_keras_room_never_shadows_keras():
  """et_flax.keras imports Keras by its absolute name: importing the room
  first, then `keras`, gives the real Keras."""
  pytest.importorskip('keras')
  code = ('import et_flax.keras.models, et_flax.keras.weights, et_flax.keras.structure; '
          'import keras; import et_flax.keras as room; '
          'assert keras is not room and hasattr(keras, "layers"), keras; '
          'print(keras.__file__)')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'et_flax' not in result.stdout


# Loads configs/<name>.py from another working directory, with the repository
# root (where `configs` is found) off sys.path once et_flax is imported.
_LOAD_ELSEWHERE = r'''
import importlib.util, os, sys
repo = sys.argv[1]
sys.path.insert(0, repo)
{imports}
sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != repo]
assert os.getcwd() != repo and 'configs' not in sys.modules
assert importlib.util.find_spec('configs') is None, 'configs is importable from here anyway'
{body}
'''


@pytest.mark.parametrize('imports,body', [
    ('from et_flax import config_files',
     "print(config_files.load('dropout_5').model.dropout_rate)"),
    ('from absl import flags\nfrom et_flax import main',
     "sys.argv = ['main', '--config=' + os.path.join(repo, 'configs', 'dropout_5.py'),"
     " '--workdir=w']\n"
     "main.define_flags()\n"
     "flags.FLAGS(sys.argv)\n"
     "print(flags.FLAGS.config.model.dropout_rate)"),
    ('from et_flax import reproduce',
     "print(reproduce.experiment_config('dropout_5', quick=True).model.dropout_rate)"),
], ids=['config_files', 'main', 'reproduce'])
def test_configs_load_from_any_working_directory(tmp_path, imports, body):
  """A config that imports its base (`from configs import default`) loads
  from outside the repository: by name, as --config, and in the sweep."""
  code = _LOAD_ELSEWHERE.format(imports=imports, body=body)
  result = subprocess.run([sys.executable, '-c', code, str(REPO)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  assert result.stdout.split()[-1] == '0.5'


def test_an_unknown_config_name_is_a_clear_error():
  from et_flax import config_files  # pylint: disable=import-outside-toplevel
  with pytest.raises(FileNotFoundError, match="No config 'no_such_config'"):
    config_files.load('no_such_config')
