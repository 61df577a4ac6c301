"""Trains and evaluates a model from a config file.

  python -m et_flax.main --config=configs/quickstart.py --workdir=runs/quickstart

Any config field can be overridden on the command line, e.g.
`--config.num_epochs=5 --config.data.data_dir=/data/tiny-imagenet-200`.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from et_flax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None,
                    'Directory for checkpoints, history and metrics; a workdir '
                    'with checkpoints resumes.')
config_flags.DEFINE_config_file('config', None, 'A config file with get_config().',
                                lock_config=True)
flags.DEFINE_bool('allow_config_change', False,
                  'Resume a workdir whose saved config differs from --config.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.config.get('distributed'):
    jax.distributed.initialize()
  logging.info('Config:\n%s', FLAGS.config)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                           allow_config_change=FLAGS.allow_config_change)


if __name__ == '__main__':
  app.run(main)
