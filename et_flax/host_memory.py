"""XLA:CPU's step buffers: pages kept between steps (`--host_memory`).

XLA:CPU gives each execution of a step one temporary buffer (the step's
activations and gradients) and frees it when the step ends. glibc serves an
allocation above 32 MB with a fresh mmap and returns it at free, so every
step the kernel maps and zeroes those pages again: E.T. with batch norm at
batch 128 has a 2.6 GB buffer, 632k page faults and 1.3-1.5 s of system time
in a 2.3-2.7 s step; ResNet50 at batch 32, 338 MB and 82k faults
(docs/performance.md). TensorFlow keeps its memory in its own pool.

'reuse' keeps the pages in the process: glibc serves large allocations from
its main heap and never returns freed memory to the system (`mallopt`), and
JAX's CPU client runs each step on the calling thread (its worker threads'
heaps would still map afresh). Steps then fault no pages; peak memory is the
same, and the process holds it between steps.

  --host_memory=auto     'reuse' on Linux with glibc when JAX's backends have
                         not started yet (et_flax.main, et_flax.reproduce and
                         et_flax.benchmark call `configure` first), else
                         'release', said in one log line
  --host_memory=reuse    as above, or an error where it cannot be done
  --host_memory=release  the system's defaults
"""

from __future__ import annotations

import ctypes
import platform
import sys

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
                    "with glibc (et_flax/host_memory.py).")


def _unavailable_reason() -> str | None:
  if not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc':
    return f'needs Linux with glibc, this is {sys.platform} {platform.libc_ver()[0]}'
  if xla_bridge.backends_are_initialized():
    return ("JAX's backends have already started (configure it before the first "
            "use of JAX, as the commands do)")
  return None


def configure(mode: str) -> str:
  """Applies `mode` to this process and returns what holds: 'reuse' or 'release'.

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
  reason = _unavailable_reason()
  if reason:
    if mode == 'reuse':
      raise ValueError(f'--host_memory=reuse {reason}')
    logging.info("Host memory: XLA:CPU's step buffers are released after each step: "
                 "--host_memory=auto %s.", reason)
    _applied = 'release'
    return _applied
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  libc = ctypes.CDLL(None)
  # M_TRIM_THRESHOLD takes an int that glibc reads as a size_t: -1, never trim.
  for option, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)):
    if libc.mallopt(option, value) != 1:
      raise RuntimeError(f'glibc mallopt({option}, {value}) failed')
  logging.info("Host memory: XLA:CPU's step buffers keep their pages between steps "
               "(--host_memory=%s).", mode)
  _applied = 'reuse'
  return _applied
