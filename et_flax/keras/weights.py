"""Keras weight files into our Flax variables by layer name, and E.T. back out to Keras.

Reads the formats users bring: Keras 3 `.weights.h5`, the legacy HDF5 `.h5`
of Keras 2 / tf.keras (the format of the Keras Applications ImageNet files in
~/.keras/models/, e.g. `vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`),
whole models saved as `.h5`, and whole `.keras` models. Conv and Dense kernels
have the same layout in both libraries (HWIO and IO); batch norm's gamma,
beta, moving mean and variance become our scale, bias, mean and var.

Layers are mapped by name (`import_keras_weights`): VGG16 and ResNet50 with
the Keras Applications names, E.T. with those of `models.build_keras_et`
(Flax module paths joined by '_'). An E.T. written in anyone's Keras code,
whatever its layer names, is imported by structure:
`structure.import_keras_et`.
"""

from __future__ import annotations

import io
import pathlib
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

import h5py
import jax
import numpy as np

# The 224x224 classifier of Keras Applications, never used at 64x64.
KERAS_TOP_LAYERS = ('fc1', 'fc2', 'predictions')
HEAD_LAYERS = ('predictions', 'logits')


def _read_h5(file: h5py.Group, source: str) -> tuple[dict[str, list[np.ndarray]], bool]:
  """{layer name: arrays}, and whether the file lists the layers in the model's order."""
  if 'layer_names' not in file.attrs and 'model_weights' in file:
    return _read_h5(file['model_weights'], source)  # a whole model saved as .h5
  if 'layer_names' in file.attrs:  # legacy HDF5 (Keras 2, tf.keras, ImageNet files)
    weights = {}
    for raw in file.attrs['layer_names']:
      name = raw.decode() if isinstance(raw, bytes) else str(raw)
      group = file[name]
      names = [n.decode() if isinstance(n, bytes) else str(n)
               for n in group.attrs.get('weight_names', [])]
      if names:
        weights[name] = [np.asarray(group[n]) for n in names]
    return weights, True
  if 'layers' in file:  # Keras 3: groups by layer name, in alphabetical order
    weights = {}
    for group in file['layers'].values():
      variables = group.get('vars')
      if variables is None or not len(variables):
        continue
      name = variables.attrs.get('name', group.name.rsplit('/', 1)[-1])
      weights[str(name)] = [np.asarray(variables[str(i)]) for i in range(len(variables))]
    return weights, False
  raise ValueError(f'{source} is an HDF5 file but not a Keras weights file (no '
                   "'layer_names' attribute, no 'layers' or 'model_weights' group)")


def read_weight_file(path: str | pathlib.Path) -> tuple[dict[str, list[np.ndarray]], bool]:
  """{layer name: its arrays in Keras order}, and whether the file lists the
  layers in the model's order (a legacy `.h5` does; a Keras 3 file sorts them
  by name)."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f'Keras weights file {path} does not exist')
  if path.suffix not in ('.h5', '.keras'):
    raise ValueError(f'{path}: expected a .weights.h5, .h5 or .keras file')
  try:
    if path.suffix == '.keras':
      with zipfile.ZipFile(path) as archive:
        data = archive.read('model.weights.h5')
      with h5py.File(io.BytesIO(data), 'r') as file:
        return _read_h5(file, str(path))
    with h5py.File(path, 'r') as file:
      return _read_h5(file, str(path))
  except (OSError, KeyError, zipfile.BadZipFile) as error:
    raise ValueError(f'{path} is not a readable Keras weights file (truncated or '
                     f'corrupt?): {error}') from error


def read_keras_weights(path: str | pathlib.Path) -> dict[str, list[np.ndarray]]:
  """{layer name: its arrays in Keras order} from a Keras weights file."""
  return read_weight_file(path)[0]


def _our_layers(variables: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
  """{Keras name: Flax path} of every conv, dense and batch-norm layer."""
  layers = {}

  def visit(tree, path):
    if 'kernel' in tree or 'scale' in tree:
      layers['_'.join(path)] = path
      return
    for key, value in tree.items():
      visit(value, path + (key,))

  visit(variables['params'], ())
  return layers


def subtree(tree: Mapping[str, Any], path: Iterable[str]) -> Any:
  """The value at `path`, a sequence of keys, in nested mappings."""
  for key in path:
    tree = tree[key]
  return tree


def import_keras_weights(path: str | pathlib.Path, variables: Mapping[str, Any],
                         keep_head: bool = False) -> dict[str, Any]:
  """`variables` (from `model.init`) with every layer replaced by the file's.

  With `keep_head` the classifier (`predictions` / `logits`) keeps its
  initial values and Keras's 224x224 top layers in the file are ignored, to
  train a new head on a pretrained backbone.

  Raises:
    ValueError: listing layers the file lacks, layers it has that the model
      lacks, and arrays whose shapes differ.
  """
  weights = read_keras_weights(path)
  ours = _our_layers(variables)
  skipped = set(HEAD_LAYERS) if keep_head else set()
  ignorable = set(KERAS_TOP_LAYERS) if keep_head else set()
  missing = sorted(name for name in ours if name not in weights and name not in skipped)
  extra = sorted(name for name in weights if name not in ours and name not in ignorable)
  params = jax.tree.map(np.asarray, dict(variables['params']))
  batch_stats = jax.tree.map(np.asarray, dict(variables.get('batch_stats', {})))
  mismatched = []
  for name, flax_path in ours.items():
    if name in skipped or name not in weights:
      continue
    layer = subtree(params, flax_path)
    arrays = weights[name]
    if 'kernel' in layer:
      targets = [(layer, 'kernel'), (layer, 'bias')]
    else:
      stats = subtree(batch_stats, flax_path)
      targets = [(layer, 'scale'), (layer, 'bias'), (stats, 'mean'), (stats, 'var')]
    if len(arrays) != len(targets):
      mismatched.append(f'{name}: {len(arrays)} arrays in the file, {len(targets)} expected')
      continue
    for (tree, key), array in zip(targets, arrays):
      if tree[key].shape != array.shape:
        mismatched.append(f'{name}/{key}: {array.shape} in the file, {tree[key].shape} '
                          'in the model')
      else:
        tree[key] = array.astype(tree[key].dtype)
  if missing or extra or mismatched:
    hint = ('. An E.T. with other layer names imports by structure: '
            'et_flax.keras.structure.import_keras_et, or python -m et_flax.import_keras'
            if 'stem_conv' in missing else '')
    raise ValueError(f'{path} does not fit the model: layers missing from the file '
                     f'{missing}; layers the model lacks {extra}; shapes differing '
                     f'{mismatched}{hint}')
  return {'params': params, 'batch_stats': batch_stats}


def export_et_weights(variables: Mapping[str, Any], model_config: Mapping[str, Any],
                      num_classes: int, image_size: int,
                      path: str | pathlib.Path) -> pathlib.Path:
  """Saves E.T.'s variables as a Keras 3 `.weights.h5` of `build_keras_et`."""
  from et_flax.keras import models as keras_models  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path)
  if not path.name.endswith('.weights.h5'):
    raise ValueError(f'{path}: Keras saves weights to a file ending in .weights.h5')
  keras_model = keras_models.build_keras_et(model_config, num_classes, image_size)
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  ours = _our_layers(variables)
  for layer in keras_model.layers:
    if not layer.weights:
      continue
    flax_path = ours[layer.name]
    values = subtree(params, flax_path)
    if 'kernel' in values:
      arrays = [values['kernel'], values['bias']]
    else:
      stats = subtree(batch_stats, flax_path)
      arrays = [values['scale'], values['bias'], stats['mean'], stats['var']]
    layer.set_weights([np.asarray(a) for a in arrays])
  keras_model.save_weights(path)
  return path
