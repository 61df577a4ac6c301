"""An exclusive OS file lock for preparing shared data once.

Processes that prepare the same data (the hosts of a multi-host run, or two
runs started at once on shared storage) take the lock in turn: the first
prepares, the others wait, then find the data prepared. The lock is an
`flock` on a lock file, which the OS drops when its holder ends however it
ends (SIGKILL included), so a killed preparer never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
from collections.abc import Iterator

from et_flax import console


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str) -> Iterator[None]:
  """Holds an exclusive lock on `path` (created if missing), waiting for others.

  Args:
    path: the lock file; its folder is created if missing.
    what: what the lock guards, for the line logged while waiting.

  Raises:
    OSError: the lock file cannot be created (a read-only folder, say); the
      message names it.
  """
  path = pathlib.Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0o666 less the umask: other users of a shared folder can lock it too.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
  except OSError as error:
    raise OSError(error.errno, f'Cannot create the lock file {path} that guards the '
                  f'preparation of {what}: {error.strerror}. Prepare it once where '
                  'the folder is writable, or choose a writable folder') from error
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      console.info('Waiting for another process to finish preparing %s (lock %s)',
                   what, path)
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # closing drops the lock
