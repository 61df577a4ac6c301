"""XLA:CPU's step buffers: pages kept between steps (`--host_memory`).

XLA:CPU gives each execution of a step one temporary buffer (the step's
activations and gradients) and frees it when the step ends. glibc serves an
allocation above 32 MB with a fresh mmap and returns it at free, so every
step the kernel maps and zeroes those pages again: E.T. with batch norm at
batch 128 has a 2.6 GB buffer, 632k page faults and 1.3-1.6 s of system time
in a 2.3-2.7 s step; ResNet50 at batch 32, 338 MB and 82k faults
(docs/performance.md). TensorFlow keeps its memory in its own pool.

'reuse' keeps the pages in the process: glibc serves large allocations from
its main heap and never returns freed memory to the system (`mallopt`), and
JAX's CPU client runs each step on the calling thread (its worker threads'
heaps would still map afresh). Steps then fault no pages; the process holds
its peak memory between steps, and at times one more step-sized region when
a small allocation splits the freed buffer (docs/performance.md).

  --host_memory=auto     'reuse' for steps on one CPU device, on Linux with
                         glibc, when JAX's backends have not started yet
                         (et_flax.main, et_flax.reproduce, et_flax.benchmark
                         and the notebooks call `configure` first), else
                         'release', said in one log line
  --host_memory=reuse    as above, or an error where it cannot be done
  --host_memory=release  the system's defaults
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pkgutil
import platform
import re
import sys
from collections.abc import Iterator
from importlib import metadata

import jax
from absl import flags
from absl import logging
from jax._src import xla_bridge

MODES = ('auto', 'reuse', 'release')
# glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_applied: str | None = None  # what `configure` did in this process


def define_flag() -> None:
  """--host_memory, for the commands that run steps."""
  flags.DEFINE_enum('host_memory', 'auto', MODES,
                    "XLA:CPU's per-step buffers: 'reuse' keeps their pages between "
                    "steps (no page faults; steps run on the calling thread), "
                    "'release' returns them to the system; 'auto' reuses on Linux "
                    "with glibc (et_flax/cpu/host_memory.py).")


def _unavailable_reason() -> str | None:
  """Why 'reuse' cannot be done in this process, if it cannot."""
  libc = platform.libc_ver()[0]
  if not sys.platform.startswith('linux') or libc != 'glibc':
    return f'needs Linux with glibc, this is {sys.platform} with {libc or "another libc"}'
  if xla_bridge.backends_are_initialized():
    return ("JAX's backends have already started (configure it before the first "
            "use of JAX, as the commands do)")
  return None


def _accelerator_plugins() -> list[str]:
  """JAX's installed accelerator plugins (as `xla_bridge.discover_pjrt_plugins`
  finds them), and libtpu."""
  names = {entry.name for entry in metadata.entry_points(group='jax_plugins')}
  spec = importlib.util.find_spec('jax_plugins')
  if spec is not None and spec.submodule_search_locations:
    names |= {name for _, name, _ in pkgutil.iter_modules(spec.submodule_search_locations)}
  if importlib.util.find_spec('libtpu') is not None:
    names.add('libtpu')
  return sorted(names)


def _cpu_devices() -> int:
  """The CPU backend's device count, as configured before it starts."""
  if jax.config.jax_num_cpu_devices > 0:
    return jax.config.jax_num_cpu_devices
  match = re.search(r'--xla_force_host_platform_device_count=(\d+)',
                    os.environ.get('XLA_FLAGS', ''))
  return int(match.group(1)) if match else 1


def _no_gain_reason() -> str | None:
  """Why 'auto' leaves the defaults where reusing would not help the steps."""
  platforms = [p for p in (jax.config.jax_platforms or '').split(',') if p]
  if platforms and platforms[0] != 'cpu':
    return f'the steps run on {platforms[0]} (jax_platforms), not on the CPU'
  plugins = _accelerator_plugins()
  if not platforms and plugins:
    return (f'an accelerator plugin is installed ({", ".join(plugins)}), so the steps '
            'are expected to run there')
  if _cpu_devices() > 1:
    return (f'the CPU backend has {_cpu_devices()} devices, whose steps run on worker '
            "threads (whose heaps would map afresh anyway)")
  return None


def configure(mode: str) -> str:
  """Applies `mode` to this process and returns what holds: 'reuse' or 'release'.

  'auto' reuses where it can and where the steps run on one CPU device (no
  accelerator plugin installed, `jax_platforms` unset or 'cpu', no forced
  CPU device count above 1), and says in one log line why not otherwise.

  Raises:
    ValueError: `mode` is not one of MODES, or is 'reuse' where it cannot be
      done, or 'release' after 'reuse' (which cannot be undone).
  """
  global _applied
  if mode not in MODES:
    raise ValueError(f'--host_memory must be one of {list(MODES)}, got {mode!r}')
  if _applied == 'reuse' or mode == 'release':
    if _applied == 'reuse' and mode == 'release':
      raise ValueError("--host_memory=release: this process already reuses host "
                       "memory, which cannot be undone")
    _applied = _applied or 'release'
    return _applied
  reason = _unavailable_reason() or (_no_gain_reason() if mode == 'auto' else None)
  if reason:
    if mode == 'reuse':
      raise ValueError(f'--host_memory=reuse {reason}')
    logging.info("Host memory: XLA:CPU's step buffers are released after each step: "
                 "--host_memory=auto, and %s.", reason)
    _applied = 'release'
    return _applied
  libc = ctypes.CDLL(None)
  # M_TRIM_THRESHOLD takes an int that glibc reads as a size_t: -1, never trim.
  for option, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)):
    if libc.mallopt(option, value) != 1:
      raise RuntimeError(f'glibc mallopt({option}, {value}) failed')
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  logging.info("Host memory: XLA:CPU's step buffers keep their pages between steps "
               "(--host_memory=%s).", mode)
  _applied = 'reuse'
  return _applied


def applied() -> str | None:
  """What `configure` made of this process: 'reuse', 'release', or None
  before it ran."""
  return _applied


@contextlib.contextmanager
def preserved() -> Iterator[None]:
  """`applied()` as it is now, again at exit, for a process that runs a
  command inside itself and goes on (a test). 'reuse' applied inside stays:
  it cannot be undone."""
  global _applied
  saved = _applied
  try:
    yield
  finally:
    if _applied != 'reuse':
      _applied = saved
