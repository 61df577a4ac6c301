"""How many images a part of the batch holds when a CPU accumulates gradients.

`micro_batch_size(config, conv_impl, backend)` is config.micro_batch_size
with 'auto' resolved; `settings.resolve` calls it once for a run. 'auto' asks
the model its facts (`models.facts`: batch norm, widest activation) and
counts its convolution kernels and outputs from its shapes alone.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from et_flax import models

# Per image, CPUs train fastest on parts of the batch whose activations stay
# in cache (docs/performance.md has the sweeps): 'auto' picks the largest part
# whose widest activation tensor fits this budget, but no fewer images than
# the floor (smaller parts only add per-call overhead and compile time), and
# no fewer than it takes for the part's convolution outputs to outweigh the
# convolution kernels, which every part reads, reorders and adds a gradient
# for (VGG16: 59 MB of kernels, 4.4 MB of outputs per image: parts of 16).
# The oneDNN calls split a part into pieces of whole images, one thread each,
# so a part has at least as many images as the process has cores, and at
# least 16: each call ends when its last piece does, so fewer, longer calls
# wait less, quiet and more so beside other work (plain E.T., 128 images, 2
# cores: parts of 4 172 img/s, 8 190-193, 16 195-205, whole batches 185-194;
# wide E.T. k=4: parts of 4 15.7 img/s quiet and 9.6 beside a busy loop, 16
# 16.4 and 10.9; docs/performance.md, "Layouts" and "Threads, calls and part
# sizes under load").
AUTO_BUDGET = {'onednn': (4 << 20, 16), 'xla': (2 << 20, 8)}  # bytes, images


def _setting(config: ml_collections.ConfigDict) -> Any:
  # The default config holds a string ('auto'), so a command-line override
  # arrives as one too: '16' means 16.
  micro = config.get('micro_batch_size', 'auto')
  return int(micro) if isinstance(micro, str) and micro.isdigit() else micro


def activation_bytes_per_image(config: ml_collections.ConfigDict,
                               facts: models.ModelFacts) -> int:
  """Float32 bytes of the model's widest activation tensor, per image."""
  return config.data.image_size ** 2 * facts.widest_channels * 4


def _is_conv(module: nn.Module, method: str) -> bool:
  """A convolution's call: a module whose 'kernel' parameter is 4-D (et_flax's
  Conv, nn.Conv or any other)."""
  return (method == '__call__' and module.has_variable('params', 'kernel')
          and module.get_variable('params', 'kernel').ndim == 4)


def kernel_and_output_bytes(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """Float32 bytes of the model's convolution kernels, and of its convolution
  outputs for one image (shapes only: nothing is computed)."""
  size = config.data.image_size
  model = models.create_model(config.model, num_classes=2)

  def shapes():
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    variables = model.init(jax.random.key(0), images)
    _, state = model.apply(variables, images, capture_intermediates=_is_conv,
                           mutable=['intermediates'])
    return variables['params'], state['intermediates']

  params, intermediates = jax.eval_shape(shapes)
  kernels = [leaf for path, leaf in models.flatten_params(params).items()
             if path.endswith('/kernel') and leaf.ndim == 4]
  return (sum(4 * k.size for k in kernels),
          sum(4 * o.size for o in jax.tree.leaves(intermediates)))


def micro_batch_size(config: ml_collections.ConfigDict, conv_impl: str,
                     backend: str) -> int:
  """config.micro_batch_size, with 'auto' resolved (0: whole batches).

  `conv_impl` is the resolved convolution ('onednn' or 'xla'), `backend`
  JAX's ('cpu', 'gpu', ...). 'auto' is 16 images for every E.T. at 64x64
  with the oneDNN convolutions (or one per core where there are more cores),
  8 for plain E.T. with XLA's, whole batches at 16x16, 16 for VGG16 at 64x64: the largest
  divisor of the batch whose activations fit AUTO_BUDGET, at least its floor,
  and at least as many images as it takes for their convolution outputs to
  outweigh the kernels; whole batches off CPUs and for a model with batch
  norm. The model says its widest activation and batch norm (`models.facts`).

  Raises:
    ValueError: an explicit value that is not 0 and does not divide the batch.
  """
  micro, batch = _setting(config), config.batch_size
  if micro != 'auto':
    if not isinstance(micro, int) or isinstance(micro, bool) or micro < 0 or (
        micro and batch % micro):
      raise ValueError("config.micro_batch_size must be 'auto', 0 (whole batches) or "
                       f'divide config.batch_size={batch}, got {micro!r}')
    return micro
  facts = models.facts(config.model)
  if backend != 'cpu' or facts.batch_norm:
    return 0  # batch norm would normalise the parts apart
  budget, floor = AUTO_BUDGET[conv_impl]
  if conv_impl == 'onednn':
    floor = max(floor, len(os.sched_getaffinity(0)))
  per_image = activation_bytes_per_image(config, facts)
  fitting = [d for d in range(1, batch + 1) if batch % d == 0 and d * per_image <= budget]
  kernel_bytes, output_bytes = kernel_and_output_bytes(config)
  # Images enough for their convolution outputs to outweigh the kernels (none
  # for a model without convolutions).
  outweigh = -(-kernel_bytes // output_bytes) if output_bytes else 1
  size = max(fitting[-1] if fitting else 1, min(floor, batch), min(outweigh, batch))
  while batch % size:  # the part must divide the batch
    size += 1
  return 0 if size >= batch else size
