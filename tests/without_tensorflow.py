"""Runs a module as if TensorFlow, tensorflow-datasets and Keras were not installed.

  python tests/without_tensorflow.py et_flax.main --config=... --workdir=...
  python tests/without_tensorflow.py path/to/script.py ARGS...

`importlib.util.find_spec` finds none of them and importing one raises
ModuleNotFoundError, as on a machine without them (the GPU machine et_flax is
measured on has none). At exit, the file named by the environment variable
ET_FLAX_IMPORTED_MODULES (if set) receives the names of the modules loaded.
"""

import atexit
import importlib.abc
import importlib.util
import os
import runpy
import sys

BLOCKED = ('tensorflow', 'tensorflow_datasets', 'keras', 'tf_keras')


def _blocked(name: str) -> bool:
  return name.split('.')[0] in BLOCKED


class _Absent(importlib.abc.MetaPathFinder):

  def find_spec(self, fullname, path=None, target=None):
    if _blocked(fullname):
      raise ModuleNotFoundError(f'No module named {fullname!r} (blocked by the test)',
                                name=fullname)
    return None


_find_spec = importlib.util.find_spec


def _find_spec_without(name, package=None):
  return None if _blocked(name) else _find_spec(name, package)


def _record_modules():
  with open(os.environ['ET_FLAX_IMPORTED_MODULES'], 'w') as file:
    file.write('\n'.join(sorted(sys.modules)))


if __name__ == '__main__':
  sys.meta_path.insert(0, _Absent())
  importlib.util.find_spec = _find_spec_without
  if 'ET_FLAX_IMPORTED_MODULES' in os.environ:
    atexit.register(_record_modules)
  target, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
  if target.endswith('.py'):
    runpy.run_path(target, run_name='__main__')
  else:
    runpy.run_module(target, run_name='__main__', alter_sys=True)
