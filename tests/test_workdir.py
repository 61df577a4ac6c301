"""One run per workdir, and readers that never trip over the running one."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from et_flax import checkpoints
from et_flax import evaluate
from et_flax import workdir_lock

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_a_held_workdir_names_its_holder(tmp_path):
  workdir = tmp_path / 'run'
  with workdir_lock.RunLock(workdir):
    with pytest.raises(workdir_lock.WorkdirBusyError,
                       match=f'{workdir} is in use by another run \\(PID {os.getpid()} on'):
      workdir_lock.RunLock(workdir).acquire()
  # Released, and a run that wrote nothing leaves nothing behind.
  assert not workdir.exists()
  with workdir_lock.RunLock(workdir):
    (workdir / 'history.jsonl').write_text('')
  assert sorted(p.name for p in workdir.iterdir()) == ['.run.lock', 'history.jsonl']
  with workdir_lock.RunLock(workdir):  # free again
    pass


def test_a_workdir_that_is_a_file_is_refused_by_name(tmp_path, run_command):
  workdir = tmp_path / 'notes.txt'
  workdir.write_text('kept')
  with pytest.raises(NotADirectoryError,
                     match=f'^The workdir {workdir} exists and is not a folder; pass a folder'):
    workdir_lock.RunLock(workdir).acquire()
  assert workdir.read_text() == 'kept'
  # The command says so in one line, before any work is done.
  code, _, stderr = run_command('et_flax.main', '--config=configs/quickstart.py',
                                f'--workdir={workdir}')
  assert code == 1, stderr
  assert stderr.splitlines()[0].startswith(
      f'error: The workdir {workdir} exists and is not a folder')
  assert 'Traceback' not in stderr
  assert workdir.read_text() == 'kept'


def _main(workdir, data_dir, num_epochs):
  return [sys.executable, '-m', 'et_flax.main', '--config=configs/quickstart.py',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
          '--config.data.image_size=8', '--config.model.num_modules=1',
          '--config.batch_size=64', f'--config.num_epochs={num_epochs}',
          # A save and a deletion every epoch: the readers' worst case.
          '--config.checkpoint_every_epochs=1', '--config.max_to_keep=1']


def _finalized(folder):
  """The names of the epochs in `folder` that Orbax has finalized.

  A save in progress is a '<epoch>.orbax-checkpoint-tmp-*' folder, renamed
  to '<epoch>' when complete (an epoch's line comes before that: saves are
  asynchronous).
  """
  return [p.name for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []


@pytest.mark.slow
def test_a_busy_workdir_refuses_a_second_run_and_serves_readers(digits_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}
  log = tmp_path / 'training.log'  # a file: a pipe nobody reads would fill and block it
  # More epochs than any machine trains while the test runs: it ends the run.
  num_epochs = 100_000
  with log.open('w') as log_file:
    training = subprocess.Popen(_main(workdir, digits_data_dir, num_epochs), cwd=REPO,
                                env=env, stdout=subprocess.DEVNULL, stderr=log_file)
  try:
    # Under way once a latest and a best checkpoint are finalized: the readers
    # have something to read from the start. (The deadlines of this test are
    # safety nets; its waits end at events and counts.)
    deadline = time.time() + 300
    while training.poll() is None and time.time() < deadline and not (
        _finalized(workdir / checkpoints.LATEST) and _finalized(workdir / checkpoints.BEST)):
      time.sleep(0.05)
    assert training.poll() is None, log.read_text()[-3000:]
    assert _finalized(workdir / checkpoints.LATEST) and _finalized(workdir / checkpoints.BEST)

    started = time.time()
    second = subprocess.run(_main(workdir, digits_data_dir, num_epochs), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode != 0
    assert f'{workdir} is in use by another run (PID {training.pid} on host' in second.stderr
    assert 'Decoding' not in second.stderr  # refused before any work
    # Not after waiting for the lock (held for the whole run): the first run
    # is still going. (A refusal takes 3-15 s here, imports included; a run
    # that waited for the lock would hang until the timeout above.)
    assert time.time() - started < 60
    assert training.poll() is None, log.read_text()[-3000:]

    # Readers while the run saves and deletes a checkpoint every epoch, until
    # they have read 20 times and seen 3 epochs' checkpoints.
    epochs_seen = set()
    deadline = time.time() + 600
    reads = 0
    while (reads < 20 or len(epochs_seen) < 3) and time.time() < deadline and (
        training.poll() is None):
      for which in ('latest', 'best'):
        _, meta = checkpoints.load_checkpoint(workdir, which)
        epochs_seen.add(meta.epoch)
        reads += 1
      if reads % 10 == 0:
        report = evaluate.evaluate_run(workdir, 'best', figures=False)
        assert report['num_images'] == 270
    assert training.poll() is None, log.read_text()[-3000:]
    assert reads >= 20 and len(epochs_seen) >= 3, (reads, epochs_seen)
  finally:
    training.send_signal(signal.SIGKILL)
    training.wait(timeout=60)
  # The OS dropped the killed run's lock: the workdir is free.
  with workdir_lock.RunLock(workdir):
    pass
