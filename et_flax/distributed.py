"""Processes and devices: starting a multi-host run, the mesh, each host's rows.

A run over several processes is started either by hand, with the arguments
of `jax.distributed.initialize` (every process gets the same coordinator
address and process count, and its own id):

  python -m et_flax.main ... --coordinator_address=10.0.0.1:1234 \
      --num_processes=2 --process_id=0   # and --process_id=1 on the other

or on a cluster that JAX detects (SLURM, Open MPI, Kubernetes...) with
`--config.distributed=True`. Every process must see the same workdir and data
folders (shared storage).
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from et_flax import workdir_lock

# A process that stops sending heartbeats for this long is taken as lost: the
# others then exit (JAX's coordination service names the lost process), rather
# than wait in a collective for JAX's default of 100 s.
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 30


class LaunchError(ValueError):
  """The command line does not describe a valid multi-process launch."""


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins a run: by hand, by cluster detection, or alone."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  auto_detect: bool = False
  heartbeat_timeout_seconds: int = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS
  initialization_timeout_seconds: int = 300

  @property
  def multi_process(self) -> bool:
    return self.auto_detect or self.coordinator_address is not None


def check_launch(coordinator_address: str | None, num_processes: int | None,
                 process_id: int | None, auto_detect: bool,
                 heartbeat_timeout_seconds: int = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
                 initialization_timeout_seconds: int = 300) -> Launch:
  """Checks the launch arguments together, before anything is started."""
  given = {'--coordinator_address': coordinator_address,
           '--num_processes': num_processes, '--process_id': process_id}
  named = [name for name, value in given.items() if value is not None]
  if named and len(named) < len(given):
    missing = [name for name in given if name not in named]
    raise LaunchError(f'{", ".join(named)} given without {", ".join(missing)}: a '
                      'multi-process run by hand needs all three (the same '
                      '--coordinator_address=HOST:PORT and --num_processes for every '
                      'process, and --process_id from 0 to num_processes - 1)')
  if named:
    host, _, port = coordinator_address.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise LaunchError(f'--coordinator_address={coordinator_address!r}: expected '
                        'HOST:PORT, e.g. 10.0.0.1:1234 (the address of process 0)')
    if num_processes < 1:
      raise LaunchError(f'--num_processes={num_processes}: expected 1 or more')
    if not 0 <= process_id < num_processes:
      raise LaunchError(f'--process_id={process_id}: expected 0 to {num_processes - 1} '
                        f'(--num_processes={num_processes})')
  for flag, value in (('--heartbeat_timeout_seconds', heartbeat_timeout_seconds),
                      ('--initialization_timeout_seconds', initialization_timeout_seconds)):
    if value < 1:
      raise LaunchError(f'{flag}={value}: expected a positive number of seconds')
  return Launch(coordinator_address=coordinator_address, num_processes=num_processes,
                process_id=process_id, auto_detect=auto_detect and not named,
                heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                initialization_timeout_seconds=initialization_timeout_seconds)


def initialize(launch: Launch) -> None:
  """Joins the run described by `launch` (nothing to do for a single process)."""
  if not launch.multi_process:
    return
  timeouts = dict(heartbeat_timeout_seconds=launch.heartbeat_timeout_seconds,
                  initialization_timeout=launch.initialization_timeout_seconds)
  if launch.auto_detect:
    try:
      jax.distributed.initialize(**timeouts)
    except ValueError as error:
      raise LaunchError(
          f'config.distributed=True, but JAX detected no cluster ({error}). On a '
          'cluster JAX knows (SLURM, Open MPI, Kubernetes...), start one process per '
          'host through the scheduler; elsewhere pass --coordinator_address, '
          '--num_processes and --process_id') from error
  else:
    jax.distributed.initialize(coordinator_address=launch.coordinator_address,
                               num_processes=launch.num_processes,
                               process_id=launch.process_id, **timeouts)
  logging.info('Process %d of %d, %d local and %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def host_rows(sharding: jax.sharding.Sharding, batch_size: int) -> slice:
  """The rows of a global batch that this process's devices hold.

  With the data axis over every device, each process holds one contiguous
  block of each batch; it reads and feeds only those rows.
  """
  starts, stops = [], []
  for index in sharding.addressable_devices_indices_map((batch_size,)).values():
    rows = index[0]
    starts.append(rows.start or 0)
    stops.append(batch_size if rows.stop is None else rows.stop)
  start, stop = min(starts), max(stops)
  covered = sum(b - a for a, b in set(zip(starts, stops)))
  if covered != stop - start:
    raise AssertionError(f'Process {jax.process_index()} holds rows {sorted(zip(starts, stops))} '
                         f'of a batch of {batch_size}: not one contiguous block')
  return slice(start, stop)


# ---------------------------------------------------------------------------
# The mesh, and batches and state on it.

def make_mesh() -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over every device of every host."""
  # Auto axes: XLA propagates the batch sharding through the step, which then
  # reads exactly as on one device.
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                batch_size: int | None = None) -> dict[str, jax.Array]:
  """This host's rows of a batch of `batch_size` -> global arrays split over 'data'.

  `batch_size` (the global batch) may be left out on a single host.
  """
  sharding = NamedSharding(mesh, P('data'))
  return {k: jax.make_array_from_process_local_data(
              sharding, v, None if batch_size is None else (batch_size, *v.shape[1:]))
          for k, v in batch.items() if k != 'file_name'}


def batch_rows(mesh: jax.sharding.Mesh, batch_size: int) -> slice:
  """The rows of each global batch that this host feeds."""
  return host_rows(NamedSharding(mesh, P('data')), batch_size)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """`tree` as global arrays held whole by every device (as checkpoints need)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


@contextlib.contextmanager
def hold_workdir(workdir: pathlib.Path) -> Iterator[None]:
  """Holds the workdir's run lock (process 0 for all), or raises WorkdirBusyError."""
  lock = workdir_lock.RunLock(workdir)
  error = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except (workdir_lock.WorkdirBusyError, OSError) as caught:
      error = caught
  if jax.process_count() > 1:
    # Every process stops together, with process 0's reason.
    refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if refused and error is None:
      error = workdir_lock.WorkdirBusyError(
          f'{workdir} could not be locked by process 0 (its log says why)')
  if error is not None:
    raise error
  try:
    yield
  finally:
    lock.release()
