"""The experiment configs, configs/<name>.py beside the package, from any working directory.

Each config is a file with `get_config()`, and the variants import their base
(`from configs import default`), so `configs` must be importable. From the
repository root it is (`python -m` puts the working directory on sys.path);
`importable` makes it so from anywhere else, as this repository's configs/,
for the commands that read `--config` and for `load`.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import pathlib
import sys

import ml_collections

REPO = pathlib.Path(__file__).resolve().parent.parent
DIRECTORY = REPO / 'configs'
PACKAGE = 'configs'


def path(name: str) -> pathlib.Path:
  """The file of the config called `name`."""
  return DIRECTORY / f'{name}.py'


def importable() -> None:
  """Makes `import configs` find this repository's configs/ from any working
  directory; does nothing where `configs` is already imported, or where the
  package was installed without its repository (no configs/ beside it)."""
  if PACKAGE in sys.modules or not (DIRECTORY / '__init__.py').is_file():
    return
  spec = importlib.machinery.PathFinder.find_spec(PACKAGE, [str(REPO)])
  module = importlib.util.module_from_spec(spec)
  sys.modules[PACKAGE] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[PACKAGE]
    raise


def load(name: str) -> ml_collections.ConfigDict:
  """configs/<name>.py's `get_config()`, from any working directory."""
  importable()
  try:
    module = importlib.import_module(f'{PACKAGE}.{name}')
  except ModuleNotFoundError as error:
    if error.name not in (PACKAGE, f'{PACKAGE}.{name}'):
      raise
    raise FileNotFoundError(f'No config {name!r}: {path(name)} is not there') from error
  return module.get_config()
