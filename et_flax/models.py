"""Flax Linen models: E.T. with every variant of the report, VGG16 and ResNet50.

All models are pure `flax.linen` modules over NHWC float images and return
logits (the softmax lives in the loss). `create_model` builds any of them from
`config.model`, a mapping with a `name` and the module's fields. Each model
says what a run's settings need to know of it (`ModelFacts`: batch norm, its
widest activation, the smallest image it takes); `facts(config.model)` asks.

Initialisation follows Keras (glorot-uniform kernels, zero biases) so that a
model trained here starts where the report's Keras model started.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Random draws on a flat shape, reshaped. Threefry's counters follow the
# row-major index, so the numbers are jax's bit for bit (tests/test_models.py),
# but XLA:CPU compiles a flat draw far faster than a 4-D one: a (64, 8, 8, 16)
# Bernoulli mask took 9.3 s to compile against 0.6-0.9 s flat (docs/performance.md).


def glorot_uniform(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32
                   ) -> jax.Array:
  """nn.initializers.glorot_uniform(), drawn flat (the same numbers)."""
  shape = tuple(shape)
  receptive_field = math.prod(shape[:-2])
  fan_in, fan_out = shape[-2] * receptive_field, shape[-1] * receptive_field
  variance = jnp.array(1.0 / ((fan_in + fan_out) / 2), dtype=dtype)
  draw = jax.random.uniform(key, (math.prod(shape),), dtype, -1)
  return draw.reshape(shape) * jnp.sqrt(3 * variance)


class Dropout(nn.Dropout):
  """nn.Dropout with its mask drawn flat: the same mask, as the same `Dropout_i`."""

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None,
               rng: jax.Array | None = None) -> jax.Array:
    deterministic = nn.merge_param('deterministic', self.deterministic, deterministic)
    if self.broadcast_dims:
      raise NotImplementedError('et_flax.models.Dropout draws whole masks only')
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep = 1.0 - self.rate
    rng = self.make_rng(self.rng_collection) if rng is None else rng
    mask = jax.random.bernoulli(rng, p=keep, shape=(inputs.size,)).reshape(inputs.shape)
    return jax.lax.select(mask, inputs / keep, jnp.zeros_like(inputs))


KERNEL_INIT = glorot_uniform
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': nn.relu,
    'tanh': nn.tanh,
}
ET_BLOCK_TYPES = ('residual', 'three_branch')
# The classifier layers: trained anew on a pretrained backbone.
HEAD_NAMES = ('predictions', 'logits', 'hidden')


# A layer class, or a partial of one, that the models call as a convolution
# (flax imagenet's `conv: ModuleDef = nn.Conv`).
ModuleDef = Any


@dataclasses.dataclass(frozen=True)
class ModelFacts:
  """What a run's settings need to know of a model, without building its steps.

  Every model class says them in a `facts()` method; a new model adds one.
  """
  # Batch norm anywhere: a batch split into micro-batches would be normalised
  # part by part, so such a model trains on whole batches.
  batch_norm: bool
  # Channels of its widest activation, counted at the input's resolution (an
  # activation at half the side counts a quarter of its channels): its
  # float32 bytes per image are image_size**2 * 4 times this.
  widest_channels: int
  # The smallest image side it takes (e.g. 32 after five stride-2 stages).
  min_image_size: int = 1
  # The `keras.applications` model with the same layers, if there is one.
  keras_application: str | None = None


def _window_view(x: jax.Array, window: int) -> jax.Array:
  """(N, H, W, C) cropped to whole windows, as (N, H/k, k, W/k, k, C)."""
  n, h, w, c = x.shape
  oh, ow = h // window, w // window
  x = x[:, :oh * window, :ow * window]
  return x.reshape(n, oh, window, ow, window, c)


def _windows(x: jax.Array, window: int) -> jax.Array:
  """Each window's values in row-major order: (N, H/k, W/k, k*k, C)."""
  view = _window_view(x, window)
  n, oh, _, ow, _, c = view.shape
  return view.transpose(0, 1, 3, 2, 4, 5).reshape(n, oh, ow, window * window, c)


def _first_max(x: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
  """The pooled maxima and a mask, over `_windows`, of each window's first
  maximum."""
  flat = _windows(x, window)
  y = jnp.max(flat, axis=3)
  is_max = flat == y[:, :, :, None, :]
  # Only the first maximum: no earlier position of the window is a maximum.
  return y, is_max & (jnp.cumsum(is_max, axis=3) == 1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def max_pool(x: jax.Array, window: int = 2) -> jax.Array:
  """Max over non-overlapping `window` x `window` windows (stride = window, VALID).

  Equals `nn.max_pool(x, (k, k), strides=(k, k))`, derivatives included: the
  tangent (and so the gradient) is the first maximum's of each window in
  row-major order, as XLA's select-and-scatter gives it (ties are common
  after a ReLU); a window holding NaN gives NaN and no gradient. Written as a
  reshape and elementwise ops, which XLA:CPU fuses: the gradient of a
  (4, 64, 64, 64) pool takes 0.45 ms, select-and-scatter's 7.5
  (docs/performance.md).
  """
  return jnp.max(_window_view(x, window), axis=(2, 4))


@max_pool.defjvp
def _max_pool_jvp(window, primals, tangents):
  (x,), (dx,) = primals, tangents
  y, first = _first_max(x, window)
  # Linear in dx (the mask is a constant), so reverse mode transposes it.
  t = _windows(dx, window)
  return y, jnp.sum(jnp.where(first, t, jnp.zeros_like(t)), axis=3)


class Conv(nn.Module):
  """`activation(conv(x) + bias [+ shortcut])` with XLA's operations.

  The models' convolution layer; `et_flax.cpu.onednn.OneDNNConv` takes the same
  fields and call, and the same parameters ('kernel' (kh, kw, in, out) and
  'bias', as `nn.Conv`'s), so a checkpoint or Keras file serves either. A
  1x1, stride-1 convolution is written as a matmul over channels: XLA:CPU runs
  it and its gradients 2.4x faster than the equivalent convolution
  (docs/performance.md).
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: Any = 'SAME'
  activation: str = 'none'
  dtype: Any = jnp.float32  # the compute dtype; parameters stay float32
  kernel_init: Any = KERNEL_INIT

  @nn.compact
  def __call__(self, x: jax.Array, shortcut: jax.Array | None = None) -> jax.Array:
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if k == 1 and self.strides == 1:
      y = jnp.einsum('nhwc,co->nhwo', x, kernel[0, 0])
    else:
      y = jax.lax.conv_general_dilated(x, kernel, (self.strides, self.strides),
                                       self.padding,
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = y + bias
    if shortcut is not None:
      y = y + shortcut
    return y if self.activation == 'none' else ACTIVATIONS[self.activation](y)


def _conv_act(x: jax.Array, features: int, kernel_size: int, name: str, activation: str,
              *, conv: ModuleDef, dtype: Any, shortcut: jax.Array | None = None,
              strides: int = 1, padding: Any = 'SAME',
              norm: Callable[[], nn.Module] | None = None) -> jax.Array:
  """`activation(norm(conv(x)) [+ shortcut])`, the conv named `name`.

  Without a norm the layer applies the shortcut and activation itself (one
  fused call with oneDNN); `norm` makes the normalisation layer (after the
  conv, so parameters keep Keras's order).
  """
  if norm is None:
    return conv(features, kernel_size, strides=strides, padding=padding,
                activation=activation, dtype=dtype, name=name)(x, shortcut)
  x = conv(features, kernel_size, strides=strides, padding=padding, dtype=dtype,
           name=name)(x)
  x = norm()(x)
  if shortcut is not None:
    x = x + shortcut
  return x if activation == 'none' else ACTIVATIONS[activation](x)


def _dense(features: int, name: str, dtype: Any = jnp.float32) -> nn.Dense:
  return nn.Dense(features, kernel_init=KERNEL_INIT, name=name, dtype=dtype)


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


class ETBlock(nn.Module):
  """E.T.'s residual block: three convs of one kernel size plus the identity.

  The shortcut is added after the third conv and the activation follows the
  sum, as in ResNet's identity block; the first two convs are each followed by
  the activation (and by dropout when `dropout_rate` > 0, the wide-ResNet
  placement the report proposes as future work).
  """
  features: int
  kernel_size: int
  activation: str = 'relu'
  batch_norm: bool = False
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    shortcut = x
    for i in range(3):
      norm = (functools.partial(_et_batch_norm, train, f'bn{i}', self.dtype)
              if self.batch_norm else None)
      x = _conv_act(x, self.features, self.kernel_size, f'conv{i}', self.activation,
                    conv=self.conv, dtype=self.dtype, norm=norm,
                    shortcut=shortcut if i == 2 else None)
      if i < 2:
        x = Dropout(self.dropout_rate, deterministic=not train)(x)
    return x


class ETThreeBranchBlock(nn.Module):
  """The report's original block (its footnote 3).

  One branch of three convs per kernel size (1x1 and 3x3 in the report) and an
  identity branch, concatenated on channels and merged by a 1x1 conv.
  """
  features: int
  kernel_sizes: Sequence[int]
  activation: str = 'relu'
  batch_norm: bool = False
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    def norm(name):
      return (functools.partial(_et_batch_norm, train, name, self.dtype)
              if self.batch_norm else None)

    outputs = [x]
    for kernel_size in self.kernel_sizes:
      y = x
      for i in range(3):
        if i > 0:
          y = Dropout(self.dropout_rate, deterministic=not train)(y)
        y = _conv_act(y, self.features, kernel_size, f'branch{kernel_size}_conv{i}',
                      self.activation, conv=self.conv, dtype=self.dtype,
                      norm=norm(f'branch{kernel_size}_bn{i}'))
      outputs.append(y)
    return _conv_act(jnp.concatenate(outputs, axis=-1), self.features, 1, 'merge_conv',
                     self.activation, conv=self.conv, dtype=self.dtype,
                     norm=norm('merge_bn'))


def _et_batch_norm(train: bool, name: str, dtype: Any = jnp.float32) -> nn.BatchNorm:
  # Keras BatchNormalization defaults: momentum 0.99, epsilon 1e-3; its learned
  # scale and offset are the report's "batch norm + scale" pair.
  return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3,
                      name=name, dtype=dtype)


class ETNet(nn.Module):
  """The Extractor Team network of the report, with its variants as fields.

  Plain E.T. (the defaults): a 3x3 stem conv with 16 filters, 4 modules of
  block x (three 1x1 convs) then block y (three 3x3 convs), global average
  pooling, Dense(hidden_units) + activation, Dense(num_classes): 25 convs and
  2 dense layers, no downsampling.

  Attributes:
    num_classes: width of the last Dense.
    width: the wide-ResNet factor k; every conv has 16 * k filters.
    num_modules: modules of two blocks each (4 plain, 8 for the deep variant).
    activation: 'relu' or 'tanh', used after every conv and the hidden Dense.
    hidden_units: width of the hidden Dense (the report does not give it).
    dropout_rate: dropout before the last Dense (the report's 0.5).
    stem_pool: a 2x2 max-pool with stride 2 after the stem (the stride
      experiment).
    batch_norm: batch norm with learned scale and offset after every conv.
    block_dropout_rate: dropout between the convs inside each block.
    kernel_sizes: the 2 * num_modules residual blocks take their kernel size
      from this sequence in turn: (1, 3) is plain E.T., (1, 3, 5) the
      report's proposed alternation. In a three-branch block, one branch per
      kernel size.
    block_type: 'residual' (the report's final design) or 'three_branch'
      (footnote 3: one three-branch block per module).
    dtype: the compute dtype (bfloat16 on GPUs); parameters stay float32
      and the logits come out float32.
    conv: the convolution layer: `Conv` (XLA's) or `onednn.OneDNNConv`
      (float32, CPUs); the parameters are the same.
  """
  num_classes: int
  width: int = 1
  num_modules: int = 4
  activation: str = 'relu'
  hidden_units: int = 256
  dropout_rate: float = 0.0
  stem_pool: bool = False
  batch_norm: bool = False
  block_dropout_rate: float = 0.0
  kernel_sizes: Sequence[int] = (1, 3)
  block_type: str = 'residual'
  dtype: Any = jnp.float32
  conv: ModuleDef = Conv

  def __post_init__(self):
    _check_positive_int('model.num_classes', self.num_classes)
    _check_positive_int('model.width', self.width)
    _check_positive_int('model.num_modules', self.num_modules)
    _check_positive_int('model.hidden_units', self.hidden_units)
    _check(self.activation in ACTIVATIONS,
           f'model.activation must be one of {sorted(ACTIVATIONS)}, got '
           f'{self.activation!r}')
    _check(self.block_type in ET_BLOCK_TYPES,
           f'model.block_type must be one of {list(ET_BLOCK_TYPES)}, got '
           f'{self.block_type!r}')
    _check_rate('model.dropout_rate', self.dropout_rate)
    _check_rate('model.block_dropout_rate', self.block_dropout_rate)
    _check(len(self.kernel_sizes) > 0 and all(
        isinstance(k, int) and k > 0 and k % 2 == 1 for k in self.kernel_sizes),
           'model.kernel_sizes must be a non-empty sequence of positive odd '
           f'integers, got {self.kernel_sizes!r}')
    super().__post_init__()

  def facts(self) -> ModelFacts:
    # Every conv keeps the input's resolution, but after a stem pool.
    return ModelFacts(batch_norm=self.batch_norm, widest_channels=self.features,
                      min_image_size=2 if self.stem_pool else 1)

  @property
  def features(self) -> int:
    return 16 * self.width

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    x = _conv_act(x, self.features, 3, 'stem_conv', self.activation, conv=self.conv,
                  dtype=self.dtype,
                  norm=(functools.partial(_et_batch_norm, train, 'stem_bn', self.dtype)
                        if self.batch_norm else None))
    if self.stem_pool:
      x = max_pool(x, 2)
    block_args = dict(features=self.features, activation=self.activation,
                      batch_norm=self.batch_norm,
                      dropout_rate=self.block_dropout_rate, dtype=self.dtype,
                      conv=self.conv)
    if self.block_type == 'residual':
      for i in range(2 * self.num_modules):
        kernel_size = self.kernel_sizes[i % len(self.kernel_sizes)]
        x = ETBlock(kernel_size=kernel_size, name=f'block{i}', **block_args)(
            x, train=train)
    else:
      for i in range(self.num_modules):
        x = ETThreeBranchBlock(kernel_sizes=tuple(self.kernel_sizes),
                               name=f'block{i}', **block_args)(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    x = act(_dense(self.hidden_units, name='hidden', dtype=self.dtype)(x))
    x = Dropout(self.dropout_rate, deterministic=not train)(x)
    return _dense(self.num_classes, name='logits', dtype=self.dtype)(x).astype(jnp.float32)


class _KerasApplication(nn.Module):
  """A Keras Applications base with the `pooling='avg'` head and a new Dense."""
  num_classes: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  conv: ModuleDef = Conv

  def __post_init__(self):
    _check_positive_int('model.num_classes', self.num_classes)
    _check_rate('model.dropout_rate', self.dropout_rate)
    super().__post_init__()

  def head(self, x: jax.Array, train: bool) -> jax.Array:
    x = jnp.mean(x, axis=(1, 2))
    x = Dropout(self.dropout_rate, deterministic=not train)(x)
    return _dense(self.num_classes, name='predictions', dtype=self.dtype)(x).astype(
        jnp.float32)


class VGG16(_KerasApplication):
  """VGG16 as in Keras Applications, layer names included.

  The convolutional base is Keras's `VGG16(include_top=False)` layer for
  layer; the head is its `pooling='avg'` option followed by dropout and a new
  Dense named `predictions`, sized for Tiny ImageNet's 64x64 inputs (the
  224x224 `fc1`/`fc2` top does not apply there).
  """
  stages = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))

  def facts(self) -> ModelFacts:
    # block1's 64 channels at full resolution; five stride-2 pools, as Keras requires.
    return ModelFacts(batch_norm=False, widest_channels=64, min_image_size=32,
                      keras_application='VGG16')

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    for stage, (features, num_convs) in enumerate(self.stages, start=1):
      for i in range(1, num_convs + 1):
        x = _conv_act(x, features, 3, f'block{stage}_conv{i}', 'relu',
                      conv=self.conv, dtype=self.dtype)
      x = max_pool(x, 2)
    return self.head(x, train)


class ResNet50(_KerasApplication):
  """ResNet50 (v1) as in Keras Applications, layer names included.

  Same layers in the same order as `keras.applications.ResNet50`: conv biases
  kept, batch norm with epsilon 1.001e-5, the projection shortcut on the
  first block of each stage with the stride on the 1x1 convs. Head: global
  average pooling (Keras's `pooling='avg'`), dropout, Dense `predictions`.
  """
  stages = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))

  def facts(self) -> ModelFacts:
    # 64 channels at half the side, then 256 at a quarter: 16 at full resolution.
    return ModelFacts(batch_norm=True, widest_channels=16, min_image_size=32,
                      keras_application='ResNet50')

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    def batch_norm(name):
      return nn.BatchNorm(use_running_average=not train, momentum=0.99,
                          epsilon=1.001e-5, name=name, dtype=self.dtype)

    conv = functools.partial(self.conv, dtype=self.dtype)

    x = conv(64, 7, strides=2, padding=((3, 3), (3, 3)), name='conv1_conv')(x)
    x = nn.relu(batch_norm('conv1_bn')(x))
    # Keras zero-pads before this pool; after a ReLU that equals -inf padding.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (filters, num_blocks, stride) in enumerate(self.stages, start=2):
      for block in range(1, num_blocks + 1):
        name = f'conv{stage}_block{block}'
        block_stride = stride if block == 1 else 1
        # Layers are created in Keras's topological order (1, 2, 0, 3), so
        # that the parameter trees list them as keras.Model.layers does.
        y = conv(filters, 1, strides=block_stride, name=f'{name}_1_conv')(x)
        y = nn.relu(batch_norm(f'{name}_1_bn')(y))
        y = conv(filters, 3, name=f'{name}_2_conv')(y)
        y = nn.relu(batch_norm(f'{name}_2_bn')(y))
        if block == 1:
          shortcut = conv(4 * filters, 1, strides=block_stride,
                          name=f'{name}_0_conv')(x)
        y = conv(4 * filters, 1, name=f'{name}_3_conv')(y)
        if block == 1:
          shortcut = batch_norm(f'{name}_0_bn')(shortcut)
        else:
          shortcut = x
        y = batch_norm(f'{name}_3_bn')(y)
        x = nn.relu(shortcut + y)
    return self.head(x, train)


MODELS: dict[str, type[nn.Module]] = {
    'et': ETNet,
    'vgg16': VGG16,
    'resnet50': ResNet50,
}


def _check_positive_int(field: str, value: Any) -> None:
  _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
         f'{field} must be a positive integer, got {value!r}')


def _check_rate(field: str, value: Any) -> None:
  _check(isinstance(value, (int, float)) and 0.0 <= value < 1.0,
         f'{field} must be a rate in [0, 1), got {value!r}')


def create_model(model_config: Mapping[str, Any], num_classes: int,
                 image_size: int | None = None, dtype: Any = jnp.float32,
                 conv: ModuleDef = Conv) -> nn.Module:
  """Builds the model named by `model_config['name']` from the other fields.

  Args:
    model_config: `config.model`: `name` plus fields of the model class.
    num_classes: classes in the data.
    image_size: side of the square input images; checked against what the
      model can take when given.
    dtype: the compute dtype (parameters stay float32).
    conv: the convolution layer, `Conv` (XLA's) or `onednn.OneDNNConv`;
      the parameters are the same either way.

  Raises:
    ValueError: unknown name or field, a field out of range, or an image
      size the model cannot take.
  """
  fields = dict(model_config)
  name = fields.pop('name', None)
  if name not in MODELS:
    raise ValueError(f'Unknown model name {name!r} in config.model.name; valid '
                     f'names: {sorted(MODELS)}')
  model_class = MODELS[name]
  valid = {f.name for f in dataclasses.fields(model_class)
           if f.init and f.name not in ('parent', 'name', 'num_classes', 'dtype', 'conv')}
  unknown = sorted(set(fields) - valid)
  if unknown:
    raise ValueError(f'Unknown field(s) {unknown} in config.model for model '
                     f'{name!r}; valid fields: {sorted(valid)}')
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  model = model_class(num_classes=num_classes, dtype=dtype, conv=conv, **fields)
  if image_size is not None:
    _check_positive_int('data.image_size', image_size)
    smallest = model_facts(model).min_image_size
    if image_size < smallest:
      raise ValueError(
          f'Model {name!r} cannot take {image_size}x{image_size} images: it '
          f'needs at least {smallest}x{smallest} (set config.data.image_size)')
  return model


def model_facts(model: nn.Module) -> ModelFacts:
  """What `model` says of itself (`ModelFacts`).

  Raises:
    TypeError: its class has no `facts()` method returning ModelFacts.
  """
  facts_method = getattr(model, 'facts', None)
  found = facts_method() if callable(facts_method) else None
  if not isinstance(found, ModelFacts):
    raise TypeError(
        f'Model class {type(model).__name__} does not say its facts: give it a '
        '`facts()` method returning et_flax.models.ModelFacts (batch norm or not, its '
        'widest activation\'s channels, the smallest image it takes), as ETNet has')
  return found


def facts(model_config: Mapping[str, Any]) -> ModelFacts:
  """The facts of the model `model_config` (`config.model`) describes.

  Raises:
    ValueError: the config names no model, or one with wrong fields.
    TypeError: the model's class does not say its facts.
  """
  return model_facts(create_model(model_config, num_classes=2))


def weighted_layers(params: Mapping[str, Any]) -> list[str]:
  """Paths of the conv and dense layers (every module holding a `kernel`)."""
  flat = flatten_params(params)
  return [path[:-len('/kernel')] for path in flat if path.endswith('/kernel')]


def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """Flattens a parameter tree into {'a/b/kernel': array}."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in leaves}


def backbone_mask(params: Mapping[str, Any]) -> dict[str, bool]:
  """True for the backbone's layers, False for the classifier head (HEAD_NAMES)."""
  return {name: name not in HEAD_NAMES for name in params}


def count_params(params: Mapping[str, Any]) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
