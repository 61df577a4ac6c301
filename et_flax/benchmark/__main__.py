"""`python -m et_flax.benchmark [steps|pipeline|conv_variants] --flags...`"""

import importlib
import sys

from absl import app
from absl import flags

from et_flax import settings
from et_flax.cpu import host_memory

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
  host_memory.define_flag()
  settings.define_deterministic_flag()

  def run(argv):
    # As training runs: before JAX's backends start.
    host_memory.configure(flags.FLAGS.host_memory)
    settings.configure_determinism(flags.FLAGS.deterministic)
    return module.main(argv)

  app.run(run, argv=[f'{sys.argv[0]} {part}', *args])


if __name__ == '__main__':
  main()
