"""Ways to write E.T.'s convolutions, timed with both gradients on this machine.

  python -m et_flax.benchmark conv_variants

One convolution on a 128x64x64x16 batch (E.T.'s shape at batch 128), 16
filters, forward plus input and weight gradients, jitted, median of 3 runs.
The results and what was adopted are in docs/performance.md.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def xla_conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=DIMENSIONS)


def _shifted_views(x, k):
  p = k // 2
  padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  height, width = x.shape[1:3]
  return [padded[:, a:a + height, b:b + width, :] for a in range(k) for b in range(k)]


def im2col(x, w):
  if w.shape[0] == 1:
    return jnp.einsum('nhwc,co->nhwo', x, w[0, 0])
  patches = jnp.concatenate(_shifted_views(x, w.shape[0]), axis=-1)
  return jnp.einsum('nhwk,ko->nhwo', patches, w.reshape(-1, w.shape[-1]))


def shifted_matmuls(x, w):
  k = w.shape[0]
  views = _shifted_views(x, k)
  return sum(jnp.einsum('nhwc,co->nhwo', v, w[i // k, i % k]) for i, v in enumerate(views))


@jax.custom_vjp
def custom_weight_gradient(x, w):
  return xla_conv(x, w)


def _forward(x, w):
  return xla_conv(x, w), (x, w)


def _backward(residuals, dy):
  x, w = residuals
  k = w.shape[0]
  dx = xla_conv(dy, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
  dy_flat = dy.reshape(-1, dy.shape[-1])
  dw = jnp.stack([v.reshape(-1, x.shape[-1]).T @ dy_flat for v in _shifted_views(x, k)])
  return dx, dw.reshape(w.shape)


custom_weight_gradient.defvjp(_forward, _backward)


def onednn_conv(x, w):
  from et_flax.cpu import onednn  # pylint: disable=import-outside-toplevel
  return onednn.conv_layer(x, w, jnp.zeros(w.shape[-1], w.dtype))


def timed(fn, *args):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def define_flags() -> None:
  """No flags."""


def main(argv=()):
  del argv
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((128, 64, 64, 16), np.float32))
  kernels = {k: jnp.asarray(rng.random((k, k, 16, 16), np.float32) * 0.1) for k in (3, 1)}
  print(f'{"variant":<24}{"3x3 ms":>10}{"1x1 ms":>10}')
  for name, fn in (('xla conv', xla_conv), ('im2col', im2col),
                   ('shifted matmuls', shifted_matmuls),
                   ('custom weight gradient', custom_weight_gradient),
                   ('oneDNN (jax.ffi)', onednn_conv)):
    cells = []
    for k, w in kernels.items():
      grads = jax.jit(jax.grad(lambda w, x: jnp.sum(fn(x, w) ** 2), argnums=(0, 1)))
      reference = jax.grad(lambda w, x: jnp.sum(xla_conv(x, w) ** 2), argnums=(0, 1))(w, x)
      for got, want in zip(grads(w, x), reference):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-2 * float(jnp.abs(want).max()))
      cells.append(timed(grads, w, x))
    print(f'{name:<24}{cells[0]:>10.0f}{cells[1]:>10.0f}')

