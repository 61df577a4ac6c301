"""`python -m et_flax.benchmark [steps|pipeline|conv_variants] --flags...`"""

import importlib
import sys

from absl import app

# Before anything imports TensorFlow: its start-up lines stay off the console.
from et_flax import console  # noqa: F401  pylint: disable=unused-import

PARTS = ('steps', 'report_models', 'pipeline', 'conv_variants')


def main() -> None:
  args = sys.argv[1:]
  part = 'steps'
  if args and not args[0].startswith('-'):
    part, args = args[0], args[1:]
  if part not in PARTS:
    sys.exit(f'error: unknown benchmark {part!r}; choose one of {list(PARTS)}')
  module = importlib.import_module(f'et_flax.benchmark.{part}')
  module.define_flags()
  app.run(module.main, argv=[f'{sys.argv[0]} {part}', *args])


if __name__ == '__main__':
  main()
