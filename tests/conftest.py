"""Shared fixtures: the digits tree and the tiny runs several tests read,
each made once per test session; a command run in the pytest process.

Helpers the tests import live in helpers.py. ET_FLAX_TEST_DATA_DIR names a
data dir whose digits are already prepared and decoded (at 8x8 and 16x16),
for a machine without TensorFlow (tools/measure_gpu.sh makes one)."""

import collections
import os
import pathlib
import runpy
import shutil
import sys
import tempfile
import warnings

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# pytest-xdist's workers share the cores: each gets its share of oneDNN's
# OpenMP threads (set before anything loads the library). A full share each
# makes their parallel regions wait on each other's descheduled threads, the
# collapse docs/performance.md measures under load.
_WORKERS = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
if _WORKERS > 1:
  os.environ.setdefault('OMP_NUM_THREADS', str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from et_flax import console  # noqa: E402
from et_flax import settings  # noqa: E402
from et_flax.cpu import host_memory  # noqa: E402
from et_flax.data import digits  # noqa: E402
from et_flax.data import filelock  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent

# As the commands do, before JAX's backends start: GPU runs are deterministic.
settings.configure_determinism('auto')

# JAX's persistent compilation cache, shared by the session's processes: the
# pytest process (or pytest-xdist's workers) and every command a test starts
# inherit it through the environment, so that each program (E.T.'s steps
# above all) is compiled once per session. JAX_COMPILATION_CACHE_DIR set
# beforehand (a folder CI keeps, say) is used as it is.
_COMPILATION_CACHE_OWNED = 'ET_FLAX_TEST_OWNS_COMPILATION_CACHE'


def pytest_configure(config):
  if hasattr(config, 'workerinput'):  # a pytest-xdist worker: the controller set it up
    return
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='et_flax_jax_cache_')
    os.environ[_COMPILATION_CACHE_OWNED] = '1'
  # Every program, however quick to compile: a test's steps compile in 1-7 s.
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))


def pytest_collection_modifyitems(config, items):
  # The longest tests (marked `first`) go to the front, in their order: the
  # first worker starts them at once, and the others take the rest.
  items.sort(key=lambda item: item.get_closest_marker('first') is None)


def pytest_unconfigure(config):
  if not hasattr(config, 'workerinput') and os.environ.pop(_COMPILATION_CACHE_OWNED, None):
    shutil.rmtree(os.environ.pop('JAX_COMPILATION_CACHE_DIR'), ignore_errors=True)


def shared_folder(tmp_path_factory, name):
  """A folder every pytest-xdist worker of the session shares (one per session
  without xdist): the same folder however often it is asked for."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent
  folder = base / name
  folder.mkdir(exist_ok=True)
  return folder


def made_once(tmp_path_factory, name, make):
  """`make(folder)`'s result, made by the first worker that asks and read
  back (as JSON) by the others: what several tests read, made once a session."""
  import json  # pylint: disable=import-outside-toplevel
  folder = shared_folder(tmp_path_factory, name)
  done = folder / '.made.json'
  with filelock.exclusive(folder.parent / f'.{name}.lock', f'the test fixture {name}'):
    if not done.exists():
      done.write_text(json.dumps(make(folder)))
  return json.loads(done.read_text())


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory):
  """A data dir holding the digits at 8x8 (the size tests train at)."""
  if os.environ.get('ET_FLAX_TEST_DATA_DIR'):
    return os.environ['ET_FLAX_TEST_DATA_DIR']
  # Writing and preparing it take file locks: with several workers, the first
  # does it and the others reuse it.
  data_dir = shared_folder(tmp_path_factory, 'data')
  digits.write_digits_tree(data_dir, 8)
  return data_dir


# The tiny runs several tests read, trained once a session (by whichever
# worker asks first). A test reads one in place, or copies it
# (shutil.copytree) to train on, evaluate into or otherwise write to.

@pytest.fixture(scope='session')
def one_epoch_run(digits_data_dir, tmp_path_factory):
  """A workdir holding one finished epoch of `helpers.tiny_config`."""
  def make(folder):
    from helpers import tiny_config  # pylint: disable=import-outside-toplevel
    from et_flax import train  # pylint: disable=import-outside-toplevel
    train.train_and_evaluate(tiny_config(digits_data_dir, num_epochs=1), str(folder / 'run'))
    return str(folder / 'run')
  return pathlib.Path(made_once(tmp_path_factory, 'one_epoch_run', make))


TrainedRun = collections.namedtuple('TrainedRun', 'workdir summary')


@pytest.fixture(scope='session')
def two_epoch_run(digits_data_dir, tmp_path_factory):
  """Two finished epochs of `helpers.tiny_config`: its workdir, and the
  summary `train_and_evaluate` returned."""
  def make(folder):
    from helpers import tiny_config  # pylint: disable=import-outside-toplevel
    from et_flax import train  # pylint: disable=import-outside-toplevel
    summary = train.train_and_evaluate(tiny_config(digits_data_dir, num_epochs=2),
                                       str(folder / 'run'))
    return {'workdir': str(folder / 'run'), 'summary': summary}
  made = made_once(tmp_path_factory, 'two_epoch_run', make)
  return TrainedRun(pathlib.Path(made['workdir']), made['summary'])


@pytest.fixture(scope='session')
def three_epoch_run(digits_data_dir, tmp_path_factory):
  """A workdir holding three finished epochs of `helpers.tiny_config` whose
  plateau (patience 1, min_delta 0.5) halves the rate: a history to evaluate
  and draw."""
  def make(folder):
    from helpers import tiny_config  # pylint: disable=import-outside-toplevel
    from et_flax import train  # pylint: disable=import-outside-toplevel
    config = tiny_config(digits_data_dir, num_epochs=3)
    config.optimizer.plateau.patience = 1
    config.optimizer.plateau.min_delta = 0.5
    train.train_and_evaluate(config, str(folder / 'run'))
    return str(folder / 'run')
  return pathlib.Path(made_once(tmp_path_factory, 'three_epoch_run', make))


Command = collections.namedtuple('Command', 'code stdout stderr')


@pytest.fixture
def run_command(monkeypatch, capsys):
  """`run_command(module, *args, cwd=REPO)` runs `python -m <module> <args>`
  in this process: its exit code, stdout and stderr.

  For a command stopped by an error found before any work is done: the
  module runs as `__main__` (runpy, as `python -m` does), through its
  `console.run`, and the flags, logging and console state that sets up are
  undone afterwards. An exception that escapes it (an internal error, whose
  traceback a process prints) is raised.
  """
  jax.devices()  # started: host_memory's 'auto' leaves this process as it is
  app.define_help_flags()  # absl defines them once a process: kept
  defined, was_parsed = set(flags.FLAGS), flags.FLAGS.is_parsed()
  saved_console = console.State.save()

  def restore():
    for name in set(flags.FLAGS) - defined:
      if name in flags.FLAGS:  # not gone with its long name
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    if was_parsed:
      flags.FLAGS.mark_as_parsed()
    # After the flags: resetting --verbosity sets the absl logger's level.
    saved_console.restore()

  def run(module, *args, cwd=REPO):
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, 'argv', ['-m', *map(str, args)])
    capsys.readouterr()
    code = 0
    try:
      with warnings.catch_warnings():
        # A process shows no DeprecationWarning raised outside __main__.
        warnings.simplefilter('ignore', DeprecationWarning)
        runpy.run_module(module, run_name='__main__', alter_sys=True)
    except SystemExit as stop:
      code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
      restore()
    output = capsys.readouterr()
    return Command(code, output.out, output.err)

  with host_memory.preserved():
    yield run
