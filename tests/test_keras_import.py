"""Keras weights into our models: same logits as Keras; export round trip."""

import jax
import numpy as np
import pytest

from helpers import make_tiny_imagenet_tree
from et_flax import models
from et_flax.keras import models as keras_models
from et_flax.keras import weights as keras_weights

keras = pytest.importorskip('keras')
h5py = pytest.importorskip('h5py')

SIZE = 32


def _randomize_batch_norm(keras_model, seed=0):
  """Moving statistics that show a mix-up of the four arrays and a wrong epsilon.

  Half of each layer's channels get variances of 1e-5..1e-3 (log-uniform),
  where epsilon (1.001e-5 in ResNet50, 1e-3 in E.T.) is a large part of
  var + eps: ResNet50's epsilon taken 100x too large moves those channels by
  up to 7x. Gamma is drawn in units of sqrt(var), so that the tiny variances
  do not blow the activations up from layer to layer.
  """
  rng = np.random.default_rng(seed)
  for layer in keras_model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      n = layer.get_weights()[0].shape[0]
      tiny = rng.permutation(n) < n // 2
      var = np.where(tiny, 10 ** rng.uniform(-5, -3, n), rng.uniform(0.5, 2.0, n))
      layer.set_weights([rng.uniform(0.5, 1.5, n) * np.sqrt(var), rng.normal(0, 0.1, n),
                         rng.normal(0, 0.5, n), var])


def _keras_application(name, num_classes, seed=0):
  builder = {'vgg16': keras.applications.VGG16, 'resnet50': keras.applications.ResNet50}
  keras.utils.set_random_seed(seed)  # Keras's own initialisers draw the weights
  base = builder[name](weights=None, include_top=False, pooling='avg',
                       input_shape=(SIZE, SIZE, 3))
  outputs = keras.layers.Dense(num_classes, name='predictions')(base.output)
  model = keras.Model(base.input, outputs)
  _randomize_batch_norm(model, seed)
  return model


def _write_legacy_h5(keras_model, path):
  """The HDF5 layout of Keras 2 / tf.keras save_weights and the ImageNet files."""
  with h5py.File(path, 'w') as file:
    layers = [layer for layer in keras_model.layers if layer.weights]
    file.attrs['layer_names'] = [layer.name.encode() for layer in layers]
    for layer in layers:
      group = file.create_group(layer.name)
      names = [f'{layer.name}/{w.path.split("/")[-1]}:0'.encode() for w in layer.weights]
      group.attrs['weight_names'] = names
      for name, value in zip(names, layer.get_weights()):
        group.create_dataset(name.decode(), data=value)


def _ours(model, variables, path, **kwargs):
  return keras_weights.import_keras_weights(path, variables, **kwargs)


# Both sides compute in float32 with different convolution kernels (oneDNN in
# TensorFlow, Eigen/XLA here). Measured (seeds 0-2, 2-core Xeon), the largest
# |difference| over max |logit|: VGG16 1.3-1.9e-6, ResNet50 5.5-8.0e-7 (7.5e-7
# for seed 0, the one tested). Tolerances are ~5x that. ResNet50 with its
# epsilon 1.001e-5 taken as 1e-5 is off by 1e-4 of the scale; as 1e-3, by 0.5.
@pytest.mark.parametrize('name,fmt,tolerance', [
    ('vgg16', 'weights.h5', 1e-5), ('vgg16', 'h5', 1e-5),
    ('resnet50', 'weights.h5', 4e-6), ('resnet50', 'keras', 4e-6)])
def test_jit_keras_applications_give_the_same_logits(tmp_path, name, fmt, tolerance):
  keras_model = _keras_application(name, 10)
  path = tmp_path / f'model.{fmt}'
  if fmt == 'weights.h5':
    keras_model.save_weights(path)
  elif fmt == 'keras':
    keras_model.save(path)
  else:
    _write_legacy_h5(keras_model, path)
  model = models.create_model({'name': name}, 10, SIZE)
  init = model.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))
  variables = keras_weights.import_keras_weights(path, init)
  images = np.random.default_rng(1).uniform(0, 1, (4, SIZE, SIZE, 3)).astype(np.float32)
  expected = np.asarray(keras_model(images, training=False))
  got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))
  scale = np.abs(expected).max()
  np.testing.assert_allclose(got, expected, atol=tolerance * scale)


@pytest.mark.parametrize('config', [
    {'name': 'et'},
    {'name': 'et', 'batch_norm': True, 'activation': 'tanh', 'kernel_sizes': (1, 3, 5),
     'stem_pool': True},
    {'name': 'et', 'block_type': 'three_branch', 'width': 2, 'num_modules': 2},
], ids=['plain', 'bn-tanh-135-pool', 'three-branch'])
def test_jit_keras_et_gives_the_same_logits(tmp_path, config):
  keras.utils.set_random_seed(0)
  keras_model = keras_models.build_keras_et(config, 7, 16)
  _randomize_batch_norm(keras_model)
  path = tmp_path / 'et.weights.h5'
  keras_model.save_weights(path)
  model = models.create_model(config, 7, 16)
  init = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
  variables = keras_weights.import_keras_weights(path, init)
  # Layer for layer: the same number of weighted layers on both sides.
  assert len(models.weighted_layers(variables['params'])) == sum(
      isinstance(l, (keras.layers.Conv2D, keras.layers.Dense)) for l in keras_model.layers)
  images = np.random.default_rng(1).uniform(0, 1, (4, 16, 16, 3)).astype(np.float32)
  expected = np.asarray(keras_model(images, training=False))
  got = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, images))
  # Measured (seeds 0-2): at most 5.2e-7 of max |logit|; ~5x that allowed.
  np.testing.assert_allclose(got, expected, atol=3e-6 * np.abs(expected).max())


def test_export_then_import_gives_identical_params(tmp_path):
  # Our exporter against our importer; Keras reads the export in
  # test_keras_parity.py::test_jit_exported_weights_give_keras_the_same_logits.
  config = {'name': 'et', 'batch_norm': True, 'num_modules': 2}
  model = models.create_model(config, 5, 8)
  variables = model.init(jax.random.key(3), np.zeros((1, 8, 8, 3), np.float32))
  variables = jax.tree.map(lambda v: v + np.float32(0.25), variables)  # non-default stats
  path = keras_weights.export_et_weights(variables, config, 5, 8, tmp_path / 'et.weights.h5')
  restored = keras_weights.import_keras_weights(path, model.init(
      jax.random.key(9), np.zeros((1, 8, 8, 3), np.float32)))
  jax.tree.map(np.testing.assert_array_equal, restored, jax.tree.map(np.asarray, variables))


def test_keep_head_ignores_the_keras_top(tmp_path):
  keras_model = keras.applications.VGG16(weights=None, include_top=True, classes=1000)
  path = tmp_path / 'vgg16_top.weights.h5'
  keras_model.save_weights(path)
  model = models.create_model({'name': 'vgg16'}, 20, SIZE)
  init = model.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))
  variables = keras_weights.import_keras_weights(path, init, keep_head=True)
  np.testing.assert_array_equal(variables['params']['predictions']['kernel'],
                                init['params']['predictions']['kernel'])
  np.testing.assert_array_equal(variables['params']['block5_conv3']['kernel'],
                                keras_model.get_layer('block5_conv3').get_weights()[0])
  with pytest.raises(ValueError, match="layers the model lacks \\['fc1', 'fc2'\\]"):
    keras_weights.import_keras_weights(path, init)


def test_bad_files_are_clear_errors(tmp_path):
  vgg = _keras_application('vgg16', 10)
  path = tmp_path / 'vgg.weights.h5'
  vgg.save_weights(path)
  resnet = models.create_model({'name': 'resnet50'}, 10, SIZE)
  init = resnet.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))
  with pytest.raises(ValueError) as error:
    keras_weights.import_keras_weights(path, init)
  assert "'conv1_conv'" in str(error.value) and "'block1_conv1'" in str(error.value)

  et = models.create_model({'name': 'et', 'width': 2}, 10, 8)
  et_init = et.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
  narrow = keras_models.build_keras_et({'name': 'et'}, 10, 8)
  narrow.save_weights(tmp_path / 'narrow.weights.h5')
  with pytest.raises(ValueError, match=r'stem_conv/kernel: \(3, 3, 3, 16\) in the file, '
                                       r'\(3, 3, 3, 32\) in the model'):
    keras_weights.import_keras_weights(tmp_path / 'narrow.weights.h5', et_init)

  truncated = tmp_path / 'truncated.weights.h5'
  truncated.write_bytes(path.read_bytes()[:5000])
  with pytest.raises(ValueError, match='truncated.weights.h5 is not a readable Keras'):
    keras_weights.import_keras_weights(truncated, init)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    keras_weights.import_keras_weights(tmp_path / 'none.h5', init)
  (tmp_path / 'weights.npz').write_bytes(b'')
  with pytest.raises(ValueError, match='expected a .weights.h5, .h5 or .keras file'):
    keras_weights.import_keras_weights(tmp_path / 'weights.npz', init)


def test_jit_caffe_preprocessing_equals_keras():
  from et_flax import augment
  images = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
  expected = keras.applications.vgg16.preprocess_input(images.copy())
  got = jax.jit(lambda x: augment.preprocess(x, 'caffe'))(images)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-4)
  np.testing.assert_allclose(got, keras.applications.resnet50.preprocess_input(images.copy()),
                             rtol=1e-6, atol=1e-4)


def test_pretrained_config_starts_from_the_keras_backbone(tmp_path, run_command):
  """vgg16_pretrained_20 on a tiny tree: with the backbone frozen for the one
  epoch, the checkpoint's backbone is the file's, and only the head moved."""
  import os
  import pathlib
  import subprocess
  import sys

  from et_flax import checkpoints

  repo = pathlib.Path(__file__).resolve().parent.parent
  base = keras.applications.VGG16(weights=None, include_top=False,
                                  input_shape=(32, 32, 3))
  weights_file = tmp_path / 'vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5'
  _write_legacy_h5(base, weights_file)
  root = make_tiny_imagenet_tree(tmp_path / 'tiny-imagenet-200', train_per_class=4,
                                 size=32)
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'et_flax.main', '--config=configs/vgg16_pretrained_20.py',
       f'--workdir={workdir}', f'--config.data.data_dir={root}',
       f'--config.data.tfds_dir={tmp_path / "tfds"}', '--config.data.classes=0',
       '--config.data.image_size=32', '--config.batch_size=4',
       '--config.eval_batch_size=4', '--config.num_epochs=1',
       '--config.freeze_backbone_epochs=1', f'--config.pretrained_weights={weights_file}'],
      cwd=repo, capture_output=True, text=True, timeout=600, check=False,
      env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})
  assert result.returncode == 0, result.stderr[-3000:]
  variables = checkpoints.load_variables(workdir, 'latest')
  for layer in base.layers:
    if layer.weights:
      kernel, bias = layer.get_weights()
      np.testing.assert_array_equal(variables['params'][layer.name]['kernel'], kernel)
      np.testing.assert_array_equal(variables['params'][layer.name]['bias'], bias)
  model = models.create_model({'name': 'vgg16'}, 3, 32)
  init = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  assert not np.allclose(variables['params']['predictions']['kernel'],
                         init['params']['predictions']['kernel'])
  # A missing file: refused before anything is written (in this process).
  missing = tmp_path / 'missing.h5'
  code, _, stderr = run_command(
      'et_flax.main', '--config=configs/vgg16_pretrained_20.py',
      f'--workdir={tmp_path / "run2"}', f'--config.data.data_dir={root}',
      f'--config.data.tfds_dir={tmp_path / "tfds"}', '--config.data.classes=0',
      '--config.data.image_size=32', f'--config.pretrained_weights={missing}')
  assert code == 1
  assert stderr.splitlines()[0] == f'error: Keras weights file {missing} does not exist'
  assert 'Traceback' not in stderr
  assert not (tmp_path / 'run2').exists()
