"""SIGINT and SIGTERM during training: stop at a step boundary, save, exit.

Ctrl-C (SIGINT) and a scheduler's SIGTERM (sent before preempting a job)
become a request that the training loop reads between steps: it saves a
checkpoint where it stands and raises `TrainingInterrupted`. A second Ctrl-C
stops at once, without saving. The signals are handled here rather than left
to Python's KeyboardInterrupt, which TensorFlow can swallow (in its
garbage-collection hooks) so that training runs on.

Python runs a signal handler only when the main thread comes back to the
interpreter, which a long step or input wait delays, and two signals that
arrive before it runs are handled once. So the signals are also counted as
they arrive, through `signal.set_wakeup_fd` (the C handler writes one byte
per signal) and a thread that reads it: the request is acknowledged at once,
and a second Ctrl-C stops at once even while a step runs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from et_flax import console

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Processes of a multi-process run agree on stopping every this many steps (a
# collective each time), so that all stop after the same step.
MULTI_PROCESS_CHECK_EVERY = 10


class TrainingInterrupted(KeyboardInterrupt):
  """The run stopped on a signal, after saving; `exit_code` is 128 + the signal."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum
    self.exit_code = 128 + signum


class StopRequests:
  """Turns SIGINT and SIGTERM into a request read at step boundaries.

  Use as a context manager around the training loop; outside the main
  thread (where Python cannot handle signals) it does nothing.
  """

  def __init__(self):
    self.signum: int | None = None
    # Set when the loop starts: before, there is nothing to save, and a
    # signal stops the run where it is (TrainingInterrupted is raised there).
    self.training = False
    self._previous: dict[int, object] = {}
    self._lock = threading.Lock()
    self._arrivals = 0  # signals counted by the watcher thread
    self._handled = 0  # signals seen by the Python handler
    self._wakeup: tuple[int, int] | None = None  # (read end, previous wakeup fd)

  def __enter__(self) -> StopRequests:
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
      read_end, write_end = os.pipe()
      os.set_blocking(write_end, False)
      previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
      self._wakeup = (write_end, previous)
      threading.Thread(target=self._watch, args=(read_end,), daemon=True,
                       name='et_flax-signals').start()
    return self

  def __exit__(self, *exc_info) -> None:
    if self._wakeup is not None:
      write_end, previous = self._wakeup
      signal.set_wakeup_fd(previous)
      os.close(write_end)  # the watcher reads the end of the pipe and returns
      self._wakeup = None
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _watch(self, read_end: int) -> None:
    """Counts signals as they arrive (one byte each, written by C's handler)."""
    with os.fdopen(read_end, 'rb', buffering=0) as pipe:
      while data := pipe.read(64):
        for signum in data:
          if signum in SIGNALS:
            self._arrived(signum)

  def _arrived(self, signum: int) -> None:
    with self._lock:
      self._arrivals += 1
      first = self.signum is None
      if first:
        self.signum = signum
      training = self.training
    name = signal.Signals(signum).name
    if first and training:
      console.info('%s: stopping after this step and saving a checkpoint (Ctrl-C again '
                   'to stop at once, without saving)', name)
    elif not first and 'ipykernel' not in sys.modules:  # a notebook's kernel lives on
      console.info('%s again: stopping now, without saving', name)
      os._exit(128 + signum)

  def _handle(self, signum: int, frame) -> None:
    """Python's handler, in the main thread once it is back in the interpreter."""
    del frame
    self._handled += 1
    if self._wakeup is None:  # no watcher (tests call this directly)
      self._arrived(signum)
    if not self.training:
      raise TrainingInterrupted(signum, f'{signal.Signals(signum).name} before training '
                                'began: stopped, nothing to save')
    if self._handled > 1 and 'ipykernel' in sys.modules:
      raise KeyboardInterrupt

  def requested(self, step_in_epoch: int) -> int | None:
    """The signal to stop on, or None: the same answer on every process.

    Several processes compare notes every `MULTI_PROCESS_CHECK_EVERY` steps
    of an epoch (and at its start), all at the same steps.
    """
    if jax.process_count() == 1:
      return self.signum
    if step_in_epoch % MULTI_PROCESS_CHECK_EVERY:
      return None
    signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
    return int(np.max(signums)) or None
