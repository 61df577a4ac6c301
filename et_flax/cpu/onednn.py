"""Convolution layers on CPUs through oneDNN, called from XLA with `jax.ffi`.

XLA:CPU's convolution, and above all its two gradients, is the slow part of
an E.T. training step on a CPU (docs/performance.md). oneDNN, the library
TensorFlow uses there, runs a 3x3, 16-channel convolution with both
gradients about 8x faster. `conv_layer` computes
`activation(conv(x, kernel) + bias [+ shortcut])` as one oneDNN call (the
sums and the activation are post-ops of the convolution) under a
`jax.custom_vjp` whose backward pass is one call too; `OneDNNConv`
wraps it as a layer for the models, with `models.Conv`'s parameters. `lax.conv_general_dilated` stays the
reference it is tested against (tests/test_onednn.py) and the path on every
other backend (`config.conv_impl`).

The handlers (et_flax/cpu/csrc/onednn_conv.cc) are compiled at first use with the
system's C++ compiler against the `onednn-cpu-gomp` wheel (the library) and
`onednn-devel-cpu-gomp` (its headers), both installed with et_flax on Linux
x86-64, and jaxlib's FFI headers. The shared library is cached under
$ET_FLAX_CACHE (default ~/.cache/et_flax), keyed by the source, the compiler,
jaxlib and oneDNN, so the build (docs/performance.md gives its time) happens once per machine. Where
it cannot be built or loaded, `config.conv_impl='auto'` falls back to XLA's
convolution with a warning (`available`); 'onednn' fails with the reason.

Float32 only; NHWC activations, HWIO kernels, any stride, explicit or
SAME/VALID padding; no dilation or feature groups.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import importlib.metadata
import math
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import logging
from jax import lax

from et_flax import models

SOURCE = pathlib.Path(__file__).with_name('csrc') / 'onednn_conv.cc'
LIBRARY_DIST = 'onednn-cpu-gomp'
HEADERS_DIST = 'onednn-devel-cpu-gomp'
_TARGETS = {
    'et_onednn_conv_fwd': 'EtOnednnConvFwd',
    'et_onednn_conv_fwd_residual': 'EtOnednnConvFwdResidual',
    'et_onednn_conv_bwd': 'EtOnednnConvBwd',
}
# The handlers' activation codes.
ACTIVATIONS = {'none': 0, 'relu': 1, 'tanh': 2}

_lock = threading.Lock()
_loaded: ctypes.CDLL | None = None


class OneDNNUnavailableError(RuntimeError):
  """The oneDNN convolution cannot be built or loaded on this machine."""


def platform_supported() -> bool:
  """Whether the oneDNN wheels exist for this platform (Linux x86-64)."""
  return sys.platform == 'linux' and platform.machine() in ('x86_64', 'AMD64')


def _dist_file(dist: str, suffix: str) -> pathlib.Path:
  """The installed file of `dist` whose path ends with `suffix`."""
  try:
    files = importlib.metadata.files(dist) or []
  except importlib.metadata.PackageNotFoundError:
    raise OneDNNUnavailableError(
        f'the Python package {dist!r} is not installed; it is a dependency of '
        f'et_flax on Linux x86-64 (pip install {dist}), or set '
        "config.conv_impl='xla'") from None
  for f in files:
    if str(f).replace('\\', '/').endswith(suffix):
      return pathlib.Path(importlib.metadata.distribution(dist).locate_file(f)).resolve()
  raise OneDNNUnavailableError(
      f'the package {dist!r} is installed but has no file ending in {suffix!r}')


def _compiler() -> str:
  """$CXX if set, else g++ or c++ from PATH."""
  wanted = os.environ.get('CXX')
  cxx = shutil.which(wanted) if wanted else (shutil.which('g++') or shutil.which('c++'))
  if not cxx:
    looked = f'$CXX={wanted!r}' if wanted else 'g++ and c++ on PATH'
    raise OneDNNUnavailableError(
        f'no C++ compiler found to build the oneDNN convolution (looked for {looked}); '
        "install one (e.g. apt-get install g++) or set config.conv_impl='xla'")
  return cxx


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get('ET_FLAX_CACHE')
                      or pathlib.Path.home() / '.cache' / 'et_flax')


def _build_command(cxx: str, out: pathlib.Path) -> list[str]:
  lib = _dist_file(LIBRARY_DIST, '/libdnnl.so.3')
  include = _dist_file(HEADERS_DIST, 'include/oneapi/dnnl/dnnl.hpp').parents[2]
  return [cxx, '-O2', '-std=c++17', '-fPIC', '-shared', '-w', str(SOURCE), '-o', str(out),
          f'-I{jax.ffi.include_dir()}', f'-I{include}', str(lib),
          f'-Wl,-rpath,{lib.parent}']


def _versions() -> tuple[str, str]:
  """The oneDNN library's and headers' package versions, which must agree."""
  try:
    library, headers = (importlib.metadata.version(LIBRARY_DIST),
                        importlib.metadata.version(HEADERS_DIST))
  except importlib.metadata.PackageNotFoundError as e:
    raise OneDNNUnavailableError(
        f'the Python package {e.name!r} is not installed; it is a dependency of et_flax '
        f"on Linux x86-64, or set config.conv_impl='xla'") from None
  if library != headers:
    raise OneDNNUnavailableError(
        f'the oneDNN headers ({HEADERS_DIST} {headers}) do not match the library '
        f'({LIBRARY_DIST} {library}); install the same version of both '
        f"(pip install {HEADERS_DIST}=={library}) or set config.conv_impl='xla'")
  return library, headers


def _build_key(cxx: str) -> str:
  """Changes with the source, the whole build command, the compiler's
  version, jaxlib, and the oneDNN library and headers (versions and files)."""
  lib = _dist_file(LIBRARY_DIST, '/libdnnl.so.3')
  compiler = subprocess.run([cxx, '--version'], capture_output=True, text=True,
                            check=False).stdout.splitlines()[:1]
  parts = [SOURCE.read_text(), *compiler, jaxlib.__version__, *_versions(), str(lib),
           str(lib.stat().st_size),
           # The output's name is the key itself: a fixed placeholder stands for it.
           *_build_command(cxx, pathlib.Path('out.so'))]
  return hashlib.sha256('\n'.join(parts).encode()).hexdigest()[:16]


def library_path() -> pathlib.Path:
  """Builds the FFI library unless it is cached; returns its path.

  Raises:
    OneDNNUnavailableError: not Linux x86-64, the oneDNN wheels missing, no
      C++ compiler, or the build failed (its command and errors included).
  """
  if not platform_supported():
    raise OneDNNUnavailableError(
        f'the oneDNN convolution needs Linux x86-64, this is {sys.platform} '
        f"{platform.machine()}; set config.conv_impl='xla'")
  cxx = _compiler()
  directory = cache_dir()
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise OneDNNUnavailableError(
        f'cannot create {directory} to build the oneDNN convolution in ({e}); point '
        "$ET_FLAX_CACHE at a writable folder or set config.conv_impl='xla'") from e
  target = directory / f'onednn_conv-{_build_key(cxx)}.so'
  if target.exists():
    return target
  # One build per machine even when several processes start at once.
  with open(directory / 'onednn_conv.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if target.exists():
      return target
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
      out = pathlib.Path(tmp) / target.name
      cmd = _build_command(cxx, out)
      result = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if result.returncode != 0:
        raise OneDNNUnavailableError(
            f'building the oneDNN convolution failed (exit {result.returncode}):\n'
            f'  {" ".join(cmd)}\n{result.stderr[-4000:]}\n'
            "Set config.conv_impl='xla' to train without it.")
      os.replace(out, target)
  return target


def load() -> ctypes.CDLL:
  """Builds (once per machine) and registers the FFI targets (once per process)."""
  global _loaded
  with _lock:
    if _loaded is None:
      path = library_path()
      try:
        library = ctypes.CDLL(str(path))
      except OSError as e:
        raise OneDNNUnavailableError(f'cannot load {path}: {e}') from e
      for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')
      library.EtOnednnVersion.restype = ctypes.c_char_p
      library.EtOnednnSetThreads.argtypes = [ctypes.c_int]
      library.EtOnednnSetThreads.restype = ctypes.c_int
      library.EtOnednnKindStats.argtypes = [
          ctypes.c_int64, ctypes.POINTER(ctypes.c_uint64)] + [ctypes.POINTER(ctypes.c_int64)] * 3
      library.EtOnednnKindStats.restype = ctypes.c_int64
      _loaded = library
  return _loaded


def _one_line(reason: str) -> str:
  """The gist of an OneDNNUnavailableError's message, on one line."""
  lines = [line.strip() for line in reason.splitlines() if line.strip()]
  if not lines:
    return 'no reason given'
  # The fallback warning says how to get the fast path: drop the error's own advice.
  gist = (lines[0].removesuffix(" or set config.conv_impl='xla'")
          .removesuffix('; install one (e.g. apt-get install g++)'))
  if gist.endswith(':') and len(lines) > 1:
    # A failed build: its command and compiler output follow; the first error
    # line says most.
    output = [line for line in lines[2:] if not line.startswith('Set config.conv_impl')]
    errors = [line for line in output if 'error' in line.lower()]
    if errors or output:
      gist += ' ' + (errors or output[-1:])[0]
  return gist


@functools.cache
def available() -> tuple[bool, str]:
  """Whether the oneDNN convolution builds and loads here; if not, why.

  Tried once per process (`settings.resolve` asks it for
  `config.conv_impl='auto'`), so that a failed build is not retried and the
  warning that 'auto' falls back to XLA's convolutions is logged once.
  """
  try:
    load()
  except OneDNNUnavailableError as error:
    logging.warning(
        "conv_impl='auto' uses XLA's convolutions: oneDNN's, several times faster "
        "on CPUs, are unavailable (%s). For them install a C++ compiler (e.g. "
        'apt-get install g++) or see docs/performance.md; '
        "--config.conv_impl=xla silences this.", _one_line(str(error)))
    return False, str(error)
  return True, ''


def set_threads(threads: int) -> int:
  """The threads of the oneDNN calls from the next one on (>= 1), or every
  core (0: OpenMP's count, $OMP_NUM_THREADS where set); returns the threads
  of the last call (0: none yet)."""
  if threads < 0:
    raise ValueError(f'the oneDNN calls take 0 (OpenMP\'s own) or more threads, got {threads}')
  return load().EtOnednnSetThreads(threads)


def _sample(cores: frozenset[int]) -> tuple[float, float, float]:
  """(busy seconds of `cores` since boot, all processes' (/proc/stat); this
  process's CPU seconds; a monotonic clock)."""
  busy = 0
  for line in pathlib.Path('/proc/stat').read_text().splitlines():
    name, *fields = line.split()
    if name.startswith('cpu') and name[3:].isdigit() and int(name[3:]) in cores:
      user, nice, system, _, _, irq, softirq, steal = (int(f) for f in fields[:8])
      busy += user + nice + system + irq + softirq + steal
  times = os.times()
  return busy / os.sysconf('SC_CLK_TCK'), times.user + times.system, time.monotonic()


def _others(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
  """Cores kept busy by other processes between two `_sample`s: the cores'
  busy time less this process's, per second."""
  (busy0, own0, wall0), (busy1, own1, wall1) = before, after
  return max(0.0, ((busy1 - busy0) - (own1 - own0)) / max(wall1 - wall0, 1e-9))


def cores_used_by_others(interval: float, cores: frozenset[int]) -> float:
  """How many of `cores` other processes keep busy, over `interval` seconds."""
  before = _sample(cores)
  time.sleep(interval)
  return _others(before, _sample(cores))


def threads_for(free_cores: float, cores: int) -> int:
  """The threads for `free_cores` of `cores`: a core counts when other
  processes leave at least 3/4 of it free; at least 1."""
  return max(1, min(cores, math.floor(free_cores + 0.25)))


# Per kind of call: (calls, seconds, builds), the calls that built a
# primitive (a kind's first) counted in builds only.
KindStats = dict[int, tuple[int, float, int]]


def kind_stats() -> KindStats:
  """This process's oneDNN calls so far, per kind (direction and shapes):
  their number and wall time, and apart the calls that built the kind's
  primitives (its first)."""
  return _kind_stats(load())


def _kind_stats(library: ctypes.CDLL) -> KindStats:
  capacity = 64
  while True:
    ids = (ctypes.c_uint64 * capacity)()
    calls, nanos, builds = ((ctypes.c_int64 * capacity)() for _ in range(3))
    kinds = library.EtOnednnKindStats(capacity, ids, calls, nanos, builds)
    if kinds <= capacity:
      return {ids[i]: (calls[i], nanos[i] / 1e9, builds[i]) for i in range(kinds)}
    capacity = kinds + 16  # kinds added meanwhile


def speedup(slow: KindStats, fast: KindStats) -> float | None:
  """How many times faster the calls ran in `fast` than in `slow` (each the
  calls of a time window), kind by kind: the time that the calls of both
  windows would take at each window's seconds per call of their kind. None
  when no kind ran in both."""
  slow_seconds = fast_seconds = 0.0
  for kind in slow.keys() & fast.keys():
    (slow_calls, slow_time, _), (fast_calls, fast_time, _) = slow[kind], fast[kind]
    if slow_calls and fast_calls:
      calls = slow_calls + fast_calls
      slow_seconds += calls * slow_time / slow_calls
      fast_seconds += calls * fast_time / fast_calls
  return slow_seconds / fast_seconds if fast_seconds > 0 else None


def _delta(after: KindStats, before: KindStats) -> KindStats:
  return _add(after, {kind: tuple(-v for v in counts) for kind, counts in before.items()})


def _add(a: KindStats, b: KindStats) -> KindStats:
  none = (0, 0.0, 0)
  return {kind: tuple(x + y for x, y in zip(a.get(kind, none), b.get(kind, none)))
          for kind in a.keys() | b.keys()}


def _builds(stats: KindStats) -> int:
  return sum(builds for _, _, builds in stats.values())


class LoadFollower:
  """Sets the oneDNN calls' threads for the load on the cores, on a daemon
  thread that reads /proc/stat every `interval` seconds (oneDNN runs on
  Linux only).

  While the cores are free the calls run on one thread per core. When other
  processes keep a core busy, the system shares the cores among every
  thread that wants one, so more threads of ours take a larger share, while
  a piece that a paused thread holds delays its call. Which wins depends on
  the load and the model (docs/performance.md, "Under load"), so the
  follower times the calls on one thread per core and on two, in windows of
  A-B-B-A (`probe` seconds on each count in all, so that a load that grows
  or shrinks meanwhile weighs on both alike), compares them kind of call by
  kind of call (`stats`; so that which layers happen to fall in a window
  does not count; a probe in which primitives were built, a model
  starting, is void), keeps the faster, and times them again after `hold`
  seconds or when the busy cores change. The first time it takes more
  threads than cores it says so in one log line; later changes are logged
  at debug level. The calls give the same bits on any number of threads
  (their pieces are set by the batch and the cores the process started
  with), so following costs no determinism.
  """

  def __init__(self, interval: float = 1.0, set_threads=None, stats=None,
               probe: float = 4.0, hold: float = 60.0):
    if set_threads is None or stats is None:
      library = load()  # bound here: the follower's thread never loads it
      set_threads = set_threads or library.EtOnednnSetThreads
      stats = stats or functools.partial(_kind_stats, library)
    self._interval = interval
    self._set = set_threads
    self._stats = stats
    self._probe = probe
    self._hold = hold
    self._cores = frozenset(os.sched_getaffinity(0))
    self._stop = threading.Event()
    self._said = False
    self.threads = len(self._cores)
    self._thread = threading.Thread(target=self._follow, name='onednn-load',
                                    daemon=True)

  def start(self) -> LoadFollower:
    self._set(self.threads)
    self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()

  def _use(self, threads: int, why: str) -> None:
    if threads == self.threads:
      return
    log = logging.debug if self._said else logging.info
    self._said = self._said or threads != len(self._cores)
    log("oneDNN convolutions on %d threads for %d cores: %s (onednn_threads='auto' "
        "follows the load; a number keeps its count).", threads, len(self._cores), why)
    self.threads = threads
    self._set(threads)

  def _window(self, threads: int, seconds: float) -> KindStats | None:
    """The calls on `threads` over `seconds`; None when stopped."""
    self._set(threads)
    before = self._stats()
    if self._stop.wait(seconds):
      return None
    return _delta(self._stats(), before)

  def _speedup(self, a: int, b: int) -> float | None:
    """How many times faster the calls ran on `b` threads than on `a`, timed
    A-B-B-A; None without calls of a kind on both, while primitives were
    being built (a model starting: its first step is slow throughout), or
    when stopped."""
    first = self._window(a, self._probe / 2)
    middle = None if first is None else self._window(b, self._probe)
    last = None if middle is None else self._window(a, self._probe / 2)
    self._set(self.threads)  # until the caller's choice
    if last is None:
      return None
    if _builds(first) or _builds(middle) or _builds(last):
      logging.debug('oneDNN threads not compared: primitives were built meanwhile '
                    '(a model starting); timed again later')
      return None
    return speedup(_add(first, last), middle)

  def _follow(self) -> None:
    cores = len(self._cores)
    more = 2 * cores
    before, busy_then, probed_at = _sample(self._cores), None, 0.0
    while not self._stop.wait(self._interval):
      after = _sample(self._cores)
      others, before = _others(before, after), after
      busy = cores - threads_for(cores - others, cores)  # cores the others keep busy
      if busy == 0:
        busy_then = None
        self._use(cores, 'the cores are free again')
        continue
      if busy_then == busy and time.monotonic() - probed_at < self._hold:
        continue
      faster = self._speedup(cores, more)
      if faster is None:
        continue  # no calls meanwhile (or stopping): try again later
      logging.debug('oneDNN calls %.2fx as fast on %d threads as on %d, beside %.1f busy '
                    'cores', faster, more, cores, others)
      busy_then, probed_at, before = busy, time.monotonic(), _sample(self._cores)
      best, other, ratio = (more, cores, faster) if faster > 1 else (cores, more, 1 / faster)
      self._use(best, f'other processes keep {others:.1f} cores busy, and the calls ran '
                f'{ratio:.2f}x faster on {best} threads than on {other}')


_follower: LoadFollower | None = None
_follower_lock = threading.Lock()


ALL_CORES, FOLLOW_LOAD = 0, -1  # `use_threads` settings besides a count


def use_threads(setting: int) -> None:
  """The oneDNN calls' threads in this process: `setting` (>= 1), ALL_CORES
  (every core, or $OMP_NUM_THREADS), or FOLLOW_LOAD (a `LoadFollower`
  sets them for the load on the cores)."""
  global _follower
  with _follower_lock:
    if _follower is not None:
      if setting == FOLLOW_LOAD:
        return
      _follower.stop()
      _follower = None
    if setting == FOLLOW_LOAD:
      _follower = LoadFollower().start()
    else:
      set_threads(setting)


def version() -> str:
  """oneDNN's version as linked, e.g. '3.2.0 (<git hash>)'."""
  return load().EtOnednnVersion().decode()


def _pads(in_hw: Sequence[int], kernel_hw: Sequence[int], strides: Sequence[int],
          padding: Any) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(tuple(in_hw), tuple(kernel_hw), tuple(strides),
                                     padding.upper()))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _check_geometry(x_shape: Sequence[int], kernel_shape: Sequence[int],
                    pads: Sequence[tuple[int, int]]) -> None:
  """Refuses what oneDNN cannot run, before the call: a ValueError, not an
  'INTERNAL: could not create a primitive descriptor' from inside the step."""
  if any(p < 0 for pair in pads for p in pair):
    raise ValueError('the oneDNN convolution takes padding >= 0 (no cropping), got '
                     f'{tuple(pads)}; use the XLA convolution for negative padding')
  for axis, (size, k, (lo, hi)) in enumerate(zip(x_shape[1:3], kernel_shape[:2], pads)):
    if size + lo + hi < k:
      raise ValueError(
          f'the oneDNN convolution would give an empty output: input {tuple(x_shape)} '
          f'(NHWC), kernel {tuple(kernel_shape)} (HWIO), padding {tuple(pads)}: axis '
          f'{axis + 1} has {size} + {lo + hi} padded pixels for a kernel of {k}')


def _attrs(strides, pads, activation) -> dict[str, np.int64]:
  (pt, pb), (pl, pr) = pads
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(pt), pad_bottom=np.int64(pb),
              pad_left=np.int64(pl), pad_right=np.int64(pr),
              activation=np.int64(ACTIVATIONS[activation]))


def _forward(x, kernel, bias, shortcut, strides, pads, activation):
  n, h, w, _ = x.shape
  kh, kw, _, o = kernel.shape
  oh = (h + pads[0][0] + pads[0][1] - kh) // strides[0] + 1
  ow = (w + pads[1][0] + pads[1][1] - kw) // strides[1] + 1
  target, args = (('et_onednn_conv_fwd', (x, kernel, bias)) if shortcut is None else
                  ('et_onednn_conv_fwd_residual', (x, kernel, bias, shortcut)))
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((n, oh, ow, o), jnp.float32),
                          vmap_method='sequential')(
                              *args, **_attrs(strides, pads, activation))


def _backward(strides, pads, activation, residuals, dy):
  """(g, dx, dkernel, dbias), g the gradient at the pre-activation; dx None
  when x was not differentiated (the handler then skips it)."""
  x, kernel, y, x_perturbed = residuals
  if isinstance(dy, jax.custom_derivatives.SymbolicZero):
    dy = jnp.zeros(y.shape, jnp.float32)
  dy = dy.astype(jnp.float32)
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  # The bias gradient is g's sum, made by the handler while g is in cache
  # (rows in float32, the rows in float64: error near float32's rounding,
  # where oneDNN's own adds one value at a time; tests/test_onednn.py).
  g, dx, dkernel, dbias = jax.ffi.ffi_call(
      'et_onednn_conv_bwd', (f32(y.shape), f32(x.shape), f32(kernel.shape),
                             f32(kernel.shape[3:])),
      vmap_method='sequential')(x, kernel, y, dy, input_gradient=x_perturbed,
                                **_attrs(strides, pads, activation))
  if activation == 'none':
    g = dy  # the handler leaves g unwritten: it is dy
  return g, dx if x_perturbed else None, dkernel, dbias


def _primal(arg):
  """A `symbolic_zeros` forward rule's argument: (value, whether it is differentiated)."""
  return arg.value, bool(arg.perturbed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _layer(x, kernel, bias, strides, pads, activation):
  return _forward(x, kernel, bias, None, strides, pads, activation)


def _layer_fwd(x, kernel, bias, strides, pads, activation):
  (x, x_perturbed), kernel, bias = _primal(x), kernel.value, bias.value
  y = _forward(x, kernel, bias, None, strides, pads, activation)
  return y, (x, kernel, y, x_perturbed)


def _layer_bwd(strides, pads, activation, residuals, dy):
  _, dx, dk, db = _backward(strides, pads, activation, residuals, dy)
  return dx, dk, db


_layer.defvjp(_layer_fwd, _layer_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _residual_layer(x, kernel, bias, shortcut, strides, pads, activation):
  return _forward(x, kernel, bias, shortcut, strides, pads, activation)


def _residual_layer_fwd(x, kernel, bias, shortcut, strides, pads, activation):
  (x, x_perturbed), kernel, bias = _primal(x), kernel.value, bias.value
  y = _forward(x, kernel, bias, shortcut.value, strides, pads, activation)
  return y, (x, kernel, y, x_perturbed)


def _residual_layer_bwd(strides, pads, activation, residuals, dy):
  g, dx, dk, db = _backward(strides, pads, activation, residuals, dy)
  return dx, dk, db, g


_residual_layer.defvjp(_residual_layer_fwd, _residual_layer_bwd, symbolic_zeros=True)


def conv_layer(x: jax.Array, kernel: jax.Array, bias: jax.Array,
               shortcut: jax.Array | None = None, *, strides: Sequence[int] = (1, 1),
               padding: Any = 'SAME', activation: str = 'none') -> jax.Array:
  """`activation(conv(x, kernel) + bias [+ shortcut])` in one oneDNN call.

  The same as `lax.conv_general_dilated(x, kernel, strides, padding,
  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))` followed by the sums and the
  activation, in float32, differentiable in every array argument. The
  backward pass is one call too: the activation's gradient, then oneDNN's
  input gradient and kernel-and-bias gradient.

  Args:
    x: (N, H, W, C) float32 activations.
    kernel: (KH, KW, C, O) float32 kernel.
    bias: (O,) float32.
    shortcut: None, or a float32 array of the output's shape added before
      the activation (a residual block's identity).
    strides: (sh, sw).
    padding: 'SAME', 'VALID' or ((top, bottom), (left, right)).
    activation: 'none', 'relu' or 'tanh'.
  """
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f'conv_layer takes NHWC x and an HWIO kernel, got shapes {x.shape} '
                     f'and {kernel.shape}')
  if x.shape[3] != kernel.shape[2] or bias.shape != kernel.shape[3:]:
    raise ValueError(f'shapes do not match: x {x.shape}, kernel {kernel.shape} (HWIO), '
                     f'bias {bias.shape}')
  arrays = (x, kernel, bias) + (() if shortcut is None else (shortcut,))
  if any(a.dtype != jnp.float32 for a in arrays):
    raise ValueError('the oneDNN convolution is float32 only, got '
                     f'{[str(a.dtype) for a in arrays]}; use the XLA convolution '
                     "(config.conv_impl='xla') for other dtypes")
  if activation not in ACTIVATIONS:
    raise ValueError(f'activation must be one of {list(ACTIVATIONS)}, got {activation!r}')
  strides = tuple(int(s) for s in strides)
  if any(s < 1 for s in strides):
    raise ValueError(f'the oneDNN convolution needs strides >= 1, got {strides}')
  pads = _pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  _check_geometry(x.shape, kernel.shape, pads)
  load()
  if shortcut is None:
    return _layer(x, kernel, bias, strides, pads, activation)
  out_shape = jax.eval_shape(lambda: _forward(x, kernel, bias, None, strides, pads,
                                              activation)).shape
  if shortcut.shape != out_shape:
    raise ValueError(f'the shortcut has shape {shortcut.shape}, the output {out_shape}')
  return _residual_layer(x, kernel, bias, shortcut, strides, pads, activation)


class OneDNNConv(nn.Module):
  """`activation(conv(x) + bias [+ shortcut])` as one oneDNN call (CPUs, float32).

  A convolution layer for the models (`models.create_model(..., conv=OneDNNConv)`):
  the same fields, call and parameters as `models.Conv` ('kernel' (kh, kw,
  in, out), 'bias'), so a checkpoint or Keras file serves either
  implementation. The bias, the residual sum and the activation run inside
  oneDNN's convolution pass, and the backward pass is one call as well
  (`conv_layer`, tested against `lax.conv_general_dilated` in
  tests/test_onednn.py).
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: Any = 'SAME'
  activation: str = 'none'
  dtype: Any = jnp.float32  # float32 only: the layer's single compute dtype
  kernel_init: Any = models.KERNEL_INIT

  @nn.compact
  def __call__(self, x: jax.Array, shortcut: jax.Array | None = None) -> jax.Array:
    if jnp.dtype(self.dtype) != jnp.float32:
      raise ValueError('the oneDNN convolution computes in float32 only, but the compute '
                       f"dtype is {jnp.dtype(self.dtype).name}; use conv_impl='xla' or "
                       "compute_dtype='float32'")
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    return conv_layer(x.astype(jnp.float32), kernel, bias, shortcut,
                      strides=(self.strides, self.strides), padding=self.padding,
                      activation=self.activation)
