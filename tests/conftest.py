"""Shared fixtures: the digits tree, written once per test session.

Helpers the tests import live in helpers.py. ET_FLAX_TEST_DATA_DIR names a
data dir whose digits are already prepared and decoded (at 8x8 and 16x16),
for a machine without TensorFlow (tools/measure_gpu.sh makes one)."""

import os
import shutil
import tempfile

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

from et_flax import digits  # noqa: E402
from et_flax import filelock  # noqa: E402
from et_flax import settings  # noqa: E402

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


def pytest_unconfigure(config):
  if not hasattr(config, 'workerinput') and os.environ.pop(_COMPILATION_CACHE_OWNED, None):
    shutil.rmtree(os.environ.pop('JAX_COMPILATION_CACHE_DIR'), ignore_errors=True)


def shared_folder(tmp_path_factory, name):
  """A folder every pytest-xdist worker of the session shares (one per session
  without xdist)."""
  if os.environ.get('PYTEST_XDIST_WORKER'):
    folder = tmp_path_factory.getbasetemp().parent / name
    folder.mkdir(exist_ok=True)
    return folder
  return tmp_path_factory.mktemp(name)


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
