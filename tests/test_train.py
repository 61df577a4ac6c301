"""Training end to end on the digits, the eval step against NumPy, bad configs."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from et_flax import augment
from et_flax import models
from et_flax import optim
from et_flax import train
from et_flax.data import input_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trained(digits_data_dir):
  """Plain one-module E.T. after 60 Adam steps on one batch of digits."""
  info = input_pipeline.get_dataset_info(tiny_config(digits_data_dir).data)
  model = models.create_model({'name': 'et', 'num_modules': 1}, info.num_classes, 8)
  tx = optim.create_optimizer({'name': 'adam', 'learning_rate': 3e-3})
  state = train.create_train_state(jax.random.key(0), model, 8, tx)
  split = input_pipeline.load_split(info, 'train')
  batch = next(input_pipeline.TrainInput(split, 64, seed=0).epoch(0))
  step = jax.jit(functools.partial(train.train_step,
                                   loss_fn=optim.categorical_crossentropy))
  losses = []
  for _ in range(60):
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(float(metrics.compute()['loss']))
  return state, losses, input_pipeline.load_split(info, 'val')


def test_train_steps_lower_the_loss(trained):
  state, losses, _ = trained
  assert int(state.step) == 60
  # An untrained 10-class model starts near ln(10) = 2.30; 60 steps on one
  # batch must take at least a tenth off.
  assert abs(losses[0] - np.log(10)) < 0.05
  assert losses[-1] < 0.9 * losses[0], losses


def test_jit_eval_step_equals_numpy(trained):
  state, _, val = trained
  step = jax.jit(functools.partial(train.eval_step,
                                   loss_fn=optim.categorical_crossentropy))
  batch = next(input_pipeline.eval_batches(val, 48))
  batch['mask'] = batch['mask'].copy()
  batch['mask'][-5:] = False  # padded examples must not count
  got = step(state, batch).compute()

  logits = np.asarray(state.apply_fn({'params': state.params},
                                     batch['image'].astype(np.float32) / 255.0),
                      np.float64)
  labels, mask = batch['label'], batch['mask']
  ranking = np.argsort(-logits, axis=1)
  top1 = ranking[:, 0] == labels
  top5 = (ranking[:, :5] == labels[:, None]).any(axis=1)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  loss = -log_probs[np.arange(len(labels)), labels]
  # The test needs hits and misses at both k to mean anything.
  assert 0 < top1[mask].sum() < top5[mask].sum() < mask.sum()
  np.testing.assert_allclose(got['top1_accuracy'], top1[mask].mean(), rtol=1e-6)
  np.testing.assert_allclose(got['top5_accuracy'], top5[mask].mean(), rtol=1e-6)
  # float32 log-softmax against float64: 1e-5 relative.
  np.testing.assert_allclose(got['loss'], loss[mask].mean(), rtol=1e-5)


def test_jit_top_k_correct_equals_numpy():
  logits = jax.random.normal(jax.random.key(0), (50, 12))
  labels = jax.random.randint(jax.random.key(1), (50,), 0, 12)
  ranking = np.argsort(-np.asarray(logits), axis=1)
  for k in (1, 3, 5):
    expected = (ranking[:, :k] == np.asarray(labels)[:, None]).any(axis=1)
    got = jax.jit(train.top_k_correct, static_argnums=2)(logits, labels, k)
    np.testing.assert_array_equal(got, expected)
  # With fewer classes than k, every label is in the top k.
  two_class = jnp.array([[0.2, 0.1], [0.0, 1.0]])
  np.testing.assert_array_equal(train.top_k_correct(two_class, jnp.array([1, 0]), 5),
                                [1.0, 1.0])


def test_train_and_evaluate_end_to_end(two_epoch_run):
  summary = two_epoch_run.summary  # train_and_evaluate's, for two epochs of tiny_config
  assert {'train_loss', 'train_top1_accuracy', 'val_loss', 'val_top1_accuracy',
          'val_top5_accuracy'} <= set(summary)
  assert 0.0 <= summary['val_top1_accuracy'] <= summary['val_top5_accuracy'] <= 1.0
  assert summary['val_top1_accuracy'] > 0.15  # chance is 0.1
  assert list(two_epoch_run.workdir.glob('events.out.tfevents.*'))


@pytest.mark.parametrize('overrides,error,message', [
    ({'model': {'name': 'lenet'}}, ValueError, 'valid names'),
    ({'model': {'name': 'et', 'width': 0}}, ValueError, 'model.width'),
    ({'model': {'name': 'et', 'num_modules': -1}}, ValueError, 'model.num_modules'),
    ({'model': {'name': 'vgg16'}}, ValueError, 'cannot take 8x8 images'),
    ({'batch_size': 0}, ValueError, 'config.batch_size'),
    ({'loss': 'mse'}, ValueError, 'Unknown loss'),
    ({'optimizer': {'name': 'adam', 'learning_rate': -1.0}}, ValueError,
     'learning_rate must be a positive number'),
    ({'optimizer': {'name': 'adagrad', 'learning_rate': 1.0}}, ValueError,
     'Unknown optimizer'),
])
def test_bad_config_fails_before_training(digits_data_dir, tmp_path, monkeypatch,
                                          overrides, error, message):
  def no_decoding(*args, **kwargs):
    raise AssertionError('decoded images before checking the config')

  monkeypatch.setattr(input_pipeline, 'load_split', no_decoding)
  config = tiny_config(digits_data_dir)
  for key, value in overrides.items():
    if isinstance(value, dict):
      config[key] = type(config.model)(value)
    else:
      config[key] = value
  with pytest.raises(error, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert list(tmp_path.iterdir()) == []


def test_main_runs_the_quickstart_config(digits_data_dir, tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'et_flax.main', '--config=configs/quickstart.py',
       f'--workdir={tmp_path}', '--config.num_epochs=1', '--config.data.image_size=8',
       f'--config.data.data_dir={digits_data_dir}', '--config.model.num_modules=1',
       '--config.augment.preset=five', '--config.augment.rotation_range=5'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'epoch 1/1: train loss' in result.stderr


def test_augmentation_runs_inside_the_step(trained):
  """The step augments with the key it derives from (rng, step), on device."""
  state, _, val = trained
  batch = next(input_pipeline.eval_batches(val, 16))
  batch = {'image': batch['image'], 'label': batch['label']}
  config = augment.PRESETS['eight']
  step = jax.jit(functools.partial(train.train_step, loss_fn=optim.categorical_crossentropy,
                                   augment_config=config))
  rng = jax.random.key(7)
  augmented_state, _ = step(state, batch, rng)

  augment_rng, _ = jax.random.split(jax.random.fold_in(rng, state.step))
  images = augment.augment_batch(augment_rng, batch['image'].astype(jnp.float32), config)
  plain = jax.jit(functools.partial(train.train_step, loss_fn=optim.categorical_crossentropy))
  expected_state, _ = plain(state, {'image': images, 'label': batch['label']}, rng)
  unaugmented_state, _ = plain(state, batch, rng)
  leaves = lambda s: jax.tree.leaves(s.params)
  for got, want in zip(leaves(augmented_state), leaves(expected_state)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert any(not np.allclose(a, b) for a, b in
             zip(leaves(augmented_state), leaves(unaugmented_state)))


def _numpy_et_1x1(params, images):
  """Training-mode E.T. with batch norm on 1x1 images, in float64.

  On a 1x1 image a 'SAME' conv is its centre tap: a matmul. Batch norm
  normalises with the batch's mean and (biased) variance, epsilon 1e-3.
  Returns the logits and each batch norm's batch mean and variance.
  """
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  relu = lambda v: np.maximum(v, 0.0)
  moments = {}

  def conv_bn(h, conv, bn, path):
    kernel = conv['kernel']
    h = h @ kernel[kernel.shape[0] // 2, kernel.shape[1] // 2] + conv['bias']
    mean, var = h.mean(axis=0), h.var(axis=0)
    moments[path] = (mean, var)
    return (h - mean) / np.sqrt(var + 1e-3) * bn['scale'] + bn['bias']

  h = relu(conv_bn(images.reshape(len(images), -1), p['stem_conv'], p['stem_bn'],
                   ('stem_bn',)))
  for block in ('block0', 'block1'):
    shortcut = h
    for i in range(3):
      h = conv_bn(h, p[block][f'conv{i}'], p[block][f'bn{i}'], (block, f'bn{i}'))
      h = relu(h) if i < 2 else relu(h + shortcut)
  h = relu(h @ p['hidden']['kernel'] + p['hidden']['bias'])
  return h @ p['logits']['kernel'] + p['logits']['bias'], moments


def test_jit_frozen_backbone_for_two_epochs_then_training_equals_numpy():
  """The optimizer with frozen_steps = N x steps_per_epoch (what train_and_evaluate
  makes of freeze_backbone_epochs=N): N = 2 epochs of two steps frozen, then
  two epochs training, on E.T. with batch norm (1x1 images, so the NumPy
  reference is matmuls).
  - Steps 1-4: the backbone (every layer not in models.HEAD_NAMES, batch
    norm scale and offset included) stays bit for bit; the head moves.
  - Step 5: every backbone array moves; as the optimizer's step count ran on
    through the frozen steps, Adam's first backbone step has size
    lr * sqrt(1 - b2^5) / (1 - b1^5) * (1 - b1) / sqrt(1 - b2) = 0.545 lr
    (where |g| >> eps), not the lr of a fresh Keras Adam given at the
    recompile that unfreezes.
  - Batch norm while frozen (et_flax's behaviour): it
    runs in training mode, normalising with the batch's statistics and
    updating the moving ones (m <- 0.99 m + 0.01 batch). Keras differs:
    `trainable=False` on a BatchNormalization layer runs it in inference
    mode (moving statistics, no updates; keras BatchNormalization.call
    takes the batch moments only `if training and self.trainable`).
  Every step's loss and moving statistics are compared with float64 NumPy:
  float32 through seven normalised layers, measured within 8.3e-7 (loss,
  relative), 1.2e-7 (means), 1.5e-7 (variances, relative); bound 1e-5. The
  step-5 size measured 0.545484 against 0.545489 (rtol 1e-3 leaves room for
  elements whose |g| is not >> eps).
  """
  model = models.ETNet(num_classes=3, num_modules=1, hidden_units=8, batch_norm=True)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 32, 1, 1, 3)).astype(np.uint8)
  labels = rng.integers(0, 3, (2, 32)).astype(np.int32)
  # Weights drawn in NumPy (model.init's glorot draws compile slowly on CPU);
  # moving statistics far from the batches', so a mode mix-up shows.
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images[0] / 255.0))

  def draw(path, s):
    name = path[-1].key
    if name in ('kernel', 'mean'):
      return rng.normal(0, 0.5, s.shape).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
    return rng.normal(0, 0.1, s.shape).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  learning_rate, steps_per_epoch, frozen_epochs = 1e-2, 2, 2
  tx = optim.create_optimizer({'name': 'adam', 'learning_rate': learning_rate},
                              frozen_steps=frozen_epochs * steps_per_epoch,
                              frozen=models.backbone_mask)
  state = train.create_train_state(jax.random.key(0), model, 1, tx, variables)
  step = jax.jit(functools.partial(train.train_step, loss_fn=optim.categorical_crossentropy))
  backbone = lambda params: {k: v for k, v in params.items() if k not in models.HEAD_NAMES}
  head = lambda params: {k: v for k, v in params.items() if k in models.HEAD_NAMES}
  initial_backbone = jax.tree.map(np.asarray, backbone(state.params))
  assert set(head(state.params)) == {'hidden', 'logits'}

  for number in range(1, 7):
    index = (number - 1) % steps_per_epoch
    logits, moments = _numpy_et_1x1(state.params, images[index] / 255.0)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected_loss = -log_probs[np.arange(32), labels[index]].mean()
    before = state
    state, metrics = step(state, {'image': images[index], 'label': labels[index]},
                          jax.random.key(1))
    np.testing.assert_allclose(metrics.compute()['loss'], expected_loss, rtol=1e-5)
    for path, (mean, var) in moments.items():
      old = functools.reduce(lambda tree, key: tree[key], path, before.batch_stats)
      new = functools.reduce(lambda tree, key: tree[key], path, state.batch_stats)
      np.testing.assert_allclose(new['mean'], 0.99 * np.asarray(old['mean']) + 0.01 * mean,
                                 rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(new['var'], 0.99 * np.asarray(old['var']) + 0.01 * var,
                                 rtol=1e-5, atol=1e-6)
    head_moved = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                              head(state.params), head(before.params))
    assert all(jax.tree.leaves(head_moved)), number
    if number <= frozen_epochs * steps_per_epoch:
      jax.tree.map(np.testing.assert_array_equal, backbone(state.params), initial_backbone)
      continue
    backbone_steps = jax.tree.leaves(jax.tree.map(
        lambda a, b: np.abs(np.asarray(a) - b).max(), backbone(state.params),
        backbone(before.params)))
    assert min(backbone_steps) > 0, number
    if number == frozen_epochs * steps_per_epoch + 1:
      t = number  # Adam's count: the frozen steps included
      first = 0.1 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t) / np.sqrt(0.001)
      np.testing.assert_allclose(max(backbone_steps) / learning_rate, first, rtol=1e-3)
