"""Signals are counted as they arrive, even while a long C call holds the main thread."""

import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# Safety nets only: each wait ends at its event, seconds at most here.
TIMEOUT = 120

# A stand-in for a long training step: a C call (pthread_cond_wait, through
# ctypes, which releases the GIL) that keeps the main thread out of the
# interpreter, where Python's own handler cannot run, until the test writes
# a line to stdin; a signal does not end it, as it does not end a long XLA
# or BLAS call. A helper thread says 'step under way' only once the main
# thread waits in C: it can take the mutex only once pthread_cond_wait has
# released it. So the step lasts exactly as long as the test wants, on any
# machine.
SCRIPT = '''
import ctypes, sys, threading
from et_flax import interrupts

libc = ctypes.CDLL(None)
mutex, cond = (ctypes.c_int64 * 16)(), (ctypes.c_int64 * 16)()  # >= their sizes, aligned
assert libc.pthread_mutex_init(mutex, None) == 0 and libc.pthread_cond_init(cond, None) == 0
released = False

def announce_then_release():
  global released
  libc.pthread_mutex_lock(mutex)  # free once the main thread waits in C
  print('step under way', flush=True)
  libc.pthread_mutex_unlock(mutex)
  sys.stdin.readline()
  libc.pthread_mutex_lock(mutex)
  released = True
  libc.pthread_cond_signal(cond)
  libc.pthread_mutex_unlock(mutex)

def step():
  libc.pthread_mutex_lock(mutex)
  threading.Thread(target=announce_then_release, daemon=True).start()
  while not released:  # a spurious wake-up is no end of the step
    libc.pthread_cond_wait(cond, mutex)
  libc.pthread_mutex_unlock(mutex)

with interrupts.StopRequests() as stop:
  stop.training = True
  step()
  print('step ended', flush=True)
  if stop.requested(0) is not None:
    print('stopped at a step boundary', flush=True)
'''


def _wait_for(path, text, process):
  """Whether `text` shows in `path` before `process` ends (or TIMEOUT passes)."""
  deadline = time.time() + TIMEOUT
  while time.time() < deadline:
    if text in path.read_text():
      return True
    if process.poll() is not None:
      return text in path.read_text()
    time.sleep(0.01)
  return False


@pytest.mark.slow
def test_a_signal_is_acknowledged_at_once_and_a_second_stops_at_once(tmp_path):
  """Both within one step that never ends unless the test ends it."""
  out, err = tmp_path / 'out', tmp_path / 'err'
  with out.open('w') as stdout, err.open('w') as stderr:
    process = subprocess.Popen([sys.executable, '-c', SCRIPT], cwd=REPO, stdin=subprocess.PIPE,
                               stdout=stdout, stderr=stderr)
  try:
    assert _wait_for(out, 'step under way', process), err.read_text()
    process.send_signal(signal.SIGINT)
    # Acknowledged while the step runs, not at its end: the step is still
    # under way, as the test has not ended it.
    assert _wait_for(err, 'SIGINT: stopping after this step', process), (
        f'not acknowledged while the step ran:\n{err.read_text()}')
    assert process.poll() is None, err.read_text()
    process.send_signal(signal.SIGINT)
    # The second stops the process, again within the step.
    try:
      code = process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      code = None
    assert code == 130, f'the second SIGINT did not stop the step:\n{err.read_text()}'
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
    process.stdin.close()
  assert 'SIGINT again: stopping now, without saving' in err.read_text()
  assert 'step ended' not in out.read_text()
  assert 'stopped at a step boundary' not in out.read_text()
