"""Shared fixtures: the digits tree, written once per test session.

Helpers the tests import live in helpers.py. ET_FLAX_TEST_DATA_DIR names a
data dir whose digits are already prepared and decoded (at 8x8 and 16x16),
for a machine without TensorFlow (tools/measure_gpu.sh makes one)."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # noqa: E402

from et_flax import digits  # noqa: E402
from et_flax import settings  # noqa: E402

# As the commands do, before JAX's backends start: GPU runs are deterministic.
settings.configure_determinism('auto')


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory):
  """A data dir holding the digits at 8x8 (the size tests train at)."""
  if os.environ.get('ET_FLAX_TEST_DATA_DIR'):
    return os.environ['ET_FLAX_TEST_DATA_DIR']
  data_dir = tmp_path_factory.mktemp('data')
  digits.write_digits_tree(data_dir, 8)
  return data_dir
