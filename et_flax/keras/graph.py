"""A Keras file's layers as E.T.'s steps, in the model's order, each one checked.

`structure.import_keras_et` compares these steps (`Op`s) with E.T.'s.
They come from the saved model config where the file (or a structure given
beside it) holds one: its graph must be one chain of layers whose only
branches are identity shortcuts, and each layer's settings must be those E.T.
computes with (`graph_ops`). For weights alone only the weighted layers are
there, put in order by how the file lists or names them (`weight_ops`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import h5py
import numpy as np

# The Keras layers an E.T. is made of, after its input.
ET_KERAS_LAYERS = ('Conv2D', 'BatchNormalization', 'Activation', 'ReLU', 'Add',
                   'MaxPooling2D', 'Dropout', 'GlobalAveragePooling2D', 'Dense', 'Softmax')
# Keras's default layer names: the class in snake case, then _1, _2, ... (a
# counter per class and session, so numbers may start above 0).
_KERAS_NAME = re.compile(r'^(conv2d|batch_normalization|dense)(?:_(\d+))?$')
# build_keras_et's names: Flax module paths joined by '_'.
_ET_NAME = re.compile(r'^(?:stem_(?:conv|bn)|block(\d+)_(?:conv|bn)(\d+)|(hidden|logits))$')
# What an Add's shortcut names when it is the model's input.
INPUT = '(the input)'
# The arrays of a weighted layer: kernel and bias, or scale, offset, mean, variance.
_ARRAYS_PER_LAYER = {'Conv2D': 2, 'BatchNormalization': 4, 'Dense': 2}


@dataclasses.dataclass(frozen=True)
class _Layer:
  """A layer of a saved Keras model config."""
  name: str
  kind: str  # the Keras class
  config: Mapping[str, Any]
  inputs: tuple[str, ...]  # the layers whose outputs it takes
  arrays: tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class Op:
  """One step of E.T., as a Keras file holds it or as our model expects it.

  kind: conv | bn | act | dropout | add | pool | gap | dense | softmax.
  value: conv (kernel size, filters); dense units; act its name; dropout its
    rate; add the position of the op whose output is the shortcut (-1: input).
  layer: the Keras layer (a file's op) or the Flax path (an expected op).
  shapes: the arrays' shapes; arrays: a file's arrays.
  """
  kind: str
  value: Any = None
  layer: str = ''
  what: str = ''
  shapes: tuple[tuple[int, ...], ...] = ()
  arrays: tuple[np.ndarray, ...] = ()


def read_keras_config(path: str | pathlib.Path) -> dict[str, Any] | None:
  """The model config a Keras file saved ({'class_name', 'config'}), or None.

  A `.keras` file and a whole model saved as `.h5` hold one, and so does the
  JSON of `model.to_json()`; a weights file holds none.
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f'Keras file {path} does not exist')
  try:
    if path.suffix == '.json':
      text = path.read_text()
    elif path.suffix == '.keras':
      with zipfile.ZipFile(path) as archive:
        text = archive.read('config.json')
    elif path.suffix == '.h5':
      with h5py.File(path, 'r') as file:
        text = file.attrs.get('model_config')
      if text is None:
        return None
    else:
      raise ValueError(f'{path}: expected a .keras, .h5 or .json (model.to_json()) file')
    config = json.loads(text)
  except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as error:
    raise ValueError(f'{path}: cannot read its model config (truncated or corrupt?): '
                     f'{error}') from error
  if not isinstance(config, dict) or 'class_name' not in config:
    raise ValueError(f'{path} holds no Keras model config (no class_name)')
  return config


def _node_inputs(node: Any) -> list[str]:
  """The layers an inbound node reads, in order.

  Keras 3 saves a node as {'args': [...], 'kwargs': {...}} holding tensors
  ({'class_name': '__keras_tensor__', 'config': {'keras_history': [layer, node,
  tensor]}}); Keras 2 (tf.keras) as [[layer, node, tensor, kwargs], ...].
  """
  if isinstance(node, list):
    return [entry[0] for entry in node]
  names = []

  def visit(value):
    if isinstance(value, dict):
      if value.get('class_name') == '__keras_tensor__':
        names.append(value['config']['keras_history'][0])
    elif isinstance(value, list):
      for item in value:
        visit(item)

  visit(node.get('args', []))
  return names


def _config_layers(config: Mapping[str, Any], weights: Mapping[str, list[np.ndarray]],
                   source: str) -> list[_Layer]:
  """The model config's layers in its order (topological), with their weights."""
  class_name = config['class_name']
  entries = (config.get('config') or {}).get('layers')
  if class_name not in ('Functional', 'Model', 'Sequential') or not isinstance(entries, list):
    raise ValueError(f'{source} holds a {class_name} model whose config lists no layers '
                     '(a subclassed model?): import by structure reads models written '
                     'with the functional API or as a Sequential')
  layers, previous, unused = [], None, dict(weights)
  for entry in entries:
    name, kind = entry.get('name') or entry['config']['name'], entry['class_name']
    if class_name == 'Sequential':
      inputs = () if previous is None else (previous,)
    else:
      nodes = entry.get('inbound_nodes') or []
      if len(nodes) > 1:
        raise ValueError(f"{source}: layer {name!r} ({kind}) is applied {len(nodes)} "
                         "times; each of E.T.'s layers is applied once")
      inputs = tuple(_node_inputs(nodes[0])) if nodes else ()
    layers.append(_Layer(name, kind, entry.get('config') or {}, inputs,
                         tuple(unused.pop(name, ()))))
    previous = name
  if unused:
    raise ValueError(f'{source}: the weights of layers {sorted(unused)} belong to no '
                     'layer of the model config')
  return layers


def _activation_name(value: Any) -> str:
  if isinstance(value, dict):  # a serialized function: {'config': 'relu', ...}
    value = value.get('config', value.get('class_name'))
  return str(value)


def _pair(value: Any) -> tuple[Any, ...]:
  return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


class _GraphReader:
  """Reads a model config's layers one by one into E.T.'s steps.

  Each layer must take the output of the one before it (an Add also a
  shortcut), and its settings must be those E.T. computes with; the first
  that is not is refused, naming it.
  """

  def __init__(self, source: str):
    self.source = source
    self.ops: list[Op] = []
    self.produced: dict[str, int] = {}  # layer -> position of the op giving its output
    self.main: str | None = None  # the layer at the end of the chain so far
    self.image_size: int | None = None

  def refuse(self, layer: _Layer, message: str) -> NoReturn:
    raise ValueError(f'{self.source}: layer {layer.name!r} ({layer.kind}) {message}')

  def need(self, layer: _Layer, field: str, ok: bool, want: str) -> None:
    if not ok:
      self.refuse(layer, f'has {field}={layer.config.get(field)!r}; E.T. needs {want}')

  def emit(self, layer: _Layer, kind: str, value: Any = None, what: str = '') -> None:
    arrays = layer.arrays if kind in ('conv', 'bn', 'dense') else ()
    self.ops.append(Op(kind, value, layer.name, what or layer.kind,
                       tuple(a.shape for a in arrays), arrays))

  def emit_activation(self, layer: _Layer, name: str, what: str) -> None:
    if name == 'softmax':
      self.emit(layer, 'softmax', None, what)
    elif name != 'linear':
      self.emit(layer, 'act', name, what)

  def read(self, layer: _Layer) -> None:
    """Appends the steps of `layer`, the next layer of the model config."""
    inputs = layer.inputs
    if layer.kind == 'InputLayer' or (self.main is None and not inputs):
      self.read_input(layer)
      if layer.kind == 'InputLayer':
        return
      inputs = (INPUT,)  # a Sequential without an InputLayer: its first layer
    self.check_links(layer, inputs)
    before = len(self.ops)
    if layer.kind == 'Add':
      shortcut = inputs[1] if inputs[0] == self.main else inputs[0]
      self.ops.append(Op('add', self.produced[shortcut], layer.name,
                         f'Add with the output of {shortcut!r}'))
    else:
      _LAYER_READERS[layer.kind](self, layer, layer.config)
    self.produced[layer.name] = (len(self.ops) - 1 if len(self.ops) > before
                                 else self.produced[self.main])
    self.main = layer.name

  def read_input(self, layer: _Layer) -> None:
    if self.main is not None:
      self.refuse(layer, 'is a second input; E.T. has one')
    shape = layer.config.get('batch_shape') or layer.config.get('batch_input_shape')
    if shape is not None:
      if len(shape) != 4 or shape[-1] != 3:
        self.refuse(layer, f'takes inputs of shape {list(shape)}; E.T. takes RGB images '
                    '[batch, height, width, 3]')
      self.image_size = shape[1] if shape[1] is not None and shape[1] == shape[2] else None
    self.produced[INPUT] = -1
    self.main = INPUT
    if layer.kind == 'InputLayer':
      self.produced[layer.name], self.main = -1, layer.name

  def check_links(self, layer: _Layer, inputs: Sequence[str]) -> None:
    """The layer's kind, what it takes, and its number of arrays."""
    if layer.kind not in ET_KERAS_LAYERS:
      self.refuse(layer, 'is not one of the layers E.T. is made of '
                  f'({", ".join(ET_KERAS_LAYERS)})')
    count = 2 if layer.kind == 'Add' else 1
    if len(inputs) != count or self.main not in inputs:
      self.refuse(layer, f'takes {list(inputs)}, where E.T. takes the output of the layer '
                  f'before it ({self.main!r}){" and a shortcut" if count == 2 else ""}: '
                  'E.T. is one chain of layers whose only branches are identity shortcuts')
    expected_arrays = _ARRAYS_PER_LAYER.get(layer.kind, 0)
    if len(layer.arrays) != expected_arrays:
      self.refuse(layer, f'holds {len(layer.arrays)} weight arrays; E.T. expects '
                  f'{expected_arrays} (kernel and bias, or scale, offset, mean and variance)')

  def read_conv(self, layer: _Layer, c: Mapping[str, Any]) -> None:
    kernel = _pair(c.get('kernel_size'))
    self.need(layer, 'kernel_size', kernel[0] == kernel[1], 'square kernels')
    self.need(layer, 'strides', _pair(c.get('strides', 1)) == (1, 1), 'strides 1')
    self.need(layer, 'padding', c.get('padding') == 'same' or kernel == (1, 1), "'same'")
    self.need(layer, 'dilation_rate', _pair(c.get('dilation_rate', 1)) == (1, 1), '1')
    self.need(layer, 'groups', c.get('groups', 1) == 1, '1')
    self.need(layer, 'data_format', c.get('data_format') in (None, 'channels_last'),
              "'channels_last'")
    self.need(layer, 'use_bias', c.get('use_bias', True), 'True (a bias)')
    self.emit(layer, 'conv', (kernel[0], c['filters']),
              f'Conv2D {kernel[0]}x{kernel[1]}, {c["filters"]} filters')
    activation = _activation_name(c.get('activation', 'linear'))
    self.emit_activation(layer, activation, f"the activation={activation!r} of its Conv2D")

  def read_batch_norm(self, layer: _Layer, c: Mapping[str, Any]) -> None:
    self.need(layer, 'axis', c.get('axis', -1) in (-1, 3, [-1], [3]), 'the channels (-1)')
    self.need(layer, 'center', c.get('center', True), 'True')
    self.need(layer, 'scale', c.get('scale', True), 'True')
    self.need(layer, 'epsilon', abs(float(c.get('epsilon', 1e-3)) - 1e-3) < 1e-9,
              "Keras's default 0.001")
    self.emit(layer, 'bn')

  def read_activation(self, layer: _Layer, c: Mapping[str, Any]) -> None:
    activation = _activation_name(c.get('activation'))
    self.emit_activation(layer, activation, f'Activation {activation!r}')

  def read_relu(self, layer: _Layer, c: Mapping[str, Any]) -> None:
    self.need(layer, 'max_value', c.get('max_value') is None, 'None')
    self.need(layer, 'negative_slope', not c.get('negative_slope'), '0')
    self.need(layer, 'threshold', not c.get('threshold'), '0')
    self.emit(layer, 'act', 'relu', 'ReLU')

  def read_softmax(self, layer: _Layer, c: Mapping[str, Any]) -> None:
    self.need(layer, 'axis', c.get('axis', -1) in (-1, [-1]), '-1')
    self.emit(layer, 'softmax', None, 'Softmax')

  def read_dropout(self, layer: _Layer, c: Mapping[str, Any]) -> None:
    self.need(layer, 'noise_shape', c.get('noise_shape') is None, 'None')
    if c.get('rate'):
      self.emit(layer, 'dropout', float(c['rate']), f'Dropout {c["rate"]}')

  def read_max_pool(self, layer: _Layer, c: Mapping[str, Any]) -> None:
    pool = _pair(c.get('pool_size'))
    self.need(layer, 'pool_size', pool == (2, 2), '2')
    self.need(layer, 'strides', _pair(c.get('strides') or pool) == (2, 2), '2')
    self.need(layer, 'padding', c.get('padding', 'valid') == 'valid', "'valid'")
    self.emit(layer, 'pool', None, 'MaxPooling2D 2x2')

  def read_global_pool(self, layer: _Layer, c: Mapping[str, Any]) -> None:
    self.need(layer, 'keepdims', not c.get('keepdims'), 'False')
    self.need(layer, 'data_format', c.get('data_format') in (None, 'channels_last'),
              "'channels_last'")
    self.emit(layer, 'gap')

  def read_dense(self, layer: _Layer, c: Mapping[str, Any]) -> None:
    self.need(layer, 'use_bias', c.get('use_bias', True), 'True (a bias)')
    self.emit(layer, 'dense', c['units'], f'Dense, {c["units"]} units')
    activation = _activation_name(c.get('activation', 'linear'))
    self.emit_activation(layer, activation, f"the activation={activation!r} of its Dense")


# How each kind of layer but Add (read in `_GraphReader.read`) is read.
_LAYER_READERS = {
    'Conv2D': _GraphReader.read_conv, 'BatchNormalization': _GraphReader.read_batch_norm,
    'Activation': _GraphReader.read_activation, 'ReLU': _GraphReader.read_relu,
    'Softmax': _GraphReader.read_softmax, 'Dropout': _GraphReader.read_dropout,
    'MaxPooling2D': _GraphReader.read_max_pool,
    'GlobalAveragePooling2D': _GraphReader.read_global_pool, 'Dense': _GraphReader.read_dense,
}


def graph_ops(config: Mapping[str, Any], weights: Mapping[str, list[np.ndarray]],
              source: str) -> tuple[list[Op], int | None]:
  """E.T.'s steps in the order of a model config, and its input side (or None).

  The model must be one chain of layers whose only branches are identity
  shortcuts; each layer's settings are checked against what E.T. computes.
  `weights` ({layer name: arrays}) must all belong to the config's layers.
  """
  reader = _GraphReader(source)
  for layer in _config_layers(config, weights, source):
    reader.read(layer)
  outputs = (config.get('config') or {}).get('output_layers')
  if outputs:
    outputs = outputs if isinstance(outputs[0], list) else [outputs]
    if len(outputs) != 1 or outputs[0][0] != reader.main:
      raise ValueError(f'{source}: the model outputs {[o[0] for o in outputs]}; E.T. has '
                       f'one output, at the end of its chain of layers ({reader.main!r})')
  return reader.ops, reader.image_size


def _weight_op(name: str, arrays: Sequence[np.ndarray], source: str) -> Op:
  shapes = tuple(a.shape for a in arrays)
  ranks = [len(s) for s in shapes]
  if ranks == [4, 1] and shapes[0][0] == shapes[0][1]:
    kernel = shapes[0]
    return Op('conv', (kernel[0], kernel[3]), name,
              f'Conv2D {kernel[0]}x{kernel[1]}, {kernel[3]} filters', shapes, tuple(arrays))
  if ranks == [2, 1]:
    return Op('dense', shapes[0][1], name, f'Dense, {shapes[0][1]} units', shapes,
              tuple(arrays))
  if ranks == [1, 1, 1, 1]:
    return Op('bn', None, name, 'BatchNormalization', shapes, tuple(arrays))
  raise ValueError(f'{source}: layer {name!r} holds arrays of shapes {list(shapes)}; '
                   "E.T.'s layers are square Conv2Ds and Denses with a bias, and "
                   'BatchNormalizations with scale and offset')


def weight_ops(weights: Mapping[str, list[np.ndarray]], ordered: bool, source: str
               ) -> tuple[list[Op], str]:
  """The weighted layers of a weights file in the model's order, and how it was found.

  `ordered`: the file lists its layers in the model's order (a legacy `.h5`).
  """
  names = list(weights)
  if ordered:
    order = "the order the file lists them in (a legacy .h5 keeps the model's)"
  elif all(_KERAS_NAME.match(n) for n in names):
    def number(name):
      match = _KERAS_NAME.match(name)
      return match[1], int(match[2] or 0)
    names.sort(key=number)
    order = "the numbering of Keras's default names (conv2d, conv2d_1, ..., conv2d_10)"
  elif all(_ET_NAME.match(n) for n in names):
    def position(name):
      match = _ET_NAME.match(name)
      if match[1] is not None:
        return (1, int(match[1]), int(match[2]))
      return (0,) if match[3] is None else (2, match[3] == 'logits')
    names.sort(key=position)
    order = "the order of et_flax's layer names (build_keras_et's)"
  else:
    other = next(n for n in names if not _KERAS_NAME.match(n) and not _ET_NAME.match(n))
    raise ValueError(
        f'{source}: cannot put its layers in order: a .weights.h5 stores them by name, '
        f"and {other!r} is neither one of Keras's default names (conv2d, conv2d_1, ..., "
        "dense, dense_1) nor et_flax's (stem_conv, block0_conv0, ..., hidden, logits). "
        "Give the model's structure too: its .keras file, or the JSON of "
        'model.to_json() (structure=..., or --structure=... on the command line)')
  return [_weight_op(n, weights[n], source) for n in names], order
