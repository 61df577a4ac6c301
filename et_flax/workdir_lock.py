"""OS file locks on a workdir: one training run at a time, safe readers.

`RunLock` is held by a training run for its whole life (by process 0 of a
multi-process run): a second run on the same workdir is refused at once,
naming the holder. The OS drops the lock when its process ends, however it
ends (SIGKILL included), so a killed run never leaves a stale lock.

`checkpoint_access` orders checkpoint readers (evaluate, predict, compare,
warm starts) and the writer: a save, which also deletes the checkpoints past
`max_to_keep`, takes the lock exclusively; a read takes it shared, so a
reader never sees a checkpoint deleted under it.

Both are `flock` locks, which Linux also provides on NFS (as POSIX locks).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
from collections.abc import Iterator

RUN_LOCK_FILE = '.run.lock'
CHECKPOINT_LOCK_FILE = '.checkpoints.lock'


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir."""


class RunLock:
  """The exclusive lock of a training run on its workdir."""

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / RUN_LOCK_FILE
    self._fd: int | None = None
    self._created_workdir = False

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirBusyError naming the holder."""
    self._created_workdir = not self.workdir.exists()
    if not self._created_workdir and not self.workdir.is_dir():
      raise NotADirectoryError(
          f'The workdir {self.workdir} exists and is not a folder; '
          'pass a folder (new or from an earlier run) as --workdir')
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
      raise OSError(error.errno, f'Cannot create the lock file {self.path} of the '
                    f'workdir: {error.strerror}') from error
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirBusyError(
          f'{self.workdir} is in use by another run ({holder}); wait for it to end, '
          'or use another --workdir') from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({
        'pid': os.getpid(), 'host': socket.gethostname(),
        'since': datetime.datetime.now().isoformat(timespec='seconds')}).encode())
    self._fd = fd

  def release(self) -> None:
    """Drops the lock; a run that wrote nothing leaves nothing behind.

    The lock file of a workdir that holds nothing else is removed, and so is
    the workdir if this lock created it.
    """
    if self._fd is None:
      return
    if [p.name for p in self.workdir.iterdir()] == [RUN_LOCK_FILE]:
      self.path.unlink()
      if self._created_workdir:
        self.workdir.rmdir()
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> RunLock:
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  text = os.pread(fd, 4096, 0).decode(errors='replace')
  try:
    holder = json.loads(text)
    return f'PID {holder["pid"]} on host {holder["host"]}, since {holder["since"]}'
  except (ValueError, KeyError, TypeError):
    return 'a process that has not yet written its PID'


@contextlib.contextmanager
def checkpoint_access(workdir: str | os.PathLike, *, exclusive: bool) -> Iterator[None]:
  """Holds the workdir's checkpoint lock: exclusive to write, shared to read.

  A reader of a workdir without the lock file (never trained by this
  version, or read-only) has no writer to wait for and reads unlocked.
  """
  path = pathlib.Path(workdir) / CHECKPOINT_LOCK_FILE
  if exclusive:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  else:
    try:
      fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
      yield
      return
  try:
    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    yield
  finally:
    os.close(fd)  # closing drops the lock
