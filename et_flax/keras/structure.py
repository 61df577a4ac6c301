"""An E.T. written in Keras, imported by structure whatever its layer names.

`import_keras_et` takes the layers of a Keras E.T. in the model's order (the
saved model config of a `.keras` file; for weights alone, the order a legacy
`.h5` lists, or Keras's default names numerically: conv2d, conv2d_1, ...,
conv2d_10; `graph` reads them), reads its config (width, modules,
kernel sizes, hidden units, activation, dropout, classes) from the file where
it is there, and checks every layer and shape against E.T.'s: the first that
does not fit is named with what E.T. has there. Importing by layer name (VGG16,
ResNet50, files of `models.build_keras_et`) is in `weights`.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from et_flax import models
from et_flax.keras import graph as keras_graph
from et_flax.keras import weights as keras_weights

Op = keras_graph.Op  # one step of E.T., read from a file or expected

# Model fields a weights file cannot hold: nothing of them has weights.
_NOT_IN_WEIGHTS = {
    'activation': 'activations have no weights',
    'dropout_rate': 'dropout has no weights',
    'block_dropout_rate': 'dropout has no weights',
    'stem_pool': 'pooling has no weights',
}
# config.model's fields of E.T., with ETNet's defaults.
_ET_FIELDS = ('width', 'num_modules', 'activation', 'hidden_units', 'dropout_rate',
              'stem_pool', 'batch_norm', 'block_dropout_rate', 'kernel_sizes', 'block_type')
_ET_DEFAULTS = {f.name: f.default for f in dataclasses.fields(models.ETNet)
                if f.name in _ET_FIELDS}


@dataclasses.dataclass(frozen=True)
class KerasET:
  """An E.T. read from a Keras file by structure.

  Attributes:
    model_config: `config.model` of this E.T. (name 'et').
    num_classes: units of its last Dense.
    variables: params and batch stats (NumPy), for `models.create_model(
      model_config, num_classes)`.
    image_size: the Keras model's input side where the file gives one.
    outputs: 'probabilities' where the Keras model ends in a softmax (ours
      returns the logits under it), else 'logits'.
    from_file: the model fields read from the file.
    not_in_file: {field: why the file cannot tell} for the others, taken from
      the `model_config` given (or E.T.'s defaults).
    order: how the file's layers were put in order.
    layers: {Keras layer name: Flax path}.
  """
  model_config: dict[str, Any]
  num_classes: int
  variables: dict[str, Any]
  image_size: int | None
  outputs: str
  from_file: tuple[str, ...]
  not_in_file: dict[str, str]
  order: str
  layers: dict[str, str]


def _period(values: Sequence[int]) -> tuple[int, ...]:
  """The shortest sequence that `values` repeats: (1, 3) for 1, 3, 1, 3, ..."""
  for length in range(1, len(values) + 1):
    if all(v == values[i % length] for i, v in enumerate(values)):
      return tuple(values[:length])
  return tuple(values)


def _infer(ops: Sequence[Op], graph: bool, defaults: Mapping[str, Any], source: str
           ) -> tuple[dict[str, Any], int, dict[str, str]]:
  """E.T.'s model config and classes as the file's ops give them.

  Only what the shapes and the layers' settings show is read; the structure
  itself is checked afterwards, op by op (`_match`), so a file that is not an
  E.T. fails there, at its first misfit.
  """
  convs = [op for op in ops if op.kind == 'conv']
  denses = [op for op in ops if op.kind == 'dense']
  if not convs or len(denses) < 2:
    raise ValueError(f'{source} holds {len(convs)} Conv2D and {len(denses)} Dense layers: '
                     'not an E.T. (a stem conv, blocks of convs, then two Dense layers)')
  filters = convs[0].value[1]
  if filters % 16:
    raise ValueError(f"{source}: layer {convs[0].layer!r}, E.T.'s stem conv, has {filters} "
                     "filters; E.T.'s convs have 16 x width filters (16, 32, 48...)")
  fields = {'name': 'et', 'width': filters // 16, 'hidden_units': denses[0].value,
            'batch_norm': any(op.kind == 'bn' for op in ops), 'block_type': 'residual'}
  not_in_file = {}
  if graph:
    adds = [op for op in ops if op.kind == 'add']
    num_blocks = len(adds)
    kernels = [next((o.value[0] for o in ops[op.value + 1:] if o.kind == 'conv'), 1)
               for op in adds]
    activations = [op for op in ops if op.kind == 'act']
    if activations:
      fields['activation'] = activations[0].value
      if fields['activation'] not in models.ACTIVATIONS:
        raise ValueError(f'{source}: layer {activations[0].layer!r} applies '
                         f"{fields['activation']!r}; E.T. takes {sorted(models.ACTIVATIONS)}")
    fields['stem_pool'] = any(op.kind == 'pool' for op in ops)
    hidden = ops.index(denses[0])
    head = [op.value for op in ops[hidden:] if op.kind == 'dropout']
    body = [op.value for op in ops[:hidden] if op.kind == 'dropout']
    fields['dropout_rate'] = head[0] if head else 0.0
    fields['block_dropout_rate'] = body[0] if body else 0.0
  else:
    num_blocks = 2 * max(1, round((len(convs) - 1) / 6))
    # A block is three convs of one kernel size: a run of n convs of one size
    # is about n / 3 blocks, so a conv too many or too few leaves the cycle of
    # sizes as it is, and the misfit is named where it is.
    kernels = []
    for size, run in itertools.groupby(op.value[0] for op in convs[1:]):
      kernels += [size] * max(1, round(len(list(run)) / 3))
    not_in_file = dict(_NOT_IN_WEIGHTS)
  for field in _NOT_IN_WEIGHTS:
    if field not in fields:
      fields[field] = defaults.get(field, _ET_DEFAULTS[field])
  fields['num_modules'] = max(1, num_blocks // 2)
  fields['kernel_sizes'] = _period(kernels[:2 * fields['num_modules']] or [1, 3])
  ordered = {name: fields[name] for name in _ET_DEFAULTS if name in fields}
  # E.T.'s last Dense is its second: a Dense after it is a layer too many.
  return {'name': 'et', **ordered}, denses[1].value, not_in_file


def _summary(model_config: Mapping[str, Any], num_classes: int) -> str:
  c = {**_ET_DEFAULTS, **model_config}
  parts = [f'width {c["width"]}', f'{c["num_modules"]} modules',
           f'kernel sizes {tuple(c["kernel_sizes"])}', f'{c["hidden_units"]} hidden units',
           c['activation'], f'{num_classes} classes']
  parts += [name for name, on in (('batch norm', c['batch_norm']),
                                  ('stem pool', c['stem_pool'])) if on]
  return ', '.join(parts)


def _expected_ops(model: models.ETNet) -> tuple[list[Op], dict[str, Any]]:
  """E.T.'s steps, with each weighted layer's Flax path and array shapes,
  and the shapes of the model's variables."""
  image = 2 if model.stem_pool else 1
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, image, image, 3))))
  params, stats = shapes['params'], shapes.get('batch_stats', {})
  ops: list[Op] = []
  features, activation = model.features, model.activation

  def add(kind, value=None, path=(), what=''):
    layer_shapes = ()
    if path:
      layer = keras_weights.subtree(params, path)
      keys = ('kernel', 'bias') if kind != 'bn' else ('scale', 'bias')
      layer_shapes = tuple(tuple(layer[k].shape) for k in keys)
      if kind == 'bn':
        layer_stats = keras_weights.subtree(stats, path)
        layer_shapes += tuple(tuple(layer_stats[k].shape) for k in ('mean', 'var'))
    ops.append(Op(kind, value, '/'.join(path), what, layer_shapes))

  def conv(kernel_size, path, what):
    add('conv', (kernel_size, features), path,
        f'a {kernel_size}x{kernel_size} Conv2D with {features} filters ({what})')
    if model.batch_norm:
      add('bn', None, path[:-1] + (path[-1].replace('conv', 'bn'),),
          f'a BatchNormalization (after {what})')

  conv(3, ('stem_conv',), 'the stem')
  add('act', activation, what=f'the {activation} activation')
  if model.stem_pool:
    add('pool', what='a 2x2 MaxPooling2D (the stem pool)')
  for block in range(2 * model.num_modules):
    kernel_size = model.kernel_sizes[block % len(model.kernel_sizes)]
    shortcut = len(ops) - 1
    for i in range(3):
      conv(kernel_size, (f'block{block}', f'conv{i}'), f'conv {i} of block {block}')
      if i < 2:
        add('act', activation, what=f'the {activation} activation')
        if model.block_dropout_rate:
          add('dropout', model.block_dropout_rate,
              what=f'Dropout {model.block_dropout_rate} (block_dropout_rate)')
    add('add', shortcut, what=f'the Add of the shortcut of block {block}')
    add('act', activation, what=f'the {activation} activation')
  add('gap', what='GlobalAveragePooling2D')
  add('dense', model.hidden_units, ('hidden',),
      f'the hidden Dense with {model.hidden_units} units')
  add('act', activation, what=f'the {activation} activation')
  if model.dropout_rate:
    add('dropout', model.dropout_rate, what=f'Dropout {model.dropout_rate} (dropout_rate)')
  add('dense', model.num_classes, ('logits',),
      f'the last Dense with {model.num_classes} units (one per class)')
  return ops, shapes


def _describe(op: Op, found: Sequence[Op]) -> str:
  if op.kind == 'add':
    source = keras_graph.INPUT if op.value < 0 else f'layer {found[op.value].layer!r}'
    return f'an Add with the output of {source}'
  return op.what


def _misfit(source: str, got: Op, message: str, context: str) -> ValueError:
  return ValueError(f'{source}: layer {got.layer!r} ({got.what}) {message}. {context}')


def _paired(got: Op, want: Op, source: str, context: str) -> tuple[Op, Op]:
  """(file op, expected op) of a weighted layer whose arrays have E.T.'s shapes."""
  if got.shapes != want.shapes:
    raise _misfit(source, got, f'holds arrays of shapes {list(got.shapes)}; E.T. has '
                  f'{want.what} there, of shapes {list(want.shapes)} ({want.layer})',
                  context)
  return got, want


def _match_graph(found: Sequence[Op], expected: Sequence[Op], source: str,
                 context: str) -> list[tuple[Op, Op]]:
  """`_match` with a model config: every step compared in order."""
  pairs = []
  for i, want in enumerate(expected):
    if i == len(found):
      raise ValueError(f'{source}: the model ends after layer {found[-1].layer!r}, where '
                       f'E.T. goes on with {want.what}. {context}')
    got = found[i]
    if got.kind != want.kind or got.value != want.value:
      if want.kind == 'add':
        shortcut = (keras_graph.INPUT if want.value < 0
                    else repr(found[want.value].layer))
        expected_step = f'{want.what} (with the output of {shortcut})'
      else:
        expected_step = want.what
      raise _misfit(source, got if got.kind != 'add' else dataclasses.replace(
          got, what=_describe(got, found)), f'does not fit: E.T. has {expected_step} '
          'there', context)
    if want.layer:
      pairs.append(_paired(got, want, source, context))
  if len(found) > len(expected):
    # A softmax on E.T.'s logits is fine where nothing follows it.
    extra = next((op for op in found[len(expected):] if op.kind != 'softmax'),
                 found[len(expected)])
    raise _misfit(source, extra, "comes after E.T.'s last layer (the Dense "
                  f'{found[len(expected) - 1].layer!r})', context)
  return pairs


def _match_weights(found: Sequence[Op], expected: Sequence[Op], source: str,
                   context: str) -> list[tuple[Op, Op]]:
  """`_match` for weights alone: each kind of weighted layer in its own order."""
  pairs = []
  queues = {kind: [op for op in found if op.kind == kind] for kind in ('conv', 'bn', 'dense')}
  for want in expected:
    if want.kind not in queues:
      continue
    if not queues[want.kind]:
      raise ValueError(f'{source} has no layer left for {want.what}: it has fewer '
                       f'{want.kind} layers than E.T. has. {context}')
    pairs.append(_paired(queues[want.kind].pop(0), want, source, context))
  for kind, left in queues.items():
    if left:
      last = [got for got, _ in pairs if got.kind == kind][-1]
      raise _misfit(source, left[0], f'has no place in E.T.: {len(left)} {kind} '
                    f"layer(s) too many (E.T.'s last {kind} is {last.layer!r})", context)
  return pairs


def _match(found: Sequence[Op], expected: Sequence[Op], graph: bool, source: str,
           context: str) -> list[tuple[Op, Op]]:
  """(file op, expected op) of every weighted layer; the first misfit raised.

  `context` ends each message: the E.T. expected and the layers' order.

  With a model config every step is compared in order; with weights alone,
  each kind of weighted layer (conv, batch norm, dense) in its own order.
  """
  if graph:
    return _match_graph(found, expected, source, context)
  return _match_weights(found, expected, source, context)


@dataclasses.dataclass(frozen=True)
class _FileOps:
  """A Keras file's steps, and what the file says about them."""
  ops: list[Op]
  graph: bool  # from a model config (else weights alone)
  image_size: int | None
  outputs: str  # as KerasET.outputs
  order: str  # as KerasET.order


def _read_ops(path: pathlib.Path, structure: str | pathlib.Path | None,
              source: str) -> _FileOps:
  """The file's steps, from its model config (or `structure`'s) where there is one."""
  weights, ordered = keras_weights.read_weight_file(path)
  config = keras_graph.read_keras_config(structure if structure is not None else path)
  if config is None and structure is not None:
    raise ValueError(f'{structure} holds no model config (a weights file?): give a .keras '
                     'file or the JSON of model.to_json()')
  if config is None:
    found, order = keras_graph.weight_ops(weights, ordered, source)
    return _FileOps(found, False, None,
                    'probabilities or logits (a weights file does not say)', order)
  found, image_size = keras_graph.graph_ops(config, weights, source)
  outputs = 'logits'
  if found and found[-1].kind == 'softmax':
    found, outputs = found[:-1], 'probabilities'
  return _FileOps(found, True, image_size, outputs,
                  'the order of the saved model config (its graph)')


def _model_fields(file_ops: _FileOps, model_config: Mapping[str, Any] | None, infer: bool,
                  num_classes: int | None, source: str
                  ) -> tuple[dict[str, Any], int, tuple[str, ...], dict[str, str]]:
  """The E.T. to import: its model config, classes, fields from the file, the rest."""
  given = dict(model_config or {})
  if given.get('name', 'et') != 'et':
    raise ValueError(f"import by structure reads E.T. (model.name 'et'), not "
                     f"{given['name']!r}; import VGG16 and ResNet50 by name "
                     '(import_keras_weights)')
  if infer:
    fields, file_classes, not_in_file = _infer(file_ops.ops, file_ops.graph, given, source)
    from_file = tuple(k for k in fields if k != 'name' and k not in not_in_file)
  else:
    fields, not_in_file, from_file = {'name': 'et', **given}, {}, ()
    denses = [op for op in file_ops.ops if op.kind == 'dense']
    file_classes = denses[1].value if len(denses) > 1 else None
  if fields.get('block_type', 'residual') != 'residual':
    raise ValueError("import by structure reads residual E.T. (model.block_type "
                     "'residual'); a three-branch E.T. imports by name "
                     '(import_keras_weights, the names of build_keras_et)')
  classes = num_classes if num_classes is not None else file_classes
  if classes is None:
    raise ValueError(f'{source} holds fewer than two Dense layers: not an E.T. (a stem '
                     'conv, blocks of convs, then two Dense layers)')
  return fields, classes, from_file, not_in_file


def _variables(pairs: Sequence[tuple[Op, Op]], shapes: Mapping[str, Any]) -> dict[str, Any]:
  """Params and batch stats (float32 NumPy) from the file's arrays, at E.T.'s paths."""
  params: dict[str, Any] = {}
  batch_stats: dict[str, Any] = {}
  for got, want in pairs:
    path_keys = want.layer.split('/')
    arrays = [np.asarray(a, np.float32) for a in got.arrays]
    layer = params
    for key in path_keys:
      layer = layer.setdefault(key, {})
    if want.kind == 'bn':
      layer['scale'], layer['bias'] = arrays[:2]
      stats = batch_stats
      for key in path_keys:
        stats = stats.setdefault(key, {})
      stats['mean'], stats['var'] = arrays[2:]
    else:
      layer['kernel'], layer['bias'] = arrays
  variables = {'params': params, 'batch_stats': batch_stats}
  missing = set(models.flatten_params(shapes)) ^ set(models.flatten_params(variables))
  if missing:  # our own error, not the user's: keep _expected_ops in step with ETNet
    raise AssertionError(f'_expected_ops and models.ETNet differ in {sorted(missing)}')
  return variables


def import_keras_et(path: str | pathlib.Path, model_config: Mapping[str, Any] | None = None,
                    *, infer: bool = True, num_classes: int | None = None,
                    structure: str | pathlib.Path | None = None) -> KerasET:
  """An E.T. written in Keras, imported by structure whatever its layer names.

  Args:
    path: a `.keras` file, a whole model saved as `.h5`, or weights alone
      (`.weights.h5`, or a legacy `.h5`).
    model_config: with `infer`, the model fields the file cannot hold
      (`KerasET.not_in_file`) are taken from it; without, the E.T. the file
      must fit, every field of it.
    infer: read the model config from the file where it is there.
    num_classes: the classes the last Dense must have (None: as in the file).
    structure: the model's structure for weights alone: a `.keras` file, or
      the JSON of `model.to_json()` (its layer names as in the weights).

  Raises:
    ValueError: naming the first layer that does not fit E.T., and what E.T.
      has there; or a file that cannot be read.
  """
  path = pathlib.Path(path).expanduser()
  source = str(path) if structure is None else f'{path} (structure from {structure})'
  file_ops = _read_ops(path, structure, source)
  fields, classes, from_file, not_in_file = _model_fields(file_ops, model_config, infer,
                                                          num_classes, source)
  model = models.create_model(fields, classes)
  context = (f"{'The file read as' if infer else 'Expected:'} E.T. with "
             f'{_summary(fields, classes)}; layers taken in {file_ops.order}.')
  expected, shapes = _expected_ops(model)
  pairs = _match(file_ops.ops, expected, file_ops.graph, source, context)
  return KerasET(model_config=fields, num_classes=classes,
                 variables=_variables(pairs, shapes), image_size=file_ops.image_size,
                 outputs=file_ops.outputs, from_file=from_file, not_in_file=not_in_file,
                 order=file_ops.order, layers={got.layer: want.layer for got, want in pairs})
