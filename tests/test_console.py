"""The console: progress within an epoch, the log file, short errors.

The subprocess tests are the issue's acceptance: a short console for a run
whose output is not a terminal, and a one-line error for a config typo. The
other errors found before any work is done run the command in this process
(conftest's `run_command`).
"""

import errno
import io
import logging
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
from absl import logging as absl_logging

from et_flax import console
from et_flax import distributed
from et_flax import workdir_lock

REPO = pathlib.Path(__file__).resolve().parent.parent
# No TF_CPP_MIN_LOG_LEVEL: the commands must be quiet without it.
ENV = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _run(*args, timeout=300):
  """A command's exit code and its stdout and stderr together, as a pipe sees them."""
  result = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, check=False)
  return result.returncode, result.stdout


def _tiny(workdir, data_dir, num_epochs, *extra):
  return ['-m', 'et_flax.main', '--config=configs/quickstart.py', f'--workdir={workdir}',
          f'--config.num_epochs={num_epochs}', '--config.data.image_size=8',
          '--config.model.num_modules=1', '--config.batch_size=64',
          f'--config.data.data_dir={data_dir}', *extra]


# ---------------------------------------------------------------------------
# EpochProgress.

def test_progress_where_the_output_is_not_a_terminal_is_a_line_every_30_s():
  clock, stream = Clock(), io.StringIO()
  progress = console.EpochProgress(3, 40, steps=100, batch_size=64, stream=stream,
                                   clock=clock)
  assert progress.mode == 'lines'
  reads = []

  def loss():
    reads.append(clock.now)
    return 0.5

  for step in range(1, 101):
    clock.now += 2.0 if step == 1 else 1.0  # the first step compiles
    progress.update(step, loss=loss)
  progress.close()
  # Lines 30 s apart; rates and ETA from the first update on (1 step/s).
  assert stream.getvalue() == (
      'epoch 3/40: step 29/100, ETA 1:11, 64 img/s, loss 0.5000\n'
      'epoch 3/40: step 59/100, ETA 0:41, 64 img/s, loss 0.5000\n'
      'epoch 3/40: step 89/100, ETA 0:11, 64 img/s, loss 0.5000\n')
  assert reads == [30.0, 60.0, 90.0]  # the loss is read only to be shown


def test_progress_of_an_epoch_shorter_than_the_interval_prints_nothing():
  clock, stream = Clock(), io.StringIO()
  with console.EpochProgress(1, 1, steps=20, batch_size=8, stream=stream,
                             clock=clock) as progress:
    for step in range(1, 21):
      clock.now += 1.4
      progress.update(step, loss=1.0)
  assert stream.getvalue() == ''


def test_progress_resumed_within_an_epoch_counts_from_its_step():
  clock, stream = Clock(), io.StringIO()
  progress = console.EpochProgress(2, 5, steps=60, batch_size=10, initial_step=20,
                                   stream=stream, interval=10, clock=clock)
  for step in range(21, 61):
    clock.now += 0.5
    progress.update(step)
  # No line at the last step: the epoch line follows.
  assert stream.getvalue() == 'epoch 2/5: step 40/60, ETA 0:10, 20 img/s\n'


def test_progress_bar_on_a_terminal():
  stream = io.StringIO()
  progress = console.EpochProgress(1, 2, steps=10, batch_size=32, mode='bar',
                                   stream=stream)
  for step in range(1, 11):
    time.sleep(0.1)  # tqdm redraws at most every 0.2 s
    progress.update(step, loss=0.25)
  progress.close()
  output = stream.getvalue()
  assert re.search(r'\repoch 1/2 [1-9]\d*/10 \[.*\] ETA 0:0\d, \d+ img/s, loss 0\.2500', output)
  assert output.endswith('\r')  # erased: the epoch line takes its place


def test_progress_modes():
  with pytest.raises(ValueError, match='mode must be'):
    console.EpochProgress(1, 1, 1, 1, mode='fancy')
  assert console.EpochProgress(1, 1, 1, 1, mode='off').update(1) is None


# ---------------------------------------------------------------------------
# The log file.

def _record(message):
  return logging.LogRecord('absl', logging.INFO, __file__, 1, message, (), None)


def test_the_log_file_waits_until_the_workdir_holds_a_run(tmp_path):
  workdir = tmp_path / 'run'
  log = console.WorkdirLog(workdir)
  log.handle(_record('before the workdir'))
  assert not workdir.exists() and log.written_to() is None
  workdir.mkdir()
  (workdir / workdir_lock.RUN_LOCK_FILE).touch()  # a run refused now leaves nothing
  log.handle(_record('the lock is taken'))
  assert sorted(p.name for p in workdir.iterdir()) == [workdir_lock.RUN_LOCK_FILE]
  (workdir / 'classes.json').write_text('{}')
  log.handle(_record('the run wrote its first file'))
  assert log.written_to() == workdir / console.LOG_FILE
  lines = (workdir / console.LOG_FILE).read_text().splitlines()
  assert [line.split('] ', 1)[1] for line in lines] == [
      'before the workdir', 'the lock is taken', 'the run wrote its first file']
  log.close()
  assert console.log_file_name(0) == 'log.txt'
  assert console.log_file_name(2) == 'log.process2.txt'


def _logging_now():
  """What setup_logging changes, as the console's public names show it."""
  root = logging.getLogger()
  stdout = sys.stdout
  with console.library_output():
    library_output_to_log = sys.stdout is not stdout
  return dict(root_handlers=list(root.handlers), root_level=root.level,
              absl_level=logging.getLogger('absl').level,
              absl_filters=list(absl_logging.get_absl_handler().filters),
              log_path=console.log_path(), library_output_to_log=library_output_to_log,
              showwarning=warnings.showwarning, unraisablehook=sys.unraisablehook)


def test_a_saved_state_restores_the_console_and_logging(tmp_path):
  (tmp_path / 'classes.json').write_text('{}')  # a run: the log file is written
  before = _logging_now()
  state = console.State.save()
  console.setup_logging(tmp_path)
  quiet = _logging_now()
  assert quiet['log_path'] == tmp_path / console.LOG_FILE
  assert quiet['library_output_to_log'] and quiet['root_handlers'] != before['root_handlers']
  quiet_state = console.State.save()
  for _ in range(2):  # restoring again gives the same state back
    console.setup_logging(tmp_path, verbose=True)
    logging.getLogger('absl').setLevel(logging.DEBUG)
    assert not _logging_now()['library_output_to_log']
    quiet_state.restore()
    now = _logging_now()
    assert now['library_output_to_log'] and now['root_handlers'] == quiet['root_handlers']
  state.restore()
  assert _logging_now() == before
  logging.getLogger('et_flax').warning('after the restore')
  assert 'after the restore' not in (tmp_path / console.LOG_FILE).read_text()
  if os.path.isdir('/proc/self/fd'):  # the handlers set up since are closed
    assert str(tmp_path / console.LOG_FILE) not in [
        os.path.realpath(f'/proc/self/fd/{fd}') for fd in os.listdir('/proc/self/fd')]


# ---------------------------------------------------------------------------
# Which errors are the user's.

def _caught(function, *args):
  try:
    function(*args)
  except Exception as error:  # pylint: disable=broad-except
    return error
  raise AssertionError('no error')


def _disk_full():
  try:
    raise OSError(errno.ENOSPC, 'No space left on device', '/runs/x/checkpoints/3')
  except OSError as error:
    raise RuntimeError('asynchronous save failed') from error


def test_user_errors_and_internal_errors(tmp_path):
  launch = _caught(distributed.check_launch, None, None, 1, False)
  assert console.user_error_message(launch).startswith('--process_id given without')
  with workdir_lock.RunLock(tmp_path):
    busy = _caught(workdir_lock.RunLock(tmp_path).acquire)
  assert 'is in use by another run' in console.user_error_message(busy)
  missing = _caught(open, tmp_path / 'missing.txt')
  assert 'No such file or directory' in console.user_error_message(missing)
  assert console.user_error_message(_caught(_disk_full)) == (
      "[Errno 28] No space left on device: '/runs/x/checkpoints/3'")
  # Raised outside et_flax (here, or inside a library): internal, traceback kept.
  assert console.user_error_message(_caught(int, 'x')) is None
  assert console.user_error_message(_caught(dict().__getitem__, 'key')) is None
  assert console.user_error_message(_caught(lambda: 1 / 0)) is None


def test_a_command_prints_a_user_error_on_one_line_and_keeps_internal_tracebacks(
    tmp_path):
  script = tmp_path / 'command.py'
  script.write_text(textwrap.dedent(f'''
      import sys
      sys.path.insert(0, {str(REPO)!r})
      from absl import flags
      from et_flax import console
      flags.DEFINE_string('workdir', None, '')
      flags.DEFINE_string('fail', 'user', '')

      def main(argv):
        if flags.FLAGS.fail == 'internal':
          raise TypeError('a bug')
        raise FileNotFoundError(2, 'No such file or directory', '/nowhere/x')

      console.run(main)
      '''))
  code, output = _run(str(script), f'--workdir={tmp_path / "w"}')
  assert code == 1
  assert output.splitlines() == [
      "error: [Errno 2] No such file or directory: '/nowhere/x'",
      '(--verbose shows the traceback)']
  code, output = _run(str(script), '--verbose')
  assert code == 1 and 'Traceback' in output
  assert output.splitlines()[-1] == "error: [Errno 2] No such file or directory: '/nowhere/x'"
  code, output = _run(str(script), '--fail=internal')
  assert code == 1 and 'Traceback' in output and 'TypeError: a bug' in output
  code, output = _run(str(script), '--bogus')
  assert code == 1 and output.splitlines()[0] == "error: Unknown command line flag 'bogus'"


# ---------------------------------------------------------------------------
# The acceptance.

def test_a_run_whose_output_is_not_a_terminal_prints_a_few_lines(digits_data_dir,
                                                                  tmp_path):
  workdir = tmp_path / 'run'
  code, output = _run(*_tiny(workdir, digits_data_dir, 3))
  assert code == 0, output[-3000:]
  lines = output.splitlines()
  assert len(lines) <= 25, output
  assert [line.split(':')[0] for line in lines if line.startswith('epoch ')] == [
      'epoch 1/3', 'epoch 2/3', 'epoch 3/3']
  assert 'Model et: ' in output and 'Devices: ' in output
  assert lines[-1].startswith('Best epoch ') and f'Results in {workdir}' in lines[-1]
  assert '\r' not in output and 'Traceback' not in output
  log = (workdir / console.LOG_FILE).read_text()
  # The libraries' logs and the config dump, in full, in the log file only.
  for library_line in ('checkpoint_manager.py', 'Config:'):
    assert library_line in log and library_line not in output
  assert 'epoch 3/3: train loss' in log

  # --verbose: the libraries' logs on the console too; the log file goes on.
  code, output = _run(*_tiny(workdir, digits_data_dir, 4), '--verbose')
  assert code == 0, output[-3000:]
  assert f'Resuming {workdir} after epoch 3' in output
  assert 'checkpoint_manager.py' in output
  assert output.count('epoch 4/4: train loss') == 1  # not twice (console and absl)
  log = (workdir / console.LOG_FILE).read_text()
  assert log.count('et_flax started ') == 2 and 'epoch 4/4: train loss' in log


def test_a_config_typo_is_a_short_error(tmp_path):
  code, output = _run('-m', 'et_flax.main', '--config=configs/quickstart.py',
                      f'--workdir={tmp_path / "run"}', '--config.modle.width=2')
  assert code == 1
  assert len(output.splitlines()) <= 5 and 'Traceback' not in output, output
  assert output.splitlines()[0] == (
      'error: --config.modle.width=2: the config has no field \'modle\'. '
      'Did you mean "model" instead of "modle"?')
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('override, expected', [
    (['--config.batch_size=abc'], "--config.batch_size=abc: config.batch_size takes an "
     "integer (its value now: 32), not 'abc'"),
    (['--config.batch_size', 'abc'], "--config.batch_size=abc: config.batch_size takes an "
     "integer (its value now: 32), not 'abc'"),
    (['--config.model.batch_norm=maybe'], "--config.model.batch_norm=maybe: "
     "config.model.batch_norm takes true or false (its value now: False), not 'maybe'"),
    # A placeholder: typed, with no value yet.
    (['--config.augment.rotation_range=abc'], "--config.augment.rotation_range=abc: "
     "config.augment.rotation_range takes a number, not 'abc'"),
])
def test_a_config_value_of_the_wrong_type_says_what_the_field_takes(tmp_path, override,
                                                                      expected,
                                                                      run_command):
  # In this process: the flag parsing is the command's (the typo test above
  # runs the process).
  code, _, output = run_command('et_flax.main', '--config=configs/quickstart.py',
                                f'--workdir={tmp_path / "run"}', *override)
  assert code == 1
  assert 'Traceback' not in output, output
  assert output.splitlines()[0] == f'error: {expected}'
  assert not (tmp_path / 'run').exists()


def test_a_missing_data_dir_is_a_short_error(tmp_path, run_command):
  code, _, output = run_command('et_flax.main', '--config=configs/default.py',
                                f'--workdir={tmp_path / "run"}',
                                '--config.data.data_dir=/nonexistent')
  assert code == 1
  assert output.splitlines() == [
      'error: data.data_dir /nonexistent holds neither wnids.txt (the extracted '
      'tiny-imagenet-200/ folder) nor tiny-imagenet-200.zip',
      '(--verbose shows the traceback)']
  assert not (tmp_path / 'run').exists()  # a refused run leaves nothing behind
