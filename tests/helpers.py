"""Helpers the tests share (the fixtures live in conftest.py)."""

import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np

from et_flax.data import fake_data
from et_flax.data import input_pipeline


def counting_split(n):
  """A split of n 1x1 images whose pixel value and label are their index."""
  return input_pipeline.Split(
      images=np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(3, -1),
      labels=np.arange(n, dtype=np.int32), file_names=tuple(map(str, range(n))))


def tiny_config(data_dir, **overrides):
  """The quickstart config shrunk for tests: 8x8 digits, one module, batch 64."""
  from configs import quickstart

  config = quickstart.get_config()
  config.data.data_dir = str(data_dir)
  config.data.image_size = 8
  config.model.num_modules = 1
  config.batch_size = 64
  config.num_epochs = 1
  config.update(overrides)
  return config


def make_tiny_imagenet_tree(root, wnids=('n02', 'n01', 'n03'), train_per_class=4,
                            num_val=5, num_test=3, size=64):
  """A small tree in the official Tiny ImageNet layout (`fake_data`).

  wnids.txt is unsorted, words.txt lists extra synsets, the first training
  image of the first class is a grayscale JPEG, and every image's pixels
  encode its class (so tests can check labels after decoding).
  """
  return fake_data.write_tiny_imagenet_tree(root, wnids, train_per_class, num_val,
                                            num_test, size, pixels='label',
                                            extra_synsets=True)


def run_processes(script, args, log_dir, count=2, timeout=120):
  """Runs `script` (`python -c`) as `count` processes of one JAX run on
  127.0.0.1, one CPU device each: argv is a free port, the process's index,
  then `args`; each writes to `log_dir`/process_<i>.log. Waits at most
  `timeout` s for them all and kills any left. Returns (their exit codes,
  None on a timeout; their outputs)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}
  env.pop('XLA_FLAGS', None)  # one CPU device per process
  logs = [pathlib.Path(log_dir) / f'process_{i}.log' for i in range(count)]
  processes = []
  for i, log in enumerate(logs):
    with log.open('w') as log_file:
      processes.append(subprocess.Popen(
          [sys.executable, '-c', script, str(port), str(i), *map(str, args)],
          cwd=pathlib.Path(__file__).resolve().parent.parent, env=env, stdout=log_file,
          stderr=subprocess.STDOUT))
  try:
    deadline = time.time() + timeout
    codes = [process.wait(timeout=max(1, deadline - time.time())) for process in processes]
  except subprocess.TimeoutExpired:
    codes = None
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  return codes, [log.read_text() for log in logs]
