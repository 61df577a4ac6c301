"""SIGINT and SIGTERM during training: stop at a step boundary, save, exit.

Ctrl-C (SIGINT) and a scheduler's SIGTERM (sent before preempting a job)
become a request that the training loop reads between steps: it saves a
checkpoint where it stands and raises `TrainingInterrupted`. A second Ctrl-C
stops at once, without saving. The signals are handled here rather than left
to Python's KeyboardInterrupt, which TensorFlow can swallow (in its
garbage-collection hooks) so that training runs on.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

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

  def __enter__(self) -> StopRequests:
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signum is not None:
      sys.stderr.write(f'\n{name} again: stopping now, without saving\n')
      sys.stderr.flush()
      if 'ipykernel' in sys.modules:  # a notebook's kernel must live on
        raise KeyboardInterrupt
      os._exit(128 + signum)
    if not self.training:
      raise TrainingInterrupted(signum, f'{name} before training began: stopped, '
                                'nothing to save')
    self.signum = signum
    sys.stderr.write(f'\n{name}: stopping after this step and saving a checkpoint '
                     '(Ctrl-C again to stop at once, without saving)\n')
    sys.stderr.flush()

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
