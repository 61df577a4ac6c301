"""The oneDNN convolution (et_flax/cpu/onednn.py) against XLA's, its switch and errors.

Reference: `lax.conv_general_dilated` at precision HIGHEST plus the bias, the
shortcut and the activation in jax.numpy, differentiated by JAX. Both sum
the same float32 products in another order, so values agree to a few float32
roundings of the largest magnitude involved: relative 1e-5 of the output's
(or gradient's) largest entry is ~80 roundings of headroom.
"""

import functools
import importlib.metadata
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from helpers import tiny_config
from et_flax import models
from et_flax import optim
from et_flax import settings
from et_flax import train
from et_flax.cpu import onednn
from et_flax.data import input_pipeline

pytestmark = pytest.mark.skipif(not onednn.platform_supported(),
                                reason='the oneDNN wheels are Linux x86-64 only')


def _no_compiler():
  """Why the convolution cannot be built here for want of a C++ compiler
  (looked for as `onednn.library_path` does: $CXX, else g++ or c++), or ''."""
  try:
    onednn._compiler()  # pylint: disable=protected-access
  except onednn.OneDNNUnavailableError as error:
    return str(error)
  return ''


# For the tests that build (or load) the library: without a compiler they
# skip, saying so; the others check what comes before the build and run anywhere.
_NO_COMPILER = _no_compiler()
needs_build = pytest.mark.skipif(bool(_NO_COMPILER), reason=_NO_COMPILER or 'unused')


ACTIVATIONS = {'none': lambda v: v, 'relu': jax.nn.relu, 'tanh': jnp.tanh}


def reference_layer(x, kernel, bias, shortcut, strides, padding, activation):
  y = lax.conv_general_dilated(x, kernel, strides, padding,
                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                               precision=lax.Precision.HIGHEST) + bias
  if shortcut is not None:
    y = y + shortcut
  return ACTIVATIONS[activation](y)


def assert_close(actual, expected, rtol=1e-5):
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * max(scale, 1e-30))


CASES = [
    # batch, height, width, in, out, kernel, strides, padding, activation, shortcut
    (2, 8, 8, 16, 16, 3, (1, 1), 'SAME', 'relu', True),    # E.T.'s block y, last conv
    (2, 8, 8, 16, 16, 1, (1, 1), 'SAME', 'relu', False),   # block x
    (3, 8, 8, 3, 16, 3, (1, 1), 'SAME', 'tanh', False),    # the stem, tanh variant
    (2, 9, 7, 32, 48, 3, (2, 2), 'SAME', 'none', False),   # reordered layouts, stride 2
    (2, 8, 8, 16, 16, 1, (1, 1), 'SAME', 'tanh', True),
    (2, 10, 10, 8, 4, 5, (1, 1), 'VALID', 'relu', False),
    (2, 11, 11, 16, 32, 7, (2, 2), ((3, 3), (3, 3)), 'none', False),  # ResNet50's stem
    (1, 6, 6, 64, 64, 3, (1, 1), 'SAME', 'relu', True),
    (2, 8, 8, 32, 16, 3, (1, 1), 'SAME', 'none', True),   # g = dy; NHWC in, 16 out
]


@needs_build
@pytest.mark.parametrize('case', CASES, ids=[
    f'{c[5]}x{c[5]}-{c[3]}to{c[4]}-s{c[6][0]}-{c[8]}{"-res" if c[9] else ""}' for c in CASES])
def test_jit_conv_layer_equals_xla(case):
  n, h, w, cin, cout, k, strides, padding, activation, residual = case
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(n, h, w, cin)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(cout,)), jnp.float32)
  out_shape = reference_layer(x, kernel, bias, None, strides, padding, 'none').shape
  shortcut = (jnp.asarray(rng.normal(size=out_shape), jnp.float32) if residual else None)
  ours = functools.partial(onednn.conv_layer, strides=strides, padding=padding,
                           activation=activation)
  theirs = functools.partial(reference_layer, strides=strides, padding=padding,
                             activation=activation)
  args = (x, kernel, bias, shortcut)
  y = jax.jit(ours)(*args)
  assert y.shape == out_shape and y.dtype == jnp.float32
  assert_close(y, theirs(*args))
  dy = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
  grads = jax.jit(lambda *a: jax.vjp(ours, *a)[1](dy))(*args)
  expected = jax.vjp(theirs, *args)[1](dy)
  assert len(grads) == 4 and (grads[3] is None) == (not residual)
  for name, g, e in zip(('x', 'kernel', 'bias', 'shortcut'), grads, expected):
    if e is not None:
      assert g.shape == e.shape, name
      assert_close(g, e)
  # x held constant (the images of a train step): the handler skips dx, and
  # the other gradients are unchanged.
  grads = jax.jit(lambda x, *a: jax.vjp(lambda *b: ours(x, *b), *a)[1](dy))(*args)
  for name, g, e in zip(('kernel', 'bias', 'shortcut'), grads, expected[1:]):
    if e is not None:
      assert_close(g, e)


@needs_build
def test_the_input_gradient_is_computed_only_where_it_is_needed():
  """In a model's gradient the first convolution, fed the images, asks the
  handler for no input gradient; the later ones do."""
  model = models.create_model({'name': 'et', 'num_modules': 1}, 4, 8,
                              conv=onednn.OneDNNConv)
  images = jnp.ones((2, 8, 8, 3))
  params = model.init(jax.random.key(0), images)['params']
  loss = lambda p: jnp.sum(model.apply({'params': p}, images))
  hlo = jax.jit(jax.grad(loss)).lower(params).as_text()
  flags = re.findall(r'et_onednn_conv_bwd.*?input_gradient = (true|false)', hlo)
  assert flags and flags.count('false') == 1, flags
  # The same for the input itself: differentiated, every layer computes dx.
  hlo = jax.jit(jax.grad(lambda x: jnp.sum(model.apply({'params': params}, x)))).lower(
      images).as_text()
  assert 'input_gradient = false' not in hlo and 'input_gradient = true' in hlo


@needs_build
def test_conv_layer_is_deterministic():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 16, 16, 16)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 16, 16)), jnp.float32) * 0.1
  bias = jnp.zeros(16)
  loss = jax.jit(jax.grad(lambda x, k, b: jnp.sum(
      onednn.conv_layer(x, k, b, activation='relu') ** 2), argnums=(0, 1, 2)))
  first, second = loss(x, kernel, bias), loss(x, kernel, bias)
  jax.tree.map(np.testing.assert_array_equal, first, second)


@needs_build
def test_et_model_equals_the_xla_model():
  """Same parameters, same logits and gradients, for plain and tanh E.T."""
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.uniform(size=(4, 8, 8, 3)), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 3])
  for config in ({'name': 'et', 'num_modules': 1},
                 {'name': 'et', 'num_modules': 1, 'activation': 'tanh',
                  'kernel_sizes': [1, 3, 5]},
                 {'name': 'et', 'num_modules': 1, 'block_type': 'three_branch'}):
    xla = models.create_model(config, 10, 8)
    ours = models.create_model(config, 10, 8, conv=onednn.OneDNNConv)
    params = xla.init(jax.random.key(0), images)
    assert (jax.tree.map(jnp.shape, params)
            == jax.tree.map(jnp.shape, ours.init(jax.random.key(0), images)))

    def loss(model, params):
      logits = model.apply(params, images)
      return optim.categorical_crossentropy(logits, labels).mean(), logits

    (l_xla, logits_xla), g_xla = jax.value_and_grad(
        functools.partial(loss, xla), has_aux=True)(params)
    (l_ours, logits_ours), g_ours = jax.jit(jax.value_and_grad(
        functools.partial(loss, ours), has_aux=True))(params)
    assert_close(logits_ours, logits_xla)
    assert float(l_ours) == pytest.approx(float(l_xla), rel=1e-5)
    jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-4), g_ours, g_xla)


@needs_build
def test_vgg16_equals_the_xla_model():
  images = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 32, 32, 3)), jnp.float32)
  xla = models.create_model({'name': 'vgg16'}, 5, 32)
  ours = models.create_model({'name': 'vgg16'}, 5, 32, conv=onednn.OneDNNConv)
  params = xla.init(jax.random.key(0), images)
  assert_close(jax.jit(ours.apply)(params, images), xla.apply(params, images), rtol=1e-4)


@needs_build
def test_training_steps_match_the_xla_steps(digits_data_dir):
  """Five train steps of 4 micro-batches each, oneDNN's convolutions against XLA's.

  Plain SGD, not Adam: its update is in proportion to the gradient, so a
  gradient off by a factor (a sum for a mean) shows in full, where Adam's
  normalised update would hide it but for its epsilon.
  """
  info = input_pipeline.get_dataset_info(tiny_config(digits_data_dir).data)
  split = input_pipeline.load_split(info, 'train')
  batch = next(input_pipeline.TrainInput(split, 64, seed=0).epoch(0))
  tx = optim.create_optimizer({'name': 'sgd', 'learning_rate': 0.1})
  results = {}
  for impl, conv in (('xla', models.Conv), ('onednn', onednn.OneDNNConv)):
    model = models.create_model({'name': 'et', 'num_modules': 1}, 10, 8, conv=conv)
    state = train.create_train_state(jax.random.key(0), model, 8, tx)
    initial = models.flatten_params(state.params)
    step = jax.jit(functools.partial(train.train_step, micro_batches=4,
                                     loss_fn=optim.categorical_crossentropy))
    losses = []
    for _ in range(5):
      state, metrics = step(state, batch, jax.random.key(1))
      losses.append(float(metrics.compute()['loss']))
    results[impl] = losses, initial, models.flatten_params(state.params)
  # Float32 rounding only, compounded over 5 steps. Measured: the losses
  # equal; each array within 8.7e-6 of how far XLA's run moved it. oneDNN's
  # kernel gradients taken 4x: 3.0-3.5 of the movement (losses 2.8e-3 off);
  # its bias gradients divided by 4: 0.75.
  np.testing.assert_allclose(results['onednn'][0], results['xla'][0], rtol=1e-4)
  _, initial, xla = results['xla']
  ours = results['onednn'][2]
  for path, value in xla.items():
    moved = float(jnp.max(jnp.abs(value - initial[path])))
    error = float(jnp.max(jnp.abs(ours[path] - value))) / moved
    assert error < 1e-3, (path, error, moved)


def test_conv_impl_choice(monkeypatch):
  from configs import default
  config = default.get_config()
  assert config.conv_impl == 'auto'

  def conv_impl(backend='cpu', devices=1):
    # The machine 'auto' sees, whatever this one is: a Linux x86-64 CPU.
    platform = settings.Platform(backend, device_count=devices, onednn_platform=True)
    return settings.resolve(config, platform).conv_impl

  monkeypatch.setattr(onednn, 'available', lambda: (True, ''))
  assert conv_impl('cpu') == 'onednn'  # one CPU device, float32
  assert conv_impl('gpu') == 'xla'
  monkeypatch.setattr(onednn, 'available', lambda: (False, 'no compiler'))
  assert conv_impl('cpu') == 'xla'
  monkeypatch.setattr(onednn, 'available', lambda: (True, ''))
  assert conv_impl('cpu', devices=2) == 'xla'
  config.compute_dtype = 'bfloat16'
  assert conv_impl('cpu') == 'xla'
  config.conv_impl = 'onednn'
  with pytest.raises(ValueError, match='computes in float32 only'):
    conv_impl('cpu')
  with pytest.raises(ValueError, match='computes in float32 only'):
    models.create_model({'name': 'et', 'num_modules': 1}, 10, 8, dtype=jnp.bfloat16,
                        conv=onednn.OneDNNConv).init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
  config.conv_impl = 'fast'
  with pytest.raises(ValueError, match=r"conv_impl must be one of \['auto', 'xla', 'onednn'\]"):
    conv_impl('cpu')
  config.conv_impl = 'onednn'
  config.compute_dtype = 'auto'
  with pytest.raises(ValueError, match="runs on CPUs only, but JAX's backend is 'gpu'"):
    conv_impl('gpu')


def test_bad_inputs_are_refused():
  x, kernel, bias = jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 3, 8)), jnp.ones(8)
  with pytest.raises(ValueError, match='float32 only'):
    onednn.conv_layer(x.astype(jnp.bfloat16), kernel, bias)
  with pytest.raises(ValueError, match='shapes do not match'):
    onednn.conv_layer(x, jnp.ones((3, 3, 4, 8)), bias)
  with pytest.raises(ValueError, match="activation must be one of"):
    onednn.conv_layer(x, kernel, bias, activation='gelu')


@needs_build  # the output's shape is known once the library is loaded
def test_a_shortcut_of_another_shape_is_refused():
  x, kernel, bias = jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 3, 8)), jnp.ones(8)
  with pytest.raises(ValueError, match=r'the shortcut has shape \(1, 4, 4, 3\), the output'):
    onednn.conv_layer(x, kernel, bias, jnp.ones((1, 4, 4, 3)))


def test_a_failed_build_says_why_and_caches_nothing(tmp_path, monkeypatch):
  monkeypatch.setenv('ET_FLAX_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  with pytest.raises(onednn.OneDNNUnavailableError, match="no-such-compiler.*conv_impl='xla'"):
    onednn.library_path()
  broken = tmp_path / 'broken-cxx'
  broken.write_text('#!/bin/sh\necho "cc1plus: fatal error: out of cheese" >&2\nexit 3\n')
  broken.chmod(0o755)
  monkeypatch.setenv('CXX', str(broken))
  with pytest.raises(onednn.OneDNNUnavailableError,
                     match=r"(?s)failed \(exit 3\).*out of cheese.*conv_impl='xla'"):
    onednn.library_path()
  assert not list(tmp_path.glob('*.so'))
  # $CXX still the broken compiler: the cache folder is refused before any
  # build (and no real compiler is needed here).
  blocker = tmp_path / 'a-file'
  blocker.write_text('')
  monkeypatch.setenv('ET_FLAX_CACHE', str(blocker / 'cache'))
  with pytest.raises(onednn.OneDNNUnavailableError, match=r'cannot create .*a-file/cache'):
    onednn.library_path()


@needs_build
def test_the_library_is_built_once_and_cached(tmp_path, monkeypatch):
  monkeypatch.setenv('ET_FLAX_CACHE', str(tmp_path))
  path = onednn.library_path()
  assert path.parent == tmp_path and path.suffix == '.so'
  built = path.stat().st_mtime_ns
  assert onednn.library_path() == path and path.stat().st_mtime_ns == built
  assert onednn.version().startswith('3.')


@needs_build
def test_jit_bias_gradient_at_batch_1024_equals_a_float64_sum():
  """The bias gradient sums g over 1024 x 64 x 64 positions.

  With gradients of one sign (1 + 0.1 N(0, 1)), oneDNN's own float32 bias
  gradient was 1.0e-5 and 1.3e-5 off a float64 sum (measured); XLA's
  reduction of g 2e-8 and 5e-8. The bound, 1e-6, sits between; the handler's
  sum (rows in float32, rows added in float64) must stay under it.
  """
  rng = np.random.default_rng(4)
  shape = (1024, 64, 64, 1)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel, bias = jnp.ones((1, 1, 1, 2), jnp.float32), jnp.zeros(2, jnp.float32)
  rng.normal(size=(*shape[:3], 2))  # keeps the draws as measured
  upstream = (1.0 + 0.1 * rng.normal(size=(*shape[:3], 2))).astype(np.float32)
  db = jax.jit(jax.grad(lambda b: jnp.sum(onednn.conv_layer(x, kernel, b) * upstream)))(bias)
  expected = upstream.astype(np.float64).sum(axis=(0, 1, 2))
  np.testing.assert_allclose(np.asarray(db, np.float64), expected, rtol=1e-6)


def test_geometry_onednn_cannot_run_is_a_value_error_before_the_call():
  x, bias = jnp.ones((1, 2, 4, 3)), jnp.zeros(8)
  with pytest.raises(ValueError, match=r'empty output: input \(1, 2, 4, 3\).*axis 1'):
    onednn.conv_layer(x, jnp.ones((3, 3, 3, 8)), bias, strides=(2, 2), padding='VALID')
  with pytest.raises(ValueError, match='padding >= 0'):
    onednn.conv_layer(jnp.ones((1, 6, 6, 3)), jnp.ones((3, 3, 3, 8)), bias,
                      padding=((-1, 0), (0, 0)))
  with pytest.raises(ValueError, match='strides >= 1'):
    onednn.conv_layer(jnp.ones((1, 6, 6, 3)), jnp.ones((3, 3, 3, 8)), bias, strides=(0, 1))


def _handler(target, results, *args, **attrs):
  onednn.load()
  attrs = {'stride_h': 1, 'stride_w': 1, 'pad_top': 0, 'pad_bottom': 0, 'pad_left': 0,
           'pad_right': 0, 'activation': 0, **attrs}
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  call = jax.ffi.ffi_call(target, tuple(f32(s) for s in results))
  attrs = {k: np.int64(v) for k, v in attrs.items()}
  if target == 'et_onednn_conv_bwd':
    attrs['input_gradient'] = True
  return jax.block_until_ready(call(*args, **attrs))


@needs_build
def test_the_handlers_check_every_shape_they_are_given():
  """A direct call with a wrong shape is refused by the C++ handler, not read
  out of bounds."""
  x, w = jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 3, 4))
  y = (2, 3, 3, 4)
  (out,) = _handler('et_onednn_conv_fwd', [y], x, w, jnp.ones(4))
  np.testing.assert_allclose(out, 28.0)  # 27 ones + the bias
  with pytest.raises(Exception, match=r'the bias must have shape \(4,\), got \(3\)'):
    _handler('et_onednn_conv_fwd', [y], x, w, jnp.ones(3))
  with pytest.raises(Exception, match=r'y \(2, 4, 4, 4\) is not the output of x'):
    _handler('et_onednn_conv_fwd', [(2, 4, 4, 4)], x, w, jnp.ones(4))
  with pytest.raises(Exception, match=r'padding >= 0'):
    _handler('et_onednn_conv_fwd', [y], x, w, jnp.ones(4), pad_top=-1)
  with pytest.raises(Exception, match=r'the shortcut \(2, 3, 4, 3\) must have the output'):
    _handler('et_onednn_conv_fwd_residual', [y], x, w, jnp.ones(4), jnp.ones((2, 3, 4, 3)))
  dy = jnp.ones(y)
  g, dx, dw, db = _handler('et_onednn_conv_bwd', [y, x.shape, w.shape, (4,)], x, w, out, dy)
  np.testing.assert_allclose(dw, 2 * 9)  # every kernel element sees 2 x 9 ones
  np.testing.assert_allclose(db, 2 * 3 * 3)  # dy's ones over 2 x 3 x 3 pixels
  with pytest.raises(Exception, match=r'dy and the results must have the shapes'):
    _handler('et_onednn_conv_bwd', [y, x.shape, (3, 3, 3, 3), (4,)], x, w, out, dy)
  with pytest.raises(Exception, match=r'dy and the results must have the shapes'):
    _handler('et_onednn_conv_bwd', [y, x.shape, w.shape, (4,)], x, w, out,
             jnp.ones((2, 3, 3, 3)))
  with pytest.raises(Exception, match=r'db must have shape \(4,\), got \(3\)'):
    _handler('et_onednn_conv_bwd', [y, x.shape, w.shape, (3,)], x, w, out, dy)


@needs_build
def test_build_key_covers_the_whole_command_and_both_packages(monkeypatch):
  cxx = onednn._compiler()
  key = onednn._build_key(cxx)
  command = onednn._build_command
  monkeypatch.setattr(onednn, '_build_command',
                      lambda cxx, out: [*command(cxx, out), '-DET_FLAX_LATE_FLAG'])
  assert onednn._build_key(cxx) != key  # an argument after the sixth counts
  monkeypatch.setattr(onednn, '_build_command', command)
  real_version = importlib.metadata.version
  versions = {onednn.LIBRARY_DIST: '2023.2.1', onednn.HEADERS_DIST: '2023.2.1'}
  monkeypatch.setattr(importlib.metadata, 'version',
                      lambda dist: versions.get(dist) or real_version(dist))
  assert onednn._build_key(cxx) != key  # both packages' versions count
  versions[onednn.HEADERS_DIST] = '2024.0.0'
  with pytest.raises(onednn.OneDNNUnavailableError,
                     match=r'headers \(onednn-devel-cpu-gomp 2024.0.0\) do not match the '
                           r'library \(onednn-cpu-gomp 2023.2.1\)'):
    onednn._build_key(cxx)
