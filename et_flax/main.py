"""Trains and evaluates a model from a config file.

  python -m et_flax.main --config=configs/quickstart.py --workdir=runs/quickstart

Any config field can be overridden on the command line, e.g.
`--config.num_epochs=5 --config.data.data_dir=/data/tiny-imagenet-200`.
Several processes (hosts) train one run when started with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, or with
`--config.distributed=True` on a cluster JAX detects (et_flax/distributed.py).
The console shows a header, a progress bar and one line per epoch; the
libraries' logs go to <workdir>/log.txt (--verbose shows them too).
"""

import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from et_flax import config_files
from et_flax import console
from et_flax import distributed
from et_flax import interrupts
from et_flax import settings
from et_flax import train
from et_flax.cpu import host_memory

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined when it runs: defining --config reads sys.argv)."""
  config_files.importable()  # the config's `from configs import ...`, from any directory
  flags.DEFINE_string('workdir', None,
                      'Directory for checkpoints, history and metrics; a workdir '
                      'with checkpoints resumes.')
  config_flags.DEFINE_config_file('config', None, 'A config file with get_config().',
                                  lock_config=True)
  flags.DEFINE_bool('allow_config_change', False,
                    'Resume a workdir whose saved config differs from --config.')
  flags.DEFINE_string('coordinator_address', None,
                      'Multi-process run: HOST:PORT of process 0, the same for all.')
  flags.DEFINE_integer('num_processes', None, 'Multi-process run: how many processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-process run: this process, 0 to N-1.')
  flags.DEFINE_integer('heartbeat_timeout_seconds',
                       distributed.DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
                       'Multi-process run: a process silent this long is lost, and '
                       'the others stop.')
  flags.DEFINE_integer('initialization_timeout_seconds', 300,
                       'Multi-process run: how long to wait for every process to join.')
  host_memory.define_flag()
  settings.define_deterministic_flag()
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # A LaunchError (a ValueError) is shown on one line by console.run.
  launch = distributed.check_launch(
      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
      bool(FLAGS.config.get('distributed')), FLAGS.heartbeat_timeout_seconds,
      FLAGS.initialization_timeout_seconds)
  host_memory.configure(FLAGS.host_memory)  # before JAX's backends start
  settings.configure_determinism(FLAGS.deterministic)
  distributed.initialize(launch)
  if launch.auto_detect:  # this process's log file, now that its index is known
    console.setup_logging(FLAGS.workdir, FLAGS.verbose, jax.process_index())
  logging.info('Config:\n%s', FLAGS.config)  # to the log file
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                             allow_config_change=FLAGS.allow_config_change)
  except interrupts.TrainingInterrupted as stopped:
    # SIGINT/SIGTERM: saved and stopped; the shell's usual exit codes.
    console.info('%s', stopped)
    sys.exit(stopped.exit_code)


if __name__ == '__main__':
  define_flags()
  console.run(main)
