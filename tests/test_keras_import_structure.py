"""E.T. written in anyone's Keras code: imported by structure, its config read
from the file, and made into a workdir that evaluates as Keras does."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from et_flax import models
from et_flax.keras import structure as keras_structure
from et_flax.keras import weights as keras_weights

keras = pytest.importorskip('keras')
h5py = pytest.importorskip('h5py')

REPO = pathlib.Path(__file__).resolve().parent.parent
SIZE = 8


def keras_et(*, modules=2, kernel_sizes=(1, 3), hidden=24, classes=10, dropout=0.0,
             batch_norm=False, activation='relu', stem_pool=False, features=16,
             filters=None, extra_conv_in_block=None, seed=0):
  """E.T. as a Keras user writes it, not by keras_models.build_keras_et.

  The functional API with Keras's default names (the session cleared, so they
  start at conv2d and pass conv2d_10), the activation inside the first conv
  of a block and as layers elsewhere, the shortcut first in the Add, a
  softmax Dense at the end. Biases and batch-norm statistics are random, so
  that a mix-up of arrays shows. `features`: the convs' filters; `filters`:
  {(block, conv): n} for convs of another width; `extra_conv_in_block`: a
  block given a fourth conv, before its Add.
  """
  keras.backend.clear_session()
  keras.utils.set_random_seed(seed)
  layers = keras.layers

  def act(x):
    return (layers.ReLU() if activation == 'relu' else layers.Activation(activation))(x)

  inputs = keras.Input((SIZE, SIZE, 3))
  x = layers.Conv2D(features, 3, padding='same')(inputs)
  if batch_norm:
    x = layers.BatchNormalization()(x)
  x = layers.Activation(activation)(x)
  if stem_pool:
    x = layers.MaxPooling2D()(x)
  for block in range(2 * modules):
    kernel_size = kernel_sizes[block % len(kernel_sizes)]
    shortcut = x
    for i in range(3):
      fused = i == 0 and not batch_norm
      x = layers.Conv2D((filters or {}).get((block, i), features), kernel_size, padding='same',
                        activation=activation if fused else None)(x)
      if batch_norm:
        x = layers.BatchNormalization()(x)
      if i < 2 and not fused:
        x = act(x)
    if block == extra_conv_in_block:
      x = layers.Conv2D(features, kernel_size, padding='same')(x)
    x = layers.Activation(activation)(layers.Add()([shortcut, x]))
  x = layers.GlobalAveragePooling2D()(x)
  x = layers.Dense(hidden, activation=activation)(x)
  if dropout:
    x = layers.Dropout(dropout)(x)
  model = keras.Model(inputs, layers.Dense(classes, activation='softmax')(x))
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    weights = layer.get_weights()
    if isinstance(layer, keras.layers.BatchNormalization):
      n = weights[0].shape[0]
      var = np.where(rng.permutation(n) < n // 2, 10 ** rng.uniform(-5, -3, n),
                     rng.uniform(0.5, 2.0, n))
      layer.set_weights([rng.uniform(0.5, 1.5, n) * np.sqrt(var), rng.normal(0, 0.1, n),
                         rng.normal(0, 0.5, n), var])
    elif weights:
      layer.set_weights([weights[0], rng.normal(0, 0.1, weights[1].shape)])
  return model


def _save(model, directory, fmt):
  path = directory / f'model.{fmt}'
  if fmt == 'weights.h5':
    model.save_weights(path)
  else:
    model.save(path)  # .keras, or a whole model as .h5
  return path


def _outputs(imported, images):
  model = models.create_model(imported.model_config, imported.num_classes)
  logits = jax.jit(lambda v, x: model.apply(v, x))(imported.variables, images)
  return np.asarray(jax.nn.softmax(logits))


VARIANTS = {
    # The report's E.T. with a hidden width other than ours, and dropout.
    'dropout': dict(hidden=24, dropout=0.5),
    'no-dropout-bn-tanh-135-pool': dict(hidden=40, batch_norm=True, activation='tanh',
                                        kernel_sizes=(1, 3, 5), stem_pool=True, modules=3),
}


@pytest.mark.parametrize('fmt', ['keras', 'weights.h5', 'h5'])
@pytest.mark.parametrize('variant', VARIANTS)
def test_jit_keras_et_by_structure_gives_keras_outputs(tmp_path, variant, fmt):
  fields = VARIANTS[variant]
  keras_model = keras_et(**fields)
  names = [layer.name for layer in keras_model.layers]
  assert 'conv2d_10' in names and 'conv2d_2' in names  # lexical order is not the model's
  path = _save(keras_model, tmp_path, fmt)
  # What a weights file cannot hold comes from the config given.
  defaults = {'activation': fields.get('activation', 'relu'),
              'stem_pool': fields.get('stem_pool', False)}
  imported = keras_structure.import_keras_et(path, defaults)
  expected_config = {
      'name': 'et', 'width': 1, 'num_modules': fields.get('modules', 2),
      'activation': fields.get('activation', 'relu'), 'hidden_units': fields['hidden'],
      'dropout_rate': fields.get('dropout', 0.0) if fmt != 'weights.h5' else 0.0,
      'stem_pool': fields.get('stem_pool', False),
      'batch_norm': fields.get('batch_norm', False), 'block_dropout_rate': 0.0,
      'kernel_sizes': fields.get('kernel_sizes', (1, 3)), 'block_type': 'residual'}
  assert imported.model_config == expected_config
  assert imported.num_classes == 10
  if fmt == 'weights.h5':
    assert sorted(imported.not_in_file) == ['activation', 'block_dropout_rate',
                                            'dropout_rate', 'stem_pool']
    assert imported.image_size is None
  else:
    assert imported.not_in_file == {} and imported.image_size == SIZE
    assert imported.outputs == 'probabilities'
  # Every weighted Keras layer, once.
  assert sorted(imported.layers) == sorted(l.name for l in keras_model.layers if l.weights)
  images = np.random.default_rng(1).uniform(0, 1, (6, SIZE, SIZE, 3)).astype(np.float32)
  expected = np.asarray(keras_model(images, training=False))
  got = _outputs(imported, images)
  # Measured (seeds 0-2, .keras): at most 4.2e-7 relative, on probabilities
  # of 0.02-0.26 (float32 both sides, different convolution kernels).
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=0)


def test_jit_weights_alone_take_the_order_of_a_structure_or_a_legacy_h5(tmp_path):
  keras_model = keras_et(hidden=32)
  for layer in keras_model.layers:  # names that say nothing of the order
    layer.name = f'my_{len(layer.name)}_{layer.name[::-1]}'
  path = _save(keras_model, tmp_path, 'weights.h5')
  with pytest.raises(ValueError, match=r"cannot put its layers in order: .* is neither one "
                                       r"of Keras's default names"):
    keras_structure.import_keras_et(path)
  structure = tmp_path / 'model.json'
  structure.write_text(keras_model.to_json())
  imported = keras_structure.import_keras_et(path, structure=structure)
  assert imported.model_config['hidden_units'] == 32
  assert imported.order == 'the order of the saved model config (its graph)'
  images = np.random.default_rng(2).uniform(0, 1, (3, SIZE, SIZE, 3)).astype(np.float32)
  expected = np.asarray(keras_model(images))
  np.testing.assert_allclose(_outputs(imported, images), expected, rtol=1e-5, atol=0)

  # The same structure as Keras 2 (tf.keras) writes it (checked against
  # tf_keras 2.21's to_json): nodes as [[layer, node, tensor, kwargs]].
  config = json.loads(keras_model.to_json())
  for layer in config['config']['layers']:
    layer['inbound_nodes'] = [[[t['config']['keras_history'][0], 0, 0, {}]
                               for t in _keras_tensors(node['args'])]
                              for node in layer['inbound_nodes']]
    if 'batch_shape' in layer['config']:
      layer['config']['batch_input_shape'] = layer['config'].pop('batch_shape')
  config['config']['output_layers'] = [config['config']['output_layers']]
  structure.write_text(json.dumps(config))
  imported = keras_structure.import_keras_et(path, structure=structure)
  np.testing.assert_allclose(_outputs(imported, images), expected, rtol=1e-5, atol=0)

  # A legacy .h5 of weights alone (Keras 2's save_weights) lists layers in the
  # model's order, whatever their names.
  legacy = tmp_path / 'legacy.h5'
  with h5py.File(legacy, 'w') as file:
    weighted = [layer for layer in keras_model.layers if layer.weights]
    file.attrs['layer_names'] = [layer.name.encode() for layer in weighted]
    for layer in weighted:
      group = file.create_group(layer.name)
      group.attrs['weight_names'] = [f'{layer.name}/{i}'.encode()
                                     for i in range(len(layer.weights))]
      for i, value in enumerate(layer.get_weights()):
        group.create_dataset(f'{layer.name}/{i}', data=value)
  imported = keras_structure.import_keras_et(legacy)
  assert imported.order.startswith('the order the file lists them in')
  np.testing.assert_allclose(_outputs(imported, images), expected, rtol=1e-5, atol=0)


def test_jit_build_keras_et_files_import_by_structure_too(tmp_path):
  # et_flax's own names (block10 sorts before block2 as text) and Keras
  # built by build_keras_et: its activations after the Add, as ours.
  from et_flax.keras import models as keras_models
  keras.utils.set_random_seed(3)
  config = {'name': 'et', 'num_modules': 6, 'hidden_units': 20}
  keras_model = keras_models.build_keras_et(config, 4, SIZE)
  path = _save(keras_model, tmp_path, 'weights.h5')
  imported = keras_structure.import_keras_et(path)
  assert imported.order == "the order of et_flax's layer names (build_keras_et's)"
  assert imported.layers['block10_conv2'] == 'block10/conv2'
  assert {k: imported.model_config[k] for k in config} == config
  images = np.random.default_rng(4).uniform(0, 1, (3, SIZE, SIZE, 3)).astype(np.float32)
  model = models.create_model(imported.model_config, imported.num_classes)
  got = jax.jit(lambda v, x: model.apply(v, x))(imported.variables, images)
  expected = np.asarray(keras_model(images))
  # Logits (no softmax here): measured 2.6e-7 of their largest magnitude.
  np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max(), rtol=0)


def _keras_tensors(value):
  if isinstance(value, dict):
    return [value] if value.get('class_name') == '__keras_tensor__' else []
  return [t for item in value for t in _keras_tensors(item)] if isinstance(value, list) else []


@pytest.mark.parametrize('block', [1, 3])
@pytest.mark.parametrize('fmt', ['keras', 'weights.h5'])
def test_a_layer_too_many_is_named(tmp_path, fmt, block):
  keras_model = keras_et(extra_conv_in_block=block)
  convs = [l.name for l in keras_model.layers if isinstance(l, keras.layers.Conv2D)]
  extra = convs[1 + 3 * (block + 1)]  # the stem, three per block, then the fourth
  path = _save(keras_model, tmp_path, fmt)
  with pytest.raises(ValueError) as error:
    keras_structure.import_keras_et(path)
  message = str(error.value)
  kernel_size = 3 if block % 2 else 1
  assert message.startswith(f"{path}: layer '{extra}' (Conv2D {kernel_size}x{kernel_size}, "
                            '16 filters)'), message
  if fmt == 'keras':
    assert (f'does not fit: E.T. has the Add of the shortcut of block {block} (with the '
            'output of ') in message
  elif block < 3:  # the next block's first conv is 1x1
    assert 'E.T. has a 1x1 Conv2D with 16 filters (conv 0 of block 2) there' in message
  else:  # weights alone cannot tell which of the four is extra: the last is
    assert (f"has no place in E.T.: 1 conv layer(s) too many (E.T.'s last conv is "
            f"'{convs[-2]}')") in message


@pytest.mark.parametrize('fmt', ['keras', 'weights.h5'])
def test_a_wrong_width_is_named(tmp_path, fmt):
  keras_model = keras_et(filters={(3, 1): 32})  # block 3's middle conv
  convs = [l.name for l in keras_model.layers if isinstance(l, keras.layers.Conv2D)]
  path = _save(keras_model, tmp_path, fmt)
  with pytest.raises(ValueError) as error:
    keras_structure.import_keras_et(path)
  message = str(error.value)
  assert message.startswith(f"{path}: layer '{convs[1 + 3 * 3 + 1]}' (Conv2D 3x3, 32 "
                            'filters)'), message
  assert 'a 3x3 Conv2D with 16 filters (conv 1 of block 3)' in message

  (tmp_path / 'wide').mkdir()
  not_a_multiple = _save(keras_et(features=24), tmp_path / 'wide', fmt)
  with pytest.raises(ValueError, match=r"layer 'conv2d', E.T.'s stem conv, has 24 filters; "
                                       r"E.T.'s convs have 16 x width"):
    keras_structure.import_keras_et(not_a_multiple)


def test_a_given_config_is_checked_layer_by_layer(tmp_path):
  path = _save(keras_et(hidden=24), tmp_path, 'keras')
  with pytest.raises(ValueError, match=r"layer 'dense' \(Dense, 24 units\) does not fit: "
                                       r'E.T. has the hidden Dense with 256 units there'):
    keras_structure.import_keras_et(path, {'name': 'et', 'num_modules': 2}, infer=False)
  with pytest.raises(ValueError, match=r"layer 'dense_1' \(Dense, 10 units\) does not fit: "
                                       r'E.T. has the last Dense with 7 units'):
    keras_structure.import_keras_et(path, num_classes=7)
  imported = keras_structure.import_keras_et(
      path, {'name': 'et', 'num_modules': 2, 'hidden_units': 24}, infer=False)
  assert imported.from_file == () and imported.model_config['hidden_units'] == 24
  # By name, the model's layers are not found: the error points here.
  model = models.create_model(imported.model_config, 10)
  with pytest.raises(ValueError, match=r"layers missing from the file \['block0_conv0'.*An "
                                       'E.T. with other layer names imports by structure'):
    keras_weights.import_keras_weights(path, model.init(jax.random.key(0),
                                                       np.zeros((1, SIZE, SIZE, 3))))


def _one_block_model(shortcut_from_conv=False, activation_before_add=False,
                     stem_norm_epsilon=None):
  """E.T.'s stem and one 1x1 block, with one thing changed, and the head."""
  keras.backend.clear_session()
  layers = keras.layers
  inputs = keras.Input((SIZE, SIZE, 3))
  x = layers.Conv2D(16, 3, padding='same')(inputs)
  if stem_norm_epsilon is not None:
    x = layers.BatchNormalization(epsilon=stem_norm_epsilon)(x)
  x = block_input = layers.ReLU()(x)
  x = first = layers.Conv2D(16, 1, activation='relu')(x)
  x = layers.Conv2D(16, 1, activation='relu')(x)
  x = layers.Conv2D(16, 1, activation='relu' if activation_before_add else None)(x)
  x = layers.ReLU()(layers.Add()([x, first if shortcut_from_conv else block_input]))
  x = layers.Dense(5)(layers.Dense(8, activation='relu')(layers.GlobalAveragePooling2D()(x)))
  return keras.Model(inputs, x)


def test_a_graph_other_than_ets_is_refused(tmp_path):
  # Each would give other outputs than E.T. with the same weights.
  et = keras_et(modules=1)
  for name, model, message in [
      ('shortcut', _one_block_model(shortcut_from_conv=True),
       r"layer 'add' \(an Add with the output of layer 'conv2d_1'\) does not fit: E.T. has "
       r"the Add of the shortcut of block 0 \(with the output of 're_lu'\) there"),
      ('activation', _one_block_model(activation_before_add=True),
       r"layer 'conv2d_3' \(the activation='relu' of its Conv2D\) does not fit: E.T. has "
       r'the Add of the shortcut of block 0'),
      ('epsilon', _one_block_model(stem_norm_epsilon=1e-5),
       r"layer 'batch_normalization' \(BatchNormalization\) has epsilon=1e-05; E.T. needs "
       r"Keras's default 0.001"),
      ('after', keras.Model(et.input, keras.layers.Dense(3)(et.output)),
       r"layer 'dense_2' \(Dense, 3 units\) comes after E.T.'s last layer \(the Dense "
       r"'dense_1'\)")]:
    (tmp_path / name).mkdir()
    with pytest.raises(ValueError, match=message):
      keras_structure.import_keras_et(_save(model, tmp_path / name, 'keras'))


def test_layers_and_settings_that_are_not_et_are_refused(tmp_path):
  layers = keras.layers
  keras.backend.clear_session()
  inputs = keras.Input((SIZE, SIZE, 3))
  x = layers.Rescaling(1 / 255)(inputs)
  model = keras.Model(inputs, layers.Dense(3)(layers.GlobalAveragePooling2D()(
      layers.Conv2D(16, 3, padding='same')(x))))
  path = _save(model, tmp_path, 'keras')
  with pytest.raises(ValueError, match=r"layer 'rescaling' \(Rescaling\) is not one of the "
                                       'layers E.T. is made of'):
    keras_structure.import_keras_et(path)
  keras.backend.clear_session()
  inputs = keras.Input((SIZE, SIZE, 3))
  model = keras.Model(inputs, layers.Conv2D(16, 3, strides=2, padding='same')(inputs))
  (tmp_path / 'strided').mkdir()
  path = _save(model, tmp_path / 'strided', 'keras')
  with pytest.raises(ValueError, match=r"layer 'conv2d' \(Conv2D\) has strides=\[2, 2\]; "
                                       'E.T. needs strides 1'):
    keras_structure.import_keras_et(path)


@pytest.fixture(scope='module')
def digits(digits_data_dir):
  """The 8x8 digits as et_flax decodes them, by split."""
  from configs import quickstart
  from et_flax.data import input_pipeline

  config = quickstart.get_config()
  config.data.data_dir, config.data.image_size = str(digits_data_dir), SIZE
  info = input_pipeline.get_dataset_info(config.data)
  return {split: input_pipeline.load_split(info, split) for split in ('train', 'val')}


def _import_command(keras_file, workdir, digits_data_dir, *overrides):
  return subprocess.run(
      [sys.executable, '-m', 'et_flax.import_keras', str(keras_file), f'--workdir={workdir}',
       '--config=configs/quickstart.py', f'--config.data.data_dir={digits_data_dir}',
       f'--config.data.image_size={SIZE}', *overrides],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
      env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})


def test_the_command_makes_a_workdir_that_evaluates_as_keras(tmp_path, digits,
                                                             digits_data_dir):
  from et_flax import compare
  from et_flax import evaluate
  from et_flax import predict

  keras_model = keras_et(modules=1, hidden=64, dropout=0.2)
  keras_model.compile(optimizer=keras.optimizers.Adam(3e-3),
                      loss='sparse_categorical_crossentropy', metrics=['accuracy'])
  train, val = digits['train'], digits['val']
  keras_model.fit(train.images / np.float32(255), train.labels, batch_size=32, epochs=8,
                  verbose=0)
  _, keras_top1 = keras_model.evaluate(val.images / np.float32(255), val.labels, verbose=0)
  assert keras_top1 > 0.5  # trained: the comparison means something
  keras_file = _save(keras_model, tmp_path, 'keras')
  workdir = tmp_path / 'from_keras'
  result = _import_command(keras_file, workdir, digits_data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'model.hidden_units: 64 from the file (the config had 256)' in result.stderr
  assert 'model.dropout_rate: 0.2 from the file (the config had 0.0)' in result.stderr
  record = json.loads((workdir / 'keras_import.json').read_text())
  assert record['keras_outputs'] == 'probabilities' and record['num_classes'] == 10
  # The checkpoint's meta is a trained run's (settings included), and the record.
  from et_flax import checkpoints
  from et_flax import settings as settings_lib
  _, meta = checkpoints.load_checkpoint(workdir, 'best')
  assert sorted(meta.to_dict()) == ['best_val_top1_accuracy', 'config', 'epoch', 'history',
                                    'keras_import', 'settings']
  assert meta.epoch == 0 and meta.history == [] and meta.keras_import == record
  assert settings_lib.from_dict(meta.settings).preprocessing == 'rescale'

  report = evaluate.evaluate_run(workdir)  # the best checkpoint, val, with figures
  # 270 images: one image is 3.7e-3 of top-1; Keras sums in float32.
  assert report['top1_accuracy'] == pytest.approx(keras_top1, abs=1e-6)
  assert report['num_images'] == len(val) == 270 and report['epoch'] == 0
  assert (workdir / 'confusion_val.png').exists() and not (workdir / 'curves.png').exists()
  count = predict.write_submission(workdir, tmp_path / 'submission.csv')
  assert count == 180
  rows = compare.comparison_rows([workdir])
  assert rows[0]['run'] == 'from_keras' and rows[0]['top1'] == report['top1_accuracy']

  # Into a workdir that holds a run: refused, the run untouched.
  from et_flax import import_keras
  from configs import quickstart
  with pytest.raises(ValueError, match='holds checkpoints already'):
    import_keras.import_to_workdir(keras_file, workdir, quickstart.get_config())


def test_the_command_refuses_user_mistakes_in_one_line(tmp_path, digits_data_dir):
  keras_file = _save(keras_et(modules=1), tmp_path, 'keras')
  workdir = tmp_path / 'from_keras'
  result = _import_command(keras_file, workdir, digits_data_dir, '--config.data.classes=5')
  assert result.returncode == 1
  assert result.stderr.startswith(
      f'error: {keras_file}: its last Dense has 10 units, but the config\'s data gives 5 '
      'classes'), result.stderr
  assert 'Traceback' not in result.stderr and not workdir.exists()

  from et_flax import import_keras
  from configs import vgg16_20
  with pytest.raises(ValueError, match="import_keras reads E.T.; the config's model is "
                                       "'vgg16'"):
    import_keras.import_to_workdir(keras_file, workdir, vgg16_20.get_config())
  assert not workdir.exists()
