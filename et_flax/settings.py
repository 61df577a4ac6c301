"""What a run computes with: its config's 'auto' values resolved, once.

`resolve(config, platform)` turns the config's performance fields
(`conv_impl`, `compute_dtype`, `micro_batch_size`, `onednn_threads`,
`data.device_resident`) and `preprocessing` into a frozen `Settings`. It is
the only place that decides 'auto' (the micro-batches' size by the rule of
`cpu/micro_batches.py`); training, evaluation, prediction and the benchmark
use its result, the run's header shows it and the checkpoints keep it.
`Platform.current()` is the only query of the machine (JAX's backend, its
devices, their memory and bfloat16 support); tests pass a `Platform` of
their own. `configure_determinism` (`--deterministic`) sets XLA's
deterministic GPU ops before JAX's backends start, and whether 'auto' may
give oneDNN's CPU calls only the cores other processes leave free.

`check_run_config` checks the fields a training run reads directly (sizes,
counts, the freeze), beside it, before any image is decoded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from absl import logging
from jax._src import xla_bridge

from et_flax import augment
from et_flax import console
from et_flax import models
from et_flax.cpu import micro_batches
from et_flax.cpu import onednn

CONV_IMPLS = ('auto', 'xla', 'onednn')
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
PREPROCESSING = augment.PREPROCESSING

# 'auto' keeps the training images on the accelerator when they take less
# than this share of its memory.
DEVICE_RESIDENT_SHARE = 0.5
# NVIDIA GPUs compute natively in bfloat16 from compute capability 8.0 (A100,
# L4, H100); a T4 (7.5) emulates it, slower than float32.
NATIVE_BFLOAT16_CAPABILITY = 8.0
# XLA's deterministic GPU ops: deterministic convolution algorithms and
# reductions (scatter-adds such as max-pooling's gradient included), so that
# a resumed run equals an uninterrupted one bit for bit on GPUs too.
DETERMINISTIC_XLA_FLAG = '--xla_gpu_deterministic_ops=true'
DETERMINISM = ('auto', 'true', 'false')
INSTALL_CUDA = "pip install -e '.[tf,cuda]' (see Install in README.md)"

_said: set[str] = set()  # the lines `_say_once` has logged in this process


def _say_once(message: str, *args: Any, warn: bool = False) -> None:
  text = message % args
  if text not in _said:
    _said.add(text)
    (console.warning if warn else logging.info)('%s', text)


def nvidia_gpu_present() -> bool:
  """Whether the machine has an NVIDIA GPU (its driver loaded), whatever JAX uses."""
  return os.path.exists('/proc/driver/nvidia/version') or os.path.exists('/dev/nvidia0')


def _cuda_build_installed() -> bool:
  return any(importlib.util.find_spec(name) is not None
             for name in ('jax_cuda12_plugin', 'jax_cuda13_plugin'))


def _native_bfloat16(device: jax.Device) -> bool:
  if device.platform in ('gpu', 'cuda'):
    try:  # NVIDIA's '8.0'; other vendors' GPUs name their architecture instead
      return float(device.compute_capability) >= NATIVE_BFLOAT16_CAPABILITY
    except (AttributeError, TypeError, ValueError):
      return False
  return device.platform == 'tpu'


@dataclasses.dataclass(frozen=True)
class Platform:
  """The machine a run's steps run on."""
  backend: str  # JAX's default backend: 'cpu', 'gpu', 'tpu'
  device_count: int = 1  # over every process
  process_count: int = 1
  device_memory: int | None = None  # bytes on the first local device, if known
  # A Linux x86-64 machine, where et_flax's oneDNN convolution can be built.
  onednn_platform: bool = False
  # The accelerator computes natively in bfloat16 (not emulated).
  native_bfloat16: bool = True
  device_kind: str = ''  # 'NVIDIA H200', 'Tesla T4', 'cpu'...
  # XLA's deterministic GPU ops are on in this process (DETERMINISTIC_XLA_FLAG).
  deterministic_gpu_ops: bool = False

  @classmethod
  def current(cls) -> Platform:
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    backend = jax.default_backend()
    # Only where nobody chose the CPU (JAX_PLATFORMS) and no CUDA build is there.
    if (backend == 'cpu' and nvidia_gpu_present() and not jax.config.jax_platforms
        and not _cuda_build_installed()):
      _say_once('an NVIDIA GPU is present, but JAX runs on the CPU (its CUDA build is not '
                'installed): %s', INSTALL_CUDA, warn=True)
    return cls(backend=backend, device_count=jax.device_count(),
               process_count=jax.process_count(), device_memory=stats.get('bytes_limit'),
               onednn_platform=onednn.platform_supported(),
               native_bfloat16=_native_bfloat16(device), device_kind=device.device_kind,
               deterministic_gpu_ops=deterministic_gpu_ops())


@dataclasses.dataclass(frozen=True)
class Settings:
  """How a run computes: every 'auto' of its config decided."""
  backend: str
  conv_impl: str  # 'xla' (lax convolutions, 1x1s as matmuls) or 'onednn'
  compute_dtype: str  # 'float32' or 'bfloat16'; parameters stay float32
  micro_batch_size: int  # images per gradient-accumulation part; 0: whole batches
  micro_batches: int  # parts per batch (1: whole batches)
  device_resident: bool  # training images kept on the device, batches built there
  preprocessing: str  # 'rescale' (x / 255) or 'caffe' (Keras Applications')
  # The steps give the same bits run to run (CPUs always, whatever the oneDNN
  # calls' threads; GPUs with XLA's deterministic ops). False only with
  # --deterministic=false on a GPU.
  deterministic: bool = True
  # The oneDNN convolutions' threads: that many, or onednn.ALL_CORES (0:
  # every core), or onednn.FOLLOW_LOAD (-1, 'auto': one per core, or two
  # when other processes keep cores busy and that is faster).
  onednn_threads: int = 0

  @property
  def dtype(self) -> Any:
    return COMPUTE_DTYPES[self.compute_dtype]

  @property
  def conv(self) -> models.ModuleDef:
    """The convolution layer the models are built with."""
    return onednn.OneDNNConv if self.conv_impl == 'onednn' else models.Conv

  def describe(self) -> str:
    """One line for the run's header."""
    parts = [f'{self.conv_impl} convolutions', f'{self.compute_dtype} compute',
             f'gradients accumulated over parts of {self.micro_batch_size}'
             if self.micro_batch_size else 'whole batches',
             f'{self.preprocessing} preprocessing']
    if self.conv_impl == 'onednn':
      parts.append({onednn.ALL_CORES: 'oneDNN on every core',
                    onednn.FOLLOW_LOAD: 'oneDNN threads following the load'}.get(
                        self.onednn_threads, f'oneDNN on {self.onednn_threads} threads'))
    if self.device_resident:
      parts.append('training images on the device')
    if self.backend == 'gpu':
      parts.append('deterministic GPU ops' if self.deterministic else
                   'GPU ops not deterministic (--deterministic=false)')
    return ', '.join(parts)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def resolve(config: ml_collections.ConfigDict, platform: Platform | None = None,
            train_bytes: int | None = None) -> Settings:
  """`config`'s settings on `platform` (default: this machine's).

  'auto' means: oneDNN convolutions for float32 on one CPU device of a Linux
  x86-64 machine where they build (`onednn.available`, tried once per process,
  a warning saying why not), XLA's elsewhere; bfloat16 on GPUs and TPUs,
  float32 on CPUs; on CPUs and for models without batch norm, micro-batches
  whose activations stay in cache (`micro_batches.micro_batch_size`), whole
  batches elsewhere; the training images on the device when one host has an
  accelerator with room for them (`train_bytes`, once decoded; unknown means
  no). An explicit value is never changed: `conv_impl='onednn'` is built
  here, and fails loudly if it cannot be.

  Raises:
    ValueError: a value that is not one of the choices, or that cannot run
      on `platform`.
    onednn.OneDNNUnavailableError: `conv_impl='onednn'` where it cannot be
      built or loaded.
  """
  platform = platform or Platform.current()
  dtype = _compute_dtype(config.get('compute_dtype', 'auto'), platform)
  conv_impl = _conv_impl(config.get('conv_impl', 'auto'), dtype, platform)
  micro = micro_batches.micro_batch_size(config, conv_impl, platform.backend)
  threads = _onednn_threads(config.get('onednn_threads', 'auto'))
  if conv_impl == 'onednn':
    onednn.use_threads(threads)
  deterministic = platform.deterministic_gpu_ops if platform.backend == 'gpu' else True
  preprocessing = config.get('preprocessing', 'rescale')
  if preprocessing not in PREPROCESSING:
    raise ValueError(f'config.preprocessing must be one of {list(PREPROCESSING)}, got '
                     f'{preprocessing!r}')
  return Settings(backend=platform.backend, conv_impl=conv_impl, compute_dtype=dtype,
                  micro_batch_size=micro,
                  micro_batches=config.batch_size // micro if micro else 1,
                  device_resident=_device_resident(config, platform, train_bytes),
                  preprocessing=preprocessing,
                  deterministic=deterministic, onednn_threads=threads)


def _onednn_threads(value: Any) -> int:
  """config.onednn_threads: a count >= 1, or 'auto': one thread per core,
  two when other processes keep cores busy and the calls run faster so
  (docs/performance.md, "Under load"); the bits are the same on any count."""
  if isinstance(value, str) and value.isdigit():
    value = int(value)  # --config.onednn_threads=1 on the command line
  if value == 'auto':
    return onednn.FOLLOW_LOAD
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"config.onednn_threads must be 'auto' or a number of threads >= 1, "
                     f'got {value!r}')
  return value


def _compute_dtype(name: str, platform: Platform) -> str:
  if name == 'auto':
    if platform.backend == 'cpu':
      return 'float32'
    if not platform.native_bfloat16:
      _say_once("compute_dtype 'auto' is float32: %s has no native bfloat16 (NVIDIA GPUs "
                'have it from compute capability %.1f)', platform.device_kind or
                platform.backend, NATIVE_BFLOAT16_CAPABILITY)
      return 'float32'
    return 'bfloat16'
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'config.compute_dtype must be one of '
                     f'{["auto", *COMPUTE_DTYPES]}, got {name!r}')
  return name


def _conv_impl(name: str, dtype: str, platform: Platform) -> str:
  if name not in CONV_IMPLS:
    raise ValueError(f'config.conv_impl must be one of {list(CONV_IMPLS)}, got {name!r}')
  on_cpu = platform.backend == 'cpu'
  if name == 'auto':
    use = (on_cpu and platform.device_count == 1 and platform.onednn_platform
           and dtype == 'float32' and onednn.available()[0])
    return 'onednn' if use else 'xla'
  if name == 'onednn':
    if not on_cpu:
      raise ValueError("config.conv_impl='onednn' runs on CPUs only, but JAX's backend is "
                       f"{platform.backend!r}; use 'auto' or 'xla'")
    if dtype != 'float32':
      raise ValueError('the oneDNN convolution computes in float32 only, but the compute '
                       f"dtype is {dtype}; use conv_impl='xla' or compute_dtype='float32'")
    onednn.load()  # builds it now, before any data is read, or says why it cannot
  return name


def _device_resident(config: ml_collections.ConfigDict, platform: Platform,
                     train_bytes: int | None) -> bool:
  setting = config.data.get('device_resident', 'auto')
  if setting not in ('auto', True, False):
    raise ValueError("config.data.device_resident must be 'auto', True or False, got "
                     f'{setting!r}')
  if setting is True and platform.process_count > 1:
    raise ValueError('data.device_resident=True works on one host only')
  if setting != 'auto':
    return setting
  return (platform.backend != 'cpu' and platform.process_count == 1
          and train_bytes is not None and platform.device_memory is not None
          and train_bytes < DEVICE_RESIDENT_SHARE * platform.device_memory)


RUN_COUNTS = ('batch_size', 'num_epochs', 'eval_batch_size', 'checkpoint_every_epochs',
              'max_to_keep')


def check_run_config(config: ml_collections.ConfigDict, platform: Platform) -> None:
  """The fields a training run reads itself, checked before any work.

  (The model, data, optimizer and augmentation fields are checked by the
  modules that read them.)
  """
  for field in RUN_COUNTS:
    value = config.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f'config.{field} must be a positive integer, got {value!r}')
  frozen = config.get('freeze_backbone_epochs', 0)
  if not isinstance(frozen, int) or isinstance(frozen, bool) or frozen < 0:
    raise ValueError('config.freeze_backbone_epochs must be an integer >= 0, got '
                     f'{frozen!r}')
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % platform.device_count:
      raise ValueError(f'config.{field}={config[field]} must be divisible by the '
                       f'{platform.device_count} devices')


def build_model(config: ml_collections.ConfigDict, settings: Settings, num_classes: int,
                image_size: int | None = None) -> nn.Module:
  """`config.model` with the settings' compute dtype and convolution layer."""
  return models.create_model(config.model, num_classes, image_size,
                             dtype=settings.dtype, conv=settings.conv)


def from_dict(saved: Mapping[str, Any]) -> Settings:
  """Settings as `Settings.to_dict` wrote them (e.g. in a checkpoint; fields
  added since take their defaults)."""
  return Settings(**saved)


def changes(saved: Mapping[str, Any], current: Settings) -> list[str]:
  """'field saved -> now' for each setting a resumed run computes with otherwise."""
  now = current.to_dict()
  return [f'{field} {saved[field]} -> {now[field]}' for field in now
          if field in saved and saved[field] != now[field]]


# ---------------------------------------------------------------------------
# Determinism: on GPUs an XLA flag, read when JAX's backends start. CPU
# steps give the same bits either way (the oneDNN calls on any threads).

def define_deterministic_flag() -> None:
  """--deterministic, for the commands that run steps."""
  flags.DEFINE_enum('deterministic', 'auto', DETERMINISM,
                    "Steps that give the same bits run to run, so that a resumed run "
                    "equals an uninterrupted one bit for bit: 'auto' and 'true' turn XLA's "
                    "deterministic GPU ops on; 'false' leaves XLA its faster choice. CPU "
                    "steps give the same bits either way (et_flax/settings.py).")


def deterministic_gpu_ops() -> bool:
  """Whether this process's XLA_FLAGS turn XLA's deterministic GPU ops on."""
  found = re.findall(r'--xla_gpu_deterministic_ops(?:=(\w+))?(?=\s|$)',
                     os.environ.get('XLA_FLAGS', ''))
  return bool(found) and found[-1].lower() in ('', 'true', '1')


def configure_determinism(setting: str) -> bool:
  """Turns XLA's deterministic GPU ops on for this process ('auto', 'true'),
  or leaves them off ('false'); returns whether they are on.

  XLA reads its flags when JAX's backends start: et_flax.main,
  et_flax.reproduce, et_flax.benchmark and the notebooks call this first.
  The XLA flag is harmless on CPUs, whose steps give the same bits either way.

  Raises:
    ValueError: `setting` is not one of DETERMINISM; 'true' after JAX's
      backends have started without the flag; or 'false' where XLA_FLAGS
      already turns them on.
  """
  setting = str(setting).lower()
  if setting not in DETERMINISM:
    raise ValueError(f'--deterministic must be one of {list(DETERMINISM)}, got {setting!r}')
  if setting == 'false':
    if deterministic_gpu_ops():  # two explicit settings that disagree
      raise ValueError(f'--deterministic=false, but XLA_FLAGS turns deterministic GPU ops on '
                       f"({os.environ['XLA_FLAGS']!r}): remove --xla_gpu_deterministic_ops "
                       'from XLA_FLAGS, or leave --deterministic at auto')
    return False
  if deterministic_gpu_ops():
    return True
  if xla_bridge.backends_are_initialized():
    if setting == 'true':
      raise ValueError("--deterministic=true: JAX's backends have already started without "
                       f'{DETERMINISTIC_XLA_FLAG} (configure it before the first use of JAX)')
    logging.info("Deterministic GPU ops: left off, JAX's backends started before "
                 '--deterministic=auto could set %s', DETERMINISTIC_XLA_FLAG)
    return False
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {DETERMINISTIC_XLA_FLAG}".strip()
  return True
