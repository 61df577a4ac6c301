"""Models: E.T. maths against NumPy, layer and parameter counts, Keras layouts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from et_flax import models


def _init(model, size, batch_size=2, seed=0):
  x = jax.random.uniform(jax.random.key(seed + 1), (batch_size, size, size, 3))
  return model.init(jax.random.key(seed), x, train=False), x


def _conv_same_numpy(x, kernel, bias):
  """Cross-correlation with 'SAME' zero padding, stride 1, in float64."""
  k = kernel.shape[0]
  pad = k // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for a in range(k):
    for b in range(k):
      window = xp[:, a:a + x.shape[1], b:b + x.shape[2], :]
      out += np.einsum('nhwc,co->nhwo', window, kernel[a, b])
  return out + bias


NUMPY_ACTIVATIONS = {'relu': lambda v: np.maximum(v, 0.0), 'tanh': np.tanh}


# float32 sums of at most 9 * 16 = 144 products per conv, three convs deep:
# rounding stays near 1e-6 relative; 1e-5 leaves room without hiding a wrong
# placement of the shortcut or the activation (those change outputs by O(1)).
@pytest.mark.parametrize('kernel_size', [1, 3])
@pytest.mark.parametrize('activation', ['relu', 'tanh'])
def test_jit_et_block_equals_numpy(kernel_size, activation):
  block = models.ETBlock(features=16, kernel_size=kernel_size, activation=activation)
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 16))
  variables = block.init(jax.random.key(1), x, train=False)
  # Non-zero biases so a misplaced bias would show.
  variables = jax.tree.map(
      lambda v: v + 0.1 * jax.random.normal(jax.random.key(2), v.shape), variables)
  got = jax.jit(lambda v, x: block.apply(v, x, train=False))(variables, x)

  act = NUMPY_ACTIVATIONS[activation]
  params = jax.tree.map(lambda v: np.asarray(v, np.float64), variables['params'])
  h = np.asarray(x, np.float64)
  for i in range(3):
    h = _conv_same_numpy(h, params[f'conv{i}']['kernel'], params[f'conv{i}']['bias'])
    if i < 2:
      h = act(h)
  expected = act(h + np.asarray(x, np.float64))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_jit_three_branch_block_equals_numpy():
  block = models.ETThreeBranchBlock(features=16, kernel_sizes=(1, 3))
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 16))
  variables = block.init(jax.random.key(1), x, train=False)
  got = jax.jit(lambda v, x: block.apply(v, x, train=False))(variables, x)

  params = jax.tree.map(lambda v: np.asarray(v, np.float64), variables['params'])
  relu = NUMPY_ACTIVATIONS['relu']
  x64 = np.asarray(x, np.float64)
  branches = [x64]
  for k in (1, 3):
    h = x64
    for i in range(3):
      layer = params[f'branch{k}_conv{i}']
      h = relu(_conv_same_numpy(h, layer['kernel'], layer['bias']))
    branches.append(h)
  merged = np.concatenate(branches, axis=-1)
  expected = relu(_conv_same_numpy(merged, params['merge_conv']['kernel'],
                                   params['merge_conv']['bias']))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_jit_et_forward_equals_numpy_head():
  """Stem, blocks and head of plain E.T. composed as the report describes."""
  model = models.ETNet(num_classes=7, num_modules=1, hidden_units=8)
  variables, x = _init(model, 5)
  got = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), variables['params'])
  relu = NUMPY_ACTIVATIONS['relu']
  h = relu(_conv_same_numpy(np.asarray(x, np.float64), p['stem_conv']['kernel'],
                            p['stem_conv']['bias']))
  for block in ('block0', 'block1'):
    shortcut = h
    for i in range(3):
      h = _conv_same_numpy(h, p[block][f'conv{i}']['kernel'], p[block][f'conv{i}']['bias'])
      h = relu(h) if i < 2 else relu(h + shortcut)
  h = h.mean(axis=(1, 2))
  h = relu(h @ p['hidden']['kernel'] + p['hidden']['bias'])
  expected = h @ p['logits']['kernel'] + p['logits']['bias']
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _numpy_et(weights, x, num_modules, activation):
  """E.T.'s forward pass in float64 NumPy, written from the report (§2, Fig. 3).

  A 3x3 stem conv; `num_modules` modules of block x (three 1x1 convs) then
  block y (three 3x3 convs), each block adding its input to its third conv's
  output, as ResNet's identity block: the activation after each of the first
  two convs and after the sum; global average pooling; Dense + activation;
  Dense (the logits; the softmax is the loss's). `weights` maps 'stem',
  ('x' or 'y', module, conv), 'hidden' and 'logits' to (kernel, bias).
  """
  act = NUMPY_ACTIVATIONS[activation]
  h = act(_conv_same_numpy(x, *weights['stem']))
  for module in range(num_modules):
    for block in ('x', 'y'):
      shortcut = h
      for conv in range(3):
        h = _conv_same_numpy(h, *weights[block, module, conv])
        h = act(h + shortcut) if conv == 2 else act(h)
  h = h.mean(axis=(1, 2))
  kernel, bias = weights['hidden']
  h = act(h @ kernel + bias)
  kernel, bias = weights['logits']
  return h @ kernel + bias


def _random_et_weights(rng, features, num_modules, hidden, classes):
  """He-scaled normal kernels (each block's branch about as large as its
  shortcut, so a misplaced activation or shortcut changes the logits by their
  own order) and N(0, 0.1) biases, float32."""
  shapes = {'stem': (3, 3, 3, features), 'hidden': (features, hidden),
            'logits': (hidden, classes)}
  for module in range(num_modules):
    for conv in range(3):
      shapes['x', module, conv] = (1, 1, features, features)
      shapes['y', module, conv] = (3, 3, features, features)
  return {name: (rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape).astype(np.float32),
                 rng.normal(0, 0.1, shape[-1]).astype(np.float32))
          for name, shape in shapes.items()}


def _et_layer_name(name):
  """The reference's layer name as Flax's module path (block x of module m is
  block 2m, block y block 2m + 1)."""
  if isinstance(name, str):
    return name if name != 'stem' else 'stem_conv'
  block, module, conv = name
  return f'block{2 * module + (block == "y")}/conv{conv}'


def _error(got, expected):
  """Largest |difference| in units of the reference's largest |value|."""
  expected = np.asarray(expected, np.float64)
  return float(np.abs(np.asarray(got, np.float64) - expected).max() / np.abs(expected).max())


# float32 against float64, 25 convs deep: measured (seeds 0-2, both configs) at
# most 3.4e-7 of the logits' largest value for Flax, 6.2e-7 for Keras (oneDNN);
# the bound is 8x that. Wiring mistakes move them by 0.1-1.7 of it (measured: a
# shortcut added one conv early, the activation before the sum, no activation
# after the stem or the hidden Dense); block y before block x fails the shapes.
FORWARD_TOLERANCE = 5e-6


@pytest.mark.parametrize('config', [
    {'name': 'et'},
    {'name': 'et', 'width': 2, 'num_modules': 2, 'activation': 'tanh'},
], ids=['plain', 'wide-2-modules-tanh'])
def test_jit_et_forward_equals_numpy_reference(config):
  """The whole E.T., Flax and Keras (`keras_models.build_keras_et`), against
  `_numpy_et`: the same random weights given to each by layer name, so that a
  wiring mistake made on both sides (which the Keras parity tests pass) fails.
  """
  size, classes, hidden = 12, 10, 256
  # The report's plain E.T. unless the config says otherwise: read here, not
  # from the model, so that a field the model ignored would show.
  num_modules = config.get('num_modules', 4)
  activation = config.get('activation', 'relu')
  model = models.create_model(config, classes, size)
  assert model.hidden_units == hidden  # the report gives none; ours is a default
  rng = np.random.default_rng(0)
  weights = _random_et_weights(rng, 16 * config.get('width', 1), num_modules, hidden,
                               classes)
  x = rng.uniform(0, 1, (2, size, size, 3)).astype(np.float32)
  expected = _numpy_et({k: tuple(np.float64(a) for a in v) for k, v in weights.items()},
                       np.float64(x), num_modules, activation)

  params = {}
  for name, (kernel, bias) in weights.items():
    node = params
    for part in _et_layer_name(name).split('/'):
      node = node.setdefault(part, {})
    node.update(kernel=kernel, bias=bias)
  # Every parameter of the model set, with its shape; none left over.
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, shapes['params'])
  got = jax.jit(lambda v, x: model.apply(v, x))({'params': params}, x)
  assert _error(got, expected) < FORWARD_TOLERANCE, _error(got, expected)

  pytest.importorskip('keras')
  from et_flax.keras import models as keras_models  # pylint: disable=import-outside-toplevel
  keras_model = keras_models.build_keras_et(config, classes, size)
  for name, arrays in weights.items():
    keras_model.get_layer(_et_layer_name(name).replace('/', '_')).set_weights(arrays)
  assert len([layer for layer in keras_model.layers if layer.weights]) == len(weights)
  got = keras_model(x, training=False)
  assert _error(got, expected) < FORWARD_TOLERANCE, _error(got, expected)


MODEL_CONFIGS = [
    ({'name': 'et'}, 8),
    ({'name': 'et', 'width': 2, 'activation': 'tanh'}, 8),
    ({'name': 'et', 'batch_norm': True, 'stem_pool': True, 'kernel_sizes': (1, 3, 5)}, 8),
    ({'name': 'et', 'block_type': 'three_branch', 'dropout_rate': 0.5,
      'block_dropout_rate': 0.1}, 8),
    ({'name': 'vgg16'}, 32),
    ({'name': 'resnet50'}, 32),
]


@pytest.mark.parametrize('config,size', MODEL_CONFIGS)
def test_compiled_forward_equals_eager(config, size):
  model = models.create_model(config, num_classes=10, image_size=size)
  variables, x = _init(model, size)
  eager = model.apply(variables, x, train=False)
  jitted = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert eager.shape == (2, 10)
  # Same ops, but XLA may fuse and reorder float32 sums differently.
  np.testing.assert_allclose(jitted, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('num_modules,expected', [(4, 27), (8, 51)])
def test_jit_weighted_layer_count(num_modules, expected):
  model = models.ETNet(num_classes=200, num_modules=num_modules)
  variables, _ = _init(model, 4)
  layers = models.weighted_layers(variables['params'])
  assert len(layers) == expected
  assert sum('conv' in name for name in layers) == expected - 2


def _et_params_by_hand(width, num_modules, hidden=256, classes=200):
  f = 16 * width
  stem = 3 * 3 * 3 * f + f
  block_x = 3 * (1 * 1 * f * f + f)
  block_y = 3 * (3 * 3 * f * f + f)
  head = (f * hidden + hidden) + (hidden * classes + classes)
  return stem + num_modules * (block_x + block_y) + head


@pytest.mark.parametrize('variant,width,num_modules,expected', [
    ('plain', 1, 4, 87_304),
    ('wide', 2, 4, 184_392),
    ('deep', 1, 8, 118_408),
])
def test_jit_parameter_count_equals_hand_arithmetic(variant, width, num_modules,
                                                    expected):
  del variant
  assert _et_params_by_hand(width, num_modules) == expected
  model = models.ETNet(num_classes=200, width=width, num_modules=num_modules)
  variables, _ = _init(model, 4)
  assert models.count_params(variables['params']) == expected


def _binomial_bound(rate, count, sigmas=5.0):
  return sigmas * np.sqrt(rate * (1 - rate) / count)


def test_jit_dropout_equals_numpy_inverted_dropout_at_its_places():
  """E.T.'s dropouts in training mode against a float64 NumPy forward pass.

  Placement (models.ETBlock, ETNet; the report's dropout 0.5 before the last
  fully-connected layer, and its future work's dropout 0.1 inside each block
  between the convs, after the ReLU, as in wide ResNets): block dropout after
  the activation of conv0 and of conv1 in every block, head dropout after
  the hidden Dense's activation. The masks are read from the Dropout modules' outputs;
  the NumPy pass applies them at those places with inverted-dropout scaling
  1 / (1 - rate) and must reproduce every dropout output and the logits
  (float32 against float64: 1e-5, as the forward test above).

  Rates: each site's fraction of zeroed activations, counted where the input
  is positive (a zero input says nothing), must be within 5 binomial
  standard deviations of its rate (a chance failure below 1e-6 per site):
  for the 0.1 sites over 6,900-9,200 positives each, +-0.016-0.018 (measured
  0.0999-0.1075); for the 0.5 head over 62,000, +-0.010 (measured 0.5034).
  1x1 images and NumPy-drawn weights keep it fast: on the 2-core CPU, XLA
  took ~10 s to compile a random draw of shape (64, 8, 8, 16) (a dropout
  mask; `model.init`'s glorot kernels likewise), ~1 s for (1024, 1, 1, 16).
  """
  block_rate, head_rate = 0.1, 0.5
  model = models.ETNet(num_classes=10, num_modules=1, hidden_units=128,
                       dropout_rate=head_rate, block_dropout_rate=block_rate)
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (1024, 1, 1, 3)).astype(np.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  # He-scaled kernels and non-zero biases: about half the activations positive.
  variables = jax.tree.map(
      lambda s: (rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape) if len(s.shape) > 1
                 else rng.normal(0, 0.1, s.shape)).astype(np.float32), shapes)
  logits, state = jax.jit(lambda v, x, key: model.apply(
      v, x, train=True, rngs={'dropout': key}, capture_intermediates=True,
      mutable=['intermediates']))(variables, x, jax.random.key(5))
  captured = state['intermediates']
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), variables['params'])
  relu = NUMPY_ACTIVATIONS['relu']
  zeroed = {}

  def dropout(activation, site, rate):
    got = np.asarray(site['__call__'][0], np.float64)
    kept = got != 0
    expected = np.where(kept, activation / (1 - rate), 0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    positive = activation > 1e-6
    assert positive.sum() > 0.3 * positive.size
    fraction = ((~kept) & positive).sum() / positive.sum()
    zeroed.setdefault(rate, []).append((fraction, positive.sum()))
    return expected

  h = relu(_conv_same_numpy(np.asarray(x, np.float64), p['stem_conv']['kernel'],
                            p['stem_conv']['bias']))
  for block in ('block0', 'block1'):
    shortcut = h
    for i in range(3):
      h = _conv_same_numpy(h, p[block][f'conv{i}']['kernel'], p[block][f'conv{i}']['bias'])
      if i < 2:
        h = dropout(relu(h), captured[block][f'Dropout_{i}'], block_rate)
      else:
        h = relu(h + shortcut)
  h = relu(h.mean(axis=(1, 2)) @ p['hidden']['kernel'] + p['hidden']['bias'])
  h = dropout(h, captured['Dropout_0'], head_rate)
  expected = h @ p['logits']['kernel'] + p['logits']['bias']
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)

  assert len(zeroed[block_rate]) == 4 and len(zeroed[head_rate]) == 1
  for rate, sites in zeroed.items():
    for fraction, count in sites:
      assert abs(fraction - rate) < _binomial_bound(rate, count), (rate, fraction, count)


def test_dropout_active_only_when_training():
  model = models.ETNet(num_classes=10, dropout_rate=0.5, block_dropout_rate=0.1,
                       num_modules=1)
  variables, x = _init(model, 6, batch_size=4)
  apply = jax.jit(lambda v, x, key, train: model.apply(
      v, x, train=train, rngs={'dropout': key}), static_argnums=3)
  eval_a = apply(variables, x, jax.random.key(1), False)
  eval_b = apply(variables, x, jax.random.key(2), False)
  np.testing.assert_array_equal(eval_a, eval_b)
  np.testing.assert_array_equal(eval_a, model.apply(variables, x))
  train_a = apply(variables, x, jax.random.key(1), True)
  train_b = apply(variables, x, jax.random.key(2), True)
  assert np.abs(train_a - eval_a).max() > 1e-3
  assert np.abs(train_a - train_b).max() > 1e-3
  np.testing.assert_array_equal(train_a, apply(variables, x, jax.random.key(1), True))


def test_same_key_same_output():
  model = models.ETNet(num_classes=10, num_modules=1)
  a, x = _init(model, 6, seed=3)
  b, _ = _init(model, 6, seed=3)
  c, _ = _init(model, 6, seed=4)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.allclose(a['params']['stem_conv']['kernel'],
                         c['params']['stem_conv']['kernel'])
  np.testing.assert_array_equal(model.apply(a, x), model.apply(b, x))


def test_stem_pool_halves_resolution():
  model = models.ETNet(num_classes=3, stem_pool=True, num_modules=1)
  variables, x = _init(model, 6)
  _, state = jax.jit(lambda v, x: model.apply(
      v, x, capture_intermediates=True, mutable=['intermediates']))(variables, x)
  captured = state['intermediates']
  stem = np.maximum(np.asarray(captured['stem_conv']['__call__'][0]), 0.0)
  pooled = stem.reshape(2, 3, 2, 3, 2, 16).max(axis=(2, 4))
  block0 = models.ETBlock(features=16, kernel_size=1).apply(
      {'params': variables['params']['block0']}, jnp.asarray(pooled), train=False)
  np.testing.assert_allclose(captured['block0']['__call__'][0], block0, rtol=1e-5,
                             atol=1e-6)
  assert captured['block1']['__call__'][0].shape == (2, 3, 3, 16)


def test_kernel_sizes_alternate():
  model = models.ETNet(num_classes=3, kernel_sizes=(1, 3, 5))
  variables, _ = _init(model, 4)
  sizes = [variables['params'][f'block{i}']['conv0']['kernel'].shape[0]
           for i in range(8)]
  assert sizes == [1, 3, 5, 1, 3, 5, 1, 3]


def test_batch_norm_after_every_conv():
  model = models.ETNet(num_classes=3, batch_norm=True)
  variables, _ = _init(model, 4)
  stats = models.flatten_params(variables['batch_stats'])
  assert sum(path.endswith('/mean') for path in stats) == 25


def _keras_layers(keras_model):
  return [(layer.name, [tuple(w.shape) for w in layer.weights])
          for layer in keras_model.layers if layer.weights]


def _our_layers(model, size):
  variables, _ = _init(model, size, batch_size=1)
  layers = []
  for name, layer in variables['params'].items():
    if name == 'predictions':
      continue
    if 'kernel' in layer:
      shapes = [layer['kernel'].shape, layer['bias'].shape]
    else:
      stats = variables['batch_stats'][name]
      shapes = [layer['scale'].shape, layer['bias'].shape, stats['mean'].shape,
                stats['var'].shape]
    layers.append((name, [tuple(s) for s in shapes]))
  return layers


@pytest.mark.parametrize('name', ['vgg16', 'resnet50'])
def test_keras_applications_layers_in_same_order(name):
  keras = pytest.importorskip('keras')
  builders = {'vgg16': keras.applications.VGG16,
              'resnet50': keras.applications.ResNet50}
  keras_model = builders[name](weights=None, include_top=False,
                               input_shape=(32, 32, 3))
  ours = _our_layers(models.create_model({'name': name}, 10), 32)
  assert ours == _keras_layers(keras_model)


@pytest.mark.parametrize('config,message', [
    ({'name': 'lenet'}, "valid names: ['et', 'resnet50', 'vgg16']"),
    ({'name': 'et', 'width': 0}, 'model.width must be a positive integer'),
    ({'name': 'et', 'width': -2}, 'model.width must be a positive integer'),
    ({'name': 'et', 'num_modules': 0}, 'model.num_modules must be a positive integer'),
    ({'name': 'et', 'activation': 'gelu'}, "model.activation must be one of"),
    ({'name': 'et', 'kernel_sizes': (2,)}, 'positive odd integers'),
    ({'name': 'et', 'dropout_rate': 1.0}, 'model.dropout_rate must be a rate'),
    ({'name': 'et', 'depth': 3}, "Unknown field(s) ['depth']"),
    ({'name': 'vgg16', 'width': 2}, "Unknown field(s) ['width']"),
])
def test_bad_model_config_is_a_clear_error(config, message):
  with pytest.raises(ValueError) as error:
    models.create_model(config, num_classes=10, image_size=32)
  assert message in str(error.value)


@pytest.mark.parametrize('config,size', [
    ({'name': 'vgg16'}, 16), ({'name': 'resnet50'}, 31),
    ({'name': 'et', 'stem_pool': True}, 1)])
def test_image_size_the_model_cannot_take(config, size):
  with pytest.raises(ValueError, match=f'cannot take {size}x{size} images'):
    models.create_model(config, num_classes=10, image_size=size)


@pytest.mark.parametrize('shape', [(3, 3, 3, 16), (256, 200)])
def test_flat_glorot_draws_are_jaxs_bit_for_bit(shape):
  key = jax.random.key(7)
  np.testing.assert_array_equal(models.glorot_uniform(key, shape),
                                nn.initializers.glorot_uniform()(key, shape))


@pytest.mark.parametrize('shape,rate', [((4, 8, 8, 16), 0.1), ((4, 256), 0.5)])
def test_flat_dropout_masks_are_flax_dropouts_bit_for_bit(shape, rate):
  x = jax.random.normal(jax.random.key(0), shape) + 3.0  # no exact zeros
  rngs = {'dropout': jax.random.key(1)}
  ours = models.Dropout(rate, deterministic=False).apply({}, x, rngs=rngs)
  flax = nn.Dropout(rate, deterministic=False).apply({}, x, rngs=rngs)
  np.testing.assert_array_equal(ours, flax)
  assert 0 < float(jnp.mean(ours == 0)) < 2 * rate


_RNG = np.random.default_rng(0)
# name: (input, window). Ties everywhere: ReLU zeros, integers 0..2, all zeros.
MAX_POOL_CASES = {
    'relu_ties': (np.maximum(_RNG.normal(size=(2, 8, 8, 5)), 0.0), 2),
    'small_integers': (_RNG.integers(0, 3, (2, 8, 8, 5)), 2),
    'all_zeros': (np.zeros((2, 6, 6, 3)), 2),
    'odd_size': (np.maximum(_RNG.normal(size=(2, 7, 9, 3)), 0.0), 2),
    'window3': (_RNG.integers(0, 3, (2, 9, 9, 4)), 3),
    'non_square': (np.maximum(_RNG.normal(size=(3, 6, 10, 2)), 0.0), 2),
}


@pytest.mark.parametrize('case', list(MAX_POOL_CASES))
def test_jit_max_pool_equals_flax_bit_for_bit(case):
  """models.max_pool against nn.max_pool (XLA's reduce-window and, for the
  gradient, select-and-scatter), values and gradients exactly, under jit.

  With ties the gradient must go to the first maximum of each window in
  row-major order; rows and columns cropped by VALID (odd sizes) get zero.
  """
  x, k = MAX_POOL_CASES[case]
  x = jnp.asarray(x, jnp.float32)
  n, h, w, c = x.shape
  # NumPy draws: a jax.random draw compiles anew for every shape.
  dy = np.random.default_rng(1).normal(size=(n, h // k, w // k, c)).astype(np.float32)

  def value_and_grad(pool):  # pool(x) and the gradient of sum(pool(x) * dy)
    loss = lambda v, dy: jnp.sum(pool(v) * dy)
    return jax.jit(lambda x, dy: (pool(x), jax.grad(loss)(x, dy)))(x, dy)

  got_y, got_dx = value_and_grad(lambda v: models.max_pool(v, k))
  want_y, want_dx = value_and_grad(lambda v: nn.max_pool(v, (k, k), strides=(k, k)))
  np.testing.assert_array_equal(got_y, want_y)
  np.testing.assert_array_equal(got_dx, want_dx)
  # One dy entry per window, none on the cropped border.
  assert np.count_nonzero(want_dx) == dy.size
  assert not np.any(np.asarray(got_dx)[:, (h // k) * k:])
  assert not np.any(np.asarray(got_dx)[:, :, (w // k) * k:])
  # Forward mode too: the tangent is the first maximum's.
  t = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
  tangent = lambda pool: jax.jit(lambda x, t: jax.jvp(pool, (x,), (t,))[1])(x, t)
  np.testing.assert_array_equal(tangent(lambda v: models.max_pool(v, k)),
                                tangent(lambda v: nn.max_pool(v, (k, k), strides=(k, k))))
