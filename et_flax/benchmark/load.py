"""Something else using the cores while a benchmark times steps (`--load`).

  --load=none      nothing (the default)
  --load=busy:N    N processes, each a busy Python loop (one core each)
  --load=et_flax   a second process training plain E.T. with et_flax
                   (configs/default.py, batch 128, no augmentation, its
                   'auto' settings and the benchmark's --deterministic)
                   step after step
  --load=keras     the same model trained by Keras in a second process

The load starts before the timed steps, is running (the training ones past
compiling) when they begin, and is stopped, by its process IDs, when they
end: ours and Keras's steps are timed under the same load in the same run.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator

from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[2]
READY = 'stepping'
START_SECONDS = 600  # to compile the second process's step, on a loaded machine
SETTLE_SECONDS = 3.0  # for the free-core measurement to see the load


def define_flag() -> None:
  flags.DEFINE_string('load', 'none', 'What else runs on the cores while the steps are '
                      "timed: 'none', 'busy:N' (N busy loops), 'et_flax' or 'keras' (a "
                      'second process training plain E.T.; et_flax/benchmark/load.py).')


def parse(load: str) -> tuple[str, int]:
  """('none' | 'busy' | 'et_flax' | 'keras', the number of processes)."""
  if load in ('none', 'et_flax', 'keras'):
    return load, 0 if load == 'none' else 1
  match = re.fullmatch(r'busy:(\d+)', load)
  if not match or int(match.group(1)) < 1:
    raise ValueError(f"--load must be 'none', 'busy:N' (N >= 1), 'et_flax' or 'keras', "
                     f'got {load!r}')
  return 'busy', int(match.group(1))


def describe(load: str) -> str:
  kind, count = parse(load)
  return {'none': 'nothing else running',
          'busy': f'{count} busy loop{"s" if count > 1 else ""} beside it',
          'et_flax': 'a second et_flax training process beside it',
          'keras': 'a second Keras training process beside it'}[kind]


def _command(kind: str, deterministic: str) -> list[str]:
  if kind == 'busy':
    return [sys.executable, '-c', f'print({READY!r}, flush=True)\nwhile True: pass']
  return [sys.executable, '-m', 'et_flax.benchmark.load', kind, deterministic]


@contextlib.contextmanager
def running(load: str, deterministic: str = 'auto') -> Iterator[None]:
  """Runs `load` (see the module docstring) for the duration of the block;
  a second et_flax process with `deterministic` (settings.configure_determinism)."""
  kind, count = parse(load)
  processes = []
  try:
    for _ in range(count):
      processes.append(subprocess.Popen(
          _command(kind, deterministic), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
          text=True, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'}))
    deadline = time.monotonic() + START_SECONDS
    for process in processes:
      _wait_ready(process, deadline)
    if processes:
      time.sleep(SETTLE_SECONDS)
    yield
  finally:
    for process in processes:
      process.kill()
      process.wait(timeout=30)


def _wait_ready(process: subprocess.Popen, deadline: float) -> None:
  while True:
    left = deadline - time.monotonic()
    if left <= 0:
      raise RuntimeError(f'the load process {process.args} did not start stepping '
                         f'within {START_SECONDS} s')
    ready, _, _ = select.select([process.stdout], [], [], left)
    if not ready:
      continue
    line = process.stdout.readline()
    if not line:
      raise RuntimeError(f'the load process {process.args} exited with '
                         f'{process.wait()} before stepping')
    if line.strip() == READY:
      return


def _train_forever(kind: str, deterministic: str) -> None:
  """Plain E.T.'s train step at batch 128, 64x64, forever (et_flax's or Keras's)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from et_flax import config_files  # pylint: disable=import-outside-toplevel
  from et_flax import settings as settings_lib  # pylint: disable=import-outside-toplevel
  from et_flax.benchmark import steps  # pylint: disable=import-outside-toplevel
  from et_flax.cpu import host_memory  # pylint: disable=import-outside-toplevel

  config = config_files.load('default')
  config.augment.preset = 'none'
  if kind == 'keras':
    rng = np.random.default_rng(0)
    batch = {'image': rng.integers(0, 256, (128, 64, 64, 3), dtype=np.uint8),
             'label': rng.integers(0, 200, 128).astype(np.int32)}
    _, timers = steps.time_keras(config, batch, 200, steps=1, warmup=1)
    step = timers['keras']
  else:
    host_memory.configure('auto')  # as a training run does
    settings_lib.configure_determinism(deterministic)
    step = steps.time_steps(config, settings_lib.resolve(config), 128, 64, 200, steps=1,
                            warmup=1)['train_once']
  print(READY, flush=True)
  while True:
    jax.block_until_ready(step())


if __name__ == '__main__':
  _train_forever(*sys.argv[1:3])
