"""Storage faults: a damaged checkpoint is passed over for the newest intact one,
and a full disk stops a run with one line, losing nothing.

The damage is what a broken copy leaves: a file of a checkpoint truncated.
The full disk is a real one, a small tmpfs mounted for the test (skipped,
with the reason, where this process may not mount one).
"""

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import run_processes
from helpers import tiny_config
from et_flax import checkpoints
from et_flax import console
from et_flax import interrupts
from et_flax import reproduce
from et_flax import run_files
from et_flax import train

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMING_FIELDS = {'epoch_seconds', 'train_images_per_second', 'input_wait_fraction'}
OVERRIDES = {'checkpoint_every_epochs': 1, 'max_to_keep': 3}
# TensorStore's reads still under way when Orbax gives up on a damaged
# checkpoint end on a closed event loop (a command sends those to its log).
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def _config(data_dir, num_epochs):
  return tiny_config(data_dir, num_epochs=num_epochs, **OVERRIDES)


def _command(workdir, data_dir, num_epochs):
  """The same run as `_config`, from the command line."""
  return [sys.executable, '-m', 'et_flax.main', '--config=configs/quickstart.py',
          f'--workdir={workdir}', f'--config.num_epochs={num_epochs}',
          '--config.data.image_size=8', '--config.model.num_modules=1',
          '--config.batch_size=64', f'--config.data.data_dir={data_dir}',
          *[f'--config.{key}={value}' for key, value in OVERRIDES.items()]]


def _run(command):
  result = subprocess.run(command, cwd=REPO, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'},
                          capture_output=True, text=True, timeout=300, check=False)
  return result.returncode, result.stderr


@pytest.fixture(scope='module')
def three_epochs(digits_data_dir, tmp_path_factory):
  """A run of three epochs with a checkpoint each (the best one is an earlier epoch's)."""
  workdir = tmp_path_factory.mktemp('three_epochs')
  train.train_and_evaluate(_config(digits_data_dir, 3), str(workdir))
  return workdir


def _copy(run, tmp_path, name='run'):
  return pathlib.Path(shutil.copytree(run, tmp_path / name))


def _truncate(path):
  with open(path, 'r+b') as file:
    file.truncate(path.stat().st_size // 2)


def _state(folder):
  """Every array of a checkpoint's state, flattened, read as saved."""
  manager = ocp.CheckpointManager(folder.parent.absolute(),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    state = manager.restore(int(folder.name), args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))['state']
  finally:
    manager.close()
  return {'/'.join(map(str, path)): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def _assert_same_state(folder, reference):
  got, expected = _state(folder), _state(reference)
  assert got.keys() == expected.keys()
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def _history(workdir):
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
          for line in (workdir / checkpoints.HISTORY_FILE).read_text().splitlines()]


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records
          if r.name == console.CONSOLE_LOGGER and r.levelno == logging.WARNING]


def _best_epoch(workdir):
  return int(next((workdir / checkpoints.BEST).iterdir()).name)


# ---------------------------------------------------------------------------
# A damaged checkpoint.

def test_a_damaged_latest_checkpoint_resumes_from_the_newest_intact_one(
    three_epochs, digits_data_dir, tmp_path, caplog):
  run = _copy(three_epochs, tmp_path)
  # An array's data, not its metadata: the checkpoint is read whole to find it.
  data = max((run / checkpoints.LATEST / '3' / 'state').rglob('d/*'),
             key=lambda path: path.stat().st_size)
  _truncate(data)
  truncated_size = data.stat().st_size
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(_config(digits_data_dir, 3), str(run))
  warnings = _warnings(caplog)
  assert len(warnings) == 1, warnings
  assert warnings[0].startswith(f'{run / checkpoints.LATEST / "3"} is damaged (')
  assert f'moved to {run / checkpoints.DAMAGED / checkpoints.LATEST / "3"} (kept' in warnings[0]
  assert 'resuming from the newest intact checkpoint (epoch 2)' in warnings[0]
  # Moved aside whole, the truncated file too; epoch 3 trained again, exactly.
  moved = run / checkpoints.DAMAGED / checkpoints.LATEST / '3'
  assert (moved / data.relative_to(run / checkpoints.LATEST / '3')).stat().st_size == \
      truncated_size
  assert sorted(p.relative_to(moved) for p in moved.rglob('*')) == sorted(
      p.relative_to(three_epochs / checkpoints.LATEST / '3')
      for p in (three_epochs / checkpoints.LATEST / '3').rglob('*'))
  _assert_same_state(run / checkpoints.LATEST / '3', three_epochs / checkpoints.LATEST / '3')
  assert _history(run) == _history(three_epochs)


def test_a_damaged_best_checkpoint_falls_back_to_latest_and_is_written_again(
    three_epochs, digits_data_dir, tmp_path, caplog):
  run = _copy(three_epochs, tmp_path)
  best = _best_epoch(run)
  assert best < 3  # the latest is another checkpoint than the best
  _truncate(run / checkpoints.BEST / str(best) / 'state' / '_sharding')
  # A reader (evaluate, predict, compare, a warm start) says so and uses the latest.
  with caplog.at_level(logging.INFO):
    read = checkpoints.read_checkpoint(run, 'best')
  assert (read.which, read.meta.epoch) == ('latest', 3)
  assert _warnings(caplog) == [
      f'{run / checkpoints.BEST / str(best)} is damaged (FAILED_PRECONDITION: Error reading '
      f'local file "{(run / checkpoints.BEST / str(best) / "state" / "_sharding").absolute()}'
      f'": Invalid JSON), left in place; using {run / checkpoints.LATEST / "3"} (epoch 3) '
      'instead']
  assert (run / checkpoints.BEST / str(best)).is_dir()
  caplog.clear()
  # The run (here finished) moves it aside and writes it again from its epoch's.
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(_config(digits_data_dir, 3), str(run))
  warnings = _warnings(caplog)
  assert len(warnings) == 1 and (f'{checkpoints.BEST}/{best} written again from '
                                 f'{run / checkpoints.LATEST / str(best)}') in warnings[0]
  assert (run / checkpoints.DAMAGED / checkpoints.BEST / str(best)).is_dir()
  _assert_same_state(run / checkpoints.BEST / str(best),
                     three_epochs / checkpoints.BEST / str(best))
  assert checkpoints.read_checkpoint(run, 'best').which == 'best'


def test_a_damaged_interrupted_checkpoint_resumes_from_the_last_epoch(
    three_epochs, digits_data_dir, tmp_path, monkeypatch, caplog):
  run = _copy(three_epochs, tmp_path)
  # The run as it stood after epoch 2, stopped by SIGTERM within epoch 3.
  shutil.rmtree(run / checkpoints.LATEST / '3')
  monkeypatch.setattr(interrupts.StopRequests, 'requested',
                      lambda self, step: signal.SIGTERM if step == 5 else None)
  with pytest.raises(interrupts.TrainingInterrupted):
    train.train_and_evaluate(_config(digits_data_dir, 3), str(run))
  monkeypatch.undo()
  [interrupted] = (run / checkpoints.INTERRUPTED).iterdir()
  _truncate(interrupted / 'meta' / 'metadata')
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(_config(digits_data_dir, 3), str(run))
  warnings = _warnings(caplog)
  assert len(warnings) == 1 and warnings[0].startswith(f'{interrupted} is damaged')
  assert 'resuming from the newest intact checkpoint (epoch 2)' in warnings[0]
  assert (run / checkpoints.DAMAGED / checkpoints.INTERRUPTED / interrupted.name).is_dir()
  _assert_same_state(run / checkpoints.LATEST / '3', three_epochs / checkpoints.LATEST / '3')
  assert _history(run) == _history(three_epochs)


def test_every_checkpoint_damaged_is_one_error_line(three_epochs, digits_data_dir,
                                                     tmp_path):
  run = _copy(three_epochs, tmp_path)
  for epoch in (1, 2, 3):
    _truncate(run / checkpoints.LATEST / str(epoch) / 'state' / '_METADATA')
  with pytest.raises(checkpoints.DamagedCheckpointError, match='no intact latest checkpoint'):
    checkpoints.read_checkpoint(run, 'latest')
  code, stderr = _run(_command(run, digits_data_dir, 4))
  assert code == 1, stderr[-3000:]
  lines = stderr.splitlines()
  assert lines[0].startswith(
      f'error: no intact checkpoint to resume {run} from: {run / checkpoints.LATEST / "3"}, '
      f'{run / checkpoints.LATEST / "2"} and {run / checkpoints.LATEST / "1"} are damaged '
      '(Expecting')
  assert lines[0].endswith('They are left in place. Move '
                           f'{run / checkpoints.LATEST} elsewhere to train this run from the '
                           'start, or copy intact checkpoints back from a backup.')
  assert lines[1:] == [f'(traceback in {run / "log.txt"})'], stderr[-3000:]
  assert sorted(p.name for p in (run / checkpoints.LATEST).iterdir()) == ['1', '2', '3']
  assert not (run / checkpoints.DAMAGED).exists()


# Two processes of a run, on 127.0.0.1 with JAX's CPU collectives; process 1's
# reads of the step folders named in argv fail, as a flaky network filesystem's
# reads fail on one host.
DISAGREEING_SCRIPT = textwrap.dedent('''
    import pathlib, sys
    import jax
    port, process_id, workdirs = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(',')
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                               process_id=process_id, initialization_timeout=60)
    from et_flax import checkpoints
    unreadable = set(sys.argv[4].split(',')) if process_id == 1 else set()
    read_whole = checkpoints._read_whole
    def flaky_read_whole(manager, step, sharding):
      path = str(pathlib.Path(manager.directory) / str(step))
      if path in unreadable:
        raise OSError(5, 'Input/output error', path)
      return read_whole(manager, step, sharding)
    checkpoints._read_whole = flaky_read_whole
    for workdir in workdirs:
      try:
        print('resumes from epoch', checkpoints.find_resume_point(pathlib.Path(workdir)).epoch,
              flush=True)
      except checkpoints.DamagedCheckpointError as error:
        print('error:', error, flush=True)
''')


def _three_small_checkpoints(workdir):
  """Epochs 1-3 of tiny arrays; the best is epoch 2's."""
  with checkpoints.RunCheckpoints(workdir) as run:
    for epoch in (1, 2, 3):
      history = [{'epoch': e, 'step': 10 * e} for e in range(1, epoch + 1)]
      run.save(epoch, {'w': jax.numpy.full(3, epoch, jax.numpy.float32)},
               run_files.RunMeta(epoch=epoch, config={}, history=history), best=epoch < 3)


@pytest.mark.slow
def test_processes_that_read_a_checkpoint_differently_agree_on_the_resume_point(tmp_path):
  partly, wholly = tmp_path / 'partly', tmp_path / 'wholly'
  for workdir in (partly, wholly):
    _three_small_checkpoints(workdir)
  # Process 1 alone cannot read partly's latest and best, nor any of wholly's.
  unreadable = [partly / checkpoints.LATEST / '3', partly / checkpoints.BEST / '2',
                *(wholly / checkpoints.LATEST / str(epoch) for epoch in (1, 2, 3))]
  codes, outputs = run_processes(
      DISAGREEING_SCRIPT, [f'{partly},{wholly}', ','.join(map(str, unreadable))], tmp_path)
  assert codes == [0, 0], '\n'.join(output[-3000:] for output in outputs)
  said = [[line for line in output.splitlines() if line.startswith(('resumes', 'error:'))]
          for output in outputs]
  # Both from epoch 2, intact on both; the damaged ones moved aside once, the
  # best written again from epoch 2's.
  assert said[0] == said[1] and said[0][0] == 'resumes from epoch 2', outputs
  assert (f'{partly / checkpoints.LATEST / "3"} and {partly / checkpoints.BEST / "2"} are '
          'damaged (on process 1: [Errno 5]') in outputs[0]
  damaged = partly / checkpoints.DAMAGED
  assert sorted(str(p.relative_to(damaged)) for p in damaged.glob('*/*')) == [
      f'{checkpoints.LATEST}/3', f'{checkpoints.BEST}/2']
  assert sorted(p.name for p in (partly / checkpoints.LATEST).iterdir()) == ['1', '2']
  _assert_same_state(partly / checkpoints.BEST / '2', partly / checkpoints.LATEST / '2')
  # None intact on both: the same error on both, nothing moved.
  assert said[0][1].startswith(f'error: no intact checkpoint to resume {wholly} from: '
                               f'{wholly / checkpoints.LATEST / "3"}, '), said
  assert sorted(p.name for p in (wholly / checkpoints.LATEST).iterdir()) == ['1', '2', '3']
  assert not (wholly / checkpoints.DAMAGED).exists()


# ---------------------------------------------------------------------------
# A full disk.

@pytest.fixture
def small_disk(tmp_path):
  """A 8 MiB tmpfs, mounted for the test and unmounted after it."""
  mount_point = tmp_path / 'disk'
  mount_point.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=8m', 'tmpfs',
                            str(mount_point)], capture_output=True, text=True, check=False)
  if mounted.returncode:
    pytest.skip('a full disk needs a small filesystem, and this process cannot mount a '
                f'tmpfs (not root, or no CAP_SYS_ADMIN): {mounted.stderr.strip()}')
  try:
    yield mount_point
  finally:
    if subprocess.run(['umount', str(mount_point)], check=False).returncode:
      subprocess.run(['umount', '--lazy', str(mount_point)], check=True)


def _fill(disk, leave_bytes):
  """A file that takes all the free space of `disk` but `leave_bytes`."""
  stats = os.statvfs(disk)
  filler = disk / 'filler'
  fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
  try:
    os.posix_fallocate(fd, 0, stats.f_bavail * stats.f_frsize - leave_bytes)
  finally:
    os.close(fd)
  return filler


def test_a_full_disk_stops_the_run_with_one_line_and_it_resumes_after(
    three_epochs, digits_data_dir, small_disk, tmp_path):
  reference = _copy(three_epochs, tmp_path, 'reference')  # the disk never fills
  train.train_and_evaluate(_config(digits_data_dir, 4), str(reference))
  run = _copy(three_epochs, small_disk)
  filler = _fill(small_disk, 100_000)  # room for the log's first lines, not a checkpoint
  code, stderr = _run(_command(run, digits_data_dir, 4))
  assert code == 1, stderr[-3000:]
  lines = stderr.splitlines()
  errors = [line for line in lines if line.startswith('error:')]
  assert errors == [
      'error: No space left on device while writing the checkpoint of epoch 4 in '
      f"{run / checkpoints.LATEST}; epoch 3's checkpoint ({run / checkpoints.LATEST / '3'}) "
      'is the last complete one. Free space (or raise the quota) and run the same command '
      'to resume.'], stderr[-3000:]
  assert 'Traceback' not in stderr and 'Logging error' not in stderr
  assert len([line for line in lines if 'log.txt' in line]) <= 2, stderr  # its stop, the hint
  assert len(lines) <= 12, stderr
  # The half-written checkpoint is not one; the earlier ones restore.
  assert checkpoints.complete_epochs(run) == [1, 2, 3]
  assert checkpoints.read_checkpoint(run, 'latest').meta.epoch == 3
  filler.unlink()
  code, stderr = _run(_command(run, digits_data_dir, 4))
  assert code == 0, stderr[-3000:]
  _assert_same_state(run / checkpoints.LATEST / '4', reference / checkpoints.LATEST / '4')
  assert _history(run) == _history(reference)


def test_a_log_file_that_cannot_be_written_stops_after_one_line(tmp_path, capsys):
  (tmp_path / 'classes.json').write_text('{}')  # the workdir holds a run
  (tmp_path / console.LOG_FILE).symlink_to('/dev/full')  # every write: ENOSPC
  log = console.WorkdirLog(tmp_path)
  for i in range(3):
    log.handle(logging.makeLogRecord({'msg': f'record {i}', 'levelno': logging.INFO}))
  log.close()
  assert capsys.readouterr().err.splitlines() == [
      f'warning: cannot write {tmp_path / console.LOG_FILE} (No space left on device): the '
      'log stops here; the console lines go on']
  assert log.written_to() is None


def test_a_sweep_stops_on_a_full_disk_and_goes_on_after(tmp_path, monkeypatch):
  experiments = reproduce.select_experiments(['plain_2', 'optimizer_adam_10'])
  full = {'disk': True}
  trained = []

  def train_and_evaluate(config, workdir):
    if full['disk']:
      raise console.StorageFullError(f'No space left on device while writing {workdir}')
    trained.append(pathlib.Path(workdir).name)

  monkeypatch.setattr(train, 'train_and_evaluate', train_and_evaluate)
  with pytest.raises(console.StorageFullError) as stopped:
    reproduce.run_sweep(tmp_path, experiments, quick=True, evaluate_runs=False)
  first = experiments[0].name
  assert str(stopped.value).startswith(
      f'{first} failed: No space left on device while writing {tmp_path / first} '
      f'(recorded in {tmp_path / reproduce.STATUS_FILE}). The sweep stops here')
  runs = json.loads((tmp_path / reproduce.STATUS_FILE).read_text())['runs']
  assert runs[first]['status'] == 'failed'
  assert runs[first]['message'].startswith('No space left on device')
  assert experiments[1].name not in runs  # not tried: it would fail the same way
  full['disk'] = False
  summary = reproduce.run_sweep(tmp_path, experiments, quick=True, evaluate_runs=False)
  assert trained == [e.name for e in experiments]
  assert [r.status for r in summary.results] == ['done', 'done']
