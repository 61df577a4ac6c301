"""Training end to end on the digits, the eval step against NumPy, bad configs."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from et_flax import augment
from et_flax import input_pipeline
from et_flax import models
from et_flax import optim
from et_flax import train

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


def test_jit_train_steps_lower_the_loss(trained):
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


def test_train_and_evaluate_end_to_end(digits_data_dir, tmp_path):
  config = tiny_config(digits_data_dir, num_epochs=2)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert {'train_loss', 'train_top1_accuracy', 'val_loss', 'val_top1_accuracy',
          'val_top5_accuracy'} <= set(summary)
  assert 0.0 <= summary['val_top1_accuracy'] <= summary['val_top5_accuracy'] <= 1.0
  assert summary['val_top1_accuracy'] > 0.15  # chance is 0.1
  assert list(tmp_path.glob('events.out.tfevents.*'))


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


def test_jit_augmentation_runs_inside_the_step(trained):
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
