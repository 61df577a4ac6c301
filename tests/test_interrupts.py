"""Signals are counted as they arrive, even while a long C call holds the main thread."""

import os
import pathlib
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent

# A stand-in for a long training step: matrix products that keep the main
# thread in C (BLAS) for seconds, where Python's own handler cannot run.
SCRIPT = '''
import sys, time
import numpy as np
from et_flax import interrupts
a = np.ones((6000, 6000))
with interrupts.StopRequests() as stop:
  stop.training = True
  start = time.time()
  a @ a
  print(f'step {time.time() - start:.1f} s', flush=True)
  while True:
    a @ a
    if stop.requested(0) is not None:
      print('stopped at a step boundary', flush=True)
      break
'''


def _wait_for(path, text, timeout):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if text in path.read_text():
      return True
    time.sleep(0.01)
  return False


def test_a_signal_is_acknowledged_at_once_and_a_second_stops_at_once(tmp_path):
  out, err = tmp_path / 'out', tmp_path / 'err'
  with out.open('w') as stdout, err.open('w') as stderr:
    process = subprocess.Popen([sys.executable, '-c', SCRIPT], cwd=REPO, stdout=stdout,
                               stderr=stderr, env={**os.environ, 'OMP_NUM_THREADS': '1'})
  try:
    assert _wait_for(out, 'step ', 120), err.read_text()
    step_seconds = float(out.read_text().split()[1])
    assert step_seconds > 3  # else the test could not tell the watcher from Python's handler
    process.send_signal(signal.SIGINT)
    signalled = time.time()
    # Acknowledged while the product runs, not at its end.
    assert _wait_for(err, 'SIGINT: stopping after this step', 2), err.read_text()
    assert time.time() - signalled < step_seconds / 2
    process.send_signal(signal.SIGINT)
    signalled = time.time()
    assert process.wait(timeout=10) == 130
    assert time.time() - signalled < step_seconds / 2
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  assert 'SIGINT again: stopping now, without saving' in err.read_text()
  assert 'stopped at a step boundary' not in out.read_text()
