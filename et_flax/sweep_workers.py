"""Many workers, one sweep: claims, each worker's share of the devices, the
longest-first order, and the launcher of `reproduce --workers=N`.

A worker claims a run by an exclusive `flock` on <workdir>/.claims/<name>.lock
for as long as it trains and evaluates it (the run's own RunLock is taken by
train.train_and_evaluate inside, and one process cannot hold that lock twice).
The OS drops a claim when its worker ends however it ends (SIGKILL
included), so a dead worker's run is free for the next worker that looks,
which resumes it from its checkpoints. Every worker holds the sweep root's run
lock shared: workers share the root; a training run there is refused, and
refuses them. Workers may run on several machines over shared storage where
`flock` works (Linux's NFS client provides it).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import heapq
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from et_flax import console
from et_flax import workdir_lock

CLAIMS_DIR = '.claims'
STATUS_LOCK = '.status.lock'
TABLE_LOCK = '.table.lock'
ESTIMATE_FILE = 'estimate.json'
# Set by the launcher in each worker's environment: "<index>/<count>" and
# the CPU cores the worker runs on ("0-3,8").
WORKER_ENV = 'ET_FLAX_WORKER'
CORES_ENV = 'ET_FLAX_WORKER_CORES'
# The launcher's PID, in each worker's environment (`stop_with_launcher`).
LAUNCHER_ENV = 'ET_FLAX_LAUNCHER'
LAUNCHER_POLL_SECONDS = 0.5
# JAX's own default share of a GPU's memory, split between the workers on it.
GPU_MEMORY_FRACTION = 0.75
# A worker with nothing left to claim looks this often for a run another
# worker dropped (it died) until every run is settled.
POLL_SECONDS = 1.0
# After Ctrl-C or SIGTERM, how long the launcher waits for its workers to save
# before it kills them (their runs resume from the last checkpoint).
STOP_SECONDS = 300.0


@contextlib.contextmanager
def locked(path: pathlib.Path) -> Iterator[None]:
  """Holds an exclusive `flock` on `path` (created if missing), waiting for it."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # closing drops the lock


def _holder() -> bytes:
  return json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                     'since': datetime.datetime.now().isoformat(timespec='seconds'),
                     'worker': worker_label()}).encode()


@contextlib.contextmanager
def hold_sweep(workdir: pathlib.Path) -> Iterator[None]:
  """Holds the sweep root's run lock shared, or raises WorkdirBusyError.

  Any number of workers (and launchers) hold it together; a training run
  with the root as its workdir, which takes it exclusively, is refused while
  they do, and refuses them.
  """
  if workdir.exists() and not workdir.is_dir():
    raise NotADirectoryError(f'The workdir {workdir} exists and is not a folder; pass a '
                             'folder (new or from an earlier sweep) as --workdir')
  workdir.mkdir(parents=True, exist_ok=True)
  fd = os.open(workdir / workdir_lock.RUN_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      raise workdir_lock.WorkdirBusyError(
          f'{workdir} is in use by a training run, not a sweep '
          f'({workdir_lock._read_holder(fd)}); use another --workdir') from None  # pylint: disable=protected-access
    os.pwrite(fd, _holder().ljust(256), 0)  # for a run refused here to name one of us
    yield
  finally:
    os.close(fd)


class Claim:
  """A worker's hold on one run of the sweep (see the module's docstring)."""

  def __init__(self, workdir: pathlib.Path, name: str):
    self.path = workdir / CLAIMS_DIR / f'{name}.lock'
    self._fd: int | None = None

  def try_acquire(self) -> bool:
    """Takes the claim if no worker holds it; False if one does."""
    self.path.parent.mkdir(exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      return False
    os.ftruncate(fd, 0)
    os.write(fd, _holder())
    self._fd = fd
    return True

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> Claim:
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def holder_of(workdir: pathlib.Path, name: str) -> dict[str, Any] | None:
  """Who last claimed a run (PID, host, since, worker), or None."""
  try:
    return json.loads((workdir / CLAIMS_DIR / f'{name}.lock').read_text())
  except (OSError, ValueError):
    return None


# ---------------------------------------------------------------------------
# Devices: each worker's share.

def split_cores(cores: Sequence[int], workers: int) -> list[list[int]]:
  """`cores` in `workers` runs of consecutive cores, as even as they go.

  Raises:
    ValueError: more workers than cores.
  """
  cores = sorted(cores)
  if workers > len(cores):
    raise ValueError(f'--workers={workers}: this machine gives this process '
                     f'{len(cores)} CPU cores, and each worker needs one of its own')
  size, extra = divmod(len(cores), workers)
  shares, start = [], 0
  for index in range(workers):
    end = start + size + (index < extra)
    shares.append(cores[start:end])
    start = end
  return shares


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
  """The GPUs JAX would see here (their CUDA_VISIBLE_DEVICES ids), without
  starting JAX (which would take the launcher a share of each GPU's memory)."""
  environ = os.environ if environ is None else environ
  platforms = environ.get('JAX_PLATFORMS', '')
  if platforms and not {'cuda', 'gpu'} & set(platforms.split(',')):
    return []
  if 'CUDA_VISIBLE_DEVICES' in environ:
    return [d for d in environ['CUDA_VISIBLE_DEVICES'].split(',') if d.strip()]
  if shutil.which('nvidia-smi') is None:
    return []
  try:
    listing = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True,
                             timeout=60, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith('GPU ')]


def _core_list(cores: Sequence[int]) -> str:
  """'0-3,8' for [0, 1, 2, 3, 8]."""
  spans: list[list[int]] = []
  for core in sorted(cores):
    if spans and core == spans[-1][1] + 1:
      spans[-1][1] = core
    else:
      spans.append([core, core])
  return ','.join(str(a) if a == b else f'{a}-{b}' for a, b in spans)


def parse_core_list(text: str) -> list[int]:
  cores = []
  for part in text.split(','):
    first, _, last = part.partition('-')
    cores += range(int(first), int(last or first) + 1)
  return cores


def worker_environments(workers: int, *, gpus: Sequence[str], cores: Sequence[int],
                        workers_per_device: int = 1) -> list[dict[str, str]]:
  """Each worker's environment variables: its GPU and share of the GPU's
  memory, or its CPU cores and the threads it may run on them.

  On GPUs worker i takes GPU i // workers_per_device; the workers on a GPU
  share GPU_MEMORY_FRACTION of its memory. On CPUs the cores are split
  (`split_cores`) and each worker runs OpenMP's team (oneDNN), XLA's and
  tf.data's threads on its own cores only (they size their pools by the
  cores a process may run on).

  Raises:
    ValueError: more workers than the devices take.
  """
  if workers_per_device < 1:
    raise ValueError(f'--workers_per_device={workers_per_device}: give 1 or more')
  environments = []
  if gpus:
    if workers > len(gpus) * workers_per_device:
      raise ValueError(
          f'--workers={workers}: {len(gpus)} GPU{"s" * (len(gpus) != 1)} here take at most '
          f'{len(gpus) * workers_per_device} workers at --workers_per_device='
          f'{workers_per_device}; raise it to share each GPU between more workers')
    for index in range(workers):
      device = index // workers_per_device
      sharing = sum(1 for i in range(workers) if i // workers_per_device == device)
      environment = {'CUDA_VISIBLE_DEVICES': gpus[device]}
      if sharing > 1:
        environment['XLA_PYTHON_CLIENT_MEM_FRACTION'] = f'{GPU_MEMORY_FRACTION / sharing:.3f}'
      environments.append(environment)
  else:
    if workers_per_device != 1:
      raise ValueError('--workers_per_device shares a GPU between workers, and no GPU is '
                       'visible here; on CPUs the workers split the cores')
    for share in split_cores(cores, workers):
      environments.append({CORES_ENV: _core_list(share), 'OMP_NUM_THREADS': str(len(share))})
  for index, environment in enumerate(environments, 1):
    environment[WORKER_ENV] = f'{index}/{workers}'
  return environments


def take_cores() -> None:
  """Keeps this process on the cores its launcher gave it (CORES_ENV), before
  JAX, oneDNN or TensorFlow size their thread pools."""
  if os.environ.get(CORES_ENV):
    os.sched_setaffinity(0, parse_core_list(os.environ[CORES_ENV]))


def stop_with_launcher() -> None:
  """Sends this worker one SIGTERM when its launcher dies, however it dies
  (SIGKILL included), so that the worker saves and stops as on Ctrl-C
  rather than train on alone, its output going nowhere. A daemon thread
  looks for the launcher as this process's parent every LAUNCHER_POLL_SECONDS
  (Linux's parent-death signal comes once for each of the launcher's
  threads, and a second SIGTERM stops a run without saving). Nothing for a
  process the launcher did not start."""
  launcher = os.environ.get(LAUNCHER_ENV)
  if not launcher:
    return

  def watch() -> None:
    while os.getppid() == int(launcher):
      time.sleep(LAUNCHER_POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=watch, name='et_flax-launcher-watch', daemon=True).start()


def worker_label() -> str:
  """'2/4' from the launcher, the SLURM task, or the PID."""
  if os.environ.get(WORKER_ENV):
    return os.environ[WORKER_ENV]
  for name in ('SLURM_ARRAY_TASK_ID', 'SLURM_PROCID'):
    if os.environ.get(name):
      return f'{name}={os.environ[name]}'
  return f'PID {os.getpid()}'


def describe_worker() -> str:
  """One line: this worker, its process, and the devices it runs on."""
  import jax  # pylint: disable=import-outside-toplevel
  devices = jax.local_devices()
  if devices[0].platform == 'cpu':
    cores = sorted(os.sched_getaffinity(0))
    where = (f'CPU cores {_core_list(cores)} ({len(cores)}), OMP_NUM_THREADS='
             f'{os.environ.get("OMP_NUM_THREADS", "unset")}')
  else:
    where = ', '.join(f'{d.platform}:{d.id} ({d.device_kind})' for d in devices)
    where += ''.join(f', {name}={os.environ[name]}' for name in
                     ('CUDA_VISIBLE_DEVICES', 'XLA_PYTHON_CLIENT_MEM_FRACTION')
                     if name in os.environ)
  return f'Worker {worker_label()} (PID {os.getpid()} on {socket.gethostname()}): {where}'


# ---------------------------------------------------------------------------
# Longest first.

# Relative cost of an image through each model at 64x64 (plain E.T. 1), from
# the per-image training rates docs/reproduce.md's table gives for the 2-core CPU.
MODEL_COST = {'et': 1.0, 'vgg16': 10.0, 'resnet50': 3.5}


def rough_cost(config: Any, quick: bool) -> float:
  """A run's cost in arbitrary units: epochs x training images x the model's
  cost per image (E.T.: width squared, modules over 4) x pixels."""
  classes = config.data.classes
  count = (len(classes) if isinstance(classes, (list, tuple)) else
           int(classes or (10 if quick else 200)))
  model = config.model
  cost = MODEL_COST.get(model.name, 1.0)
  if model.name == 'et':
    cost *= model.width ** 2 * model.num_modules / 4
  return config.num_epochs * count * cost * (config.data.image_size / 64) ** 2


def expected_seconds(configs: Mapping[str, Any], saved: Mapping[str, Any] | None,
                     quick: bool) -> dict[str, float]:
  """Each run's expected time: its epochs at the rate `--estimate` saved
  (`saved`: run name to its estimate), else `rough_cost`, scaled to seconds
  by the saved runs where there are some."""
  rough = {name: rough_cost(config, quick) for name, config in configs.items()}
  if quick or not saved:
    return rough
  measured = {name: saved[name]['epoch_seconds'] * config.num_epochs
              for name, config in configs.items() if name in saved}
  ratios = sorted(measured[n] / rough[n] for n in measured if rough[n] > 0)
  scale = ratios[len(ratios) // 2] if ratios else 1.0
  return {name: measured.get(name, rough[name] * scale) for name in configs}


def load_estimate(workdir: pathlib.Path | None) -> dict[str, Any] | None:
  """The run estimates `--estimate --workdir=...` saved there, by run name."""
  path = None if workdir is None else workdir / ESTIMATE_FILE
  if path is None or not path.exists():
    return None
  return {e['run']: e for e in json.loads(path.read_text())['runs']}


def schedule_seconds(seconds: Sequence[float], workers: int) -> float:
  """The wall time of `seconds` of runs over `workers`, longest first: each
  run goes to the worker that frees up first."""
  ends = [0.0] * workers
  for length in sorted(seconds, reverse=True):
    heapq.heapreplace(ends, ends[0] + length)
  return max(ends)


# ---------------------------------------------------------------------------
# The launcher.

def launch(command: Sequence[str], environments: Sequence[Mapping[str, str]],
           stop_seconds: float = STOP_SECONDS) -> tuple[list[int], int | None]:
  """Runs one worker process per environment until all have ended.

  Each worker's output comes through with its number in front. Ctrl-C or
  SIGTERM here goes to every worker (a second one too: they stop at once);
  after `stop_seconds` those still running are killed by PID. A launcher
  killed outright (SIGKILL) leaves each worker one SIGTERM
  (`stop_with_launcher`). Returns each
  worker's exit code (negative: the signal that ended it) and the signal
  that stopped the launcher, if any.
  """
  stopped: list[int] = []
  processes: list[subprocess.Popen] = []

  def forward(signum, frame):
    del frame
    stopped.append(signum)
    for process in processes:
      if process.poll() is None:
        process.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  threads = []
  try:
    for environment in environments:
      if stopped:
        break
      # A session of its own: the terminal's Ctrl-C reaches the launcher
      # only, which passes it on once.
      process = subprocess.Popen(command, env={**os.environ, **environment,
                                               LAUNCHER_ENV: str(os.getpid())},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)
      processes.append(process)
      label = environment[WORKER_ENV].split('/')[0]
      console.info('Worker %s: PID %d, %s', label, process.pid, ', '.join(
          f'{k}={v}' for k, v in environment.items() if k != WORKER_ENV))
      thread = threading.Thread(target=_relay, args=(process.stdout, f'[w{label}] '),
                                daemon=True)
      thread.start()
      threads.append(thread)
    deadline = None
    while any(p.poll() is None for p in processes):
      if stopped and deadline is None:
        deadline = time.monotonic() + stop_seconds
      if deadline is not None and time.monotonic() > deadline:
        for process in processes:
          if process.poll() is None:
            console.warning('Worker PID %d did not stop within %.0f s: killed',
                            process.pid, stop_seconds)
            process.kill()
        break
      time.sleep(0.1)
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    for process in processes:  # an error here: no worker outlives the launcher
      if process.poll() is None:
        process.kill()
      process.wait(timeout=60)
    for thread in threads:
      thread.join(timeout=10)
  return [p.returncode for p in processes], stopped[0] if stopped else None


def _relay(pipe, prefix: str) -> None:
  with pipe:
    for line in iter(pipe.readline, b''):
      sys.stderr.write(prefix + line.decode(errors='replace'))
      sys.stderr.flush()
