"""Shared fixtures: the digits tree, written once per test session.

Helpers the tests import live in helpers.py."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # noqa: E402

from et_flax import digits  # noqa: E402


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory):
  """A data dir holding the digits at 8x8 (the size tests train at)."""
  data_dir = tmp_path_factory.mktemp('data')
  digits.write_digits_tree(data_dir, 8)
  return data_dir
