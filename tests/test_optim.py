"""Optimizers, plateau halving and losses against Keras 3 (with TensorFlow)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from et_flax import optim

keras = pytest.importorskip('keras')

NUM_STEPS = 60


def _gradients(seed=0, shape=(5, 3)):
  rng = np.random.default_rng(seed)
  # Gradients that change sign and scale, as real ones do.
  return [rng.normal(0, 1, shape).astype(np.float32) * (1 + 0.5 * np.sin(t))
          for t in range(NUM_STEPS)]


def _keras_trajectory(optimizer, init, gradients):
  variable = keras.Variable(init)
  trajectory = []
  for g in gradients:
    optimizer.apply_gradients([(keras.ops.convert_to_tensor(g), variable)])
    trajectory.append(np.array(variable.numpy()))
  return np.stack(trajectory)


def _our_trajectory(tx, init, gradients, losses=None):
  params = jnp.asarray(init)
  state = tx.init(params)

  @jax.jit
  def step(params, state, g, loss):
    updates, state = tx.update(g, state, params, value=loss)
    return optax.apply_updates(params, updates), state

  trajectory = []
  for t, g in enumerate(gradients):
    loss = jnp.float32(1.0 if losses is None else losses[t])
    params, state = step(params, state, jnp.asarray(g), loss)
    trajectory.append(np.asarray(params))
  return np.stack(trajectory), state


# Both sides run in float32; the formulas are the same, only the order of a
# few float32 operations differs (Keras's TensorFlow kernels vs XLA), so the
# trajectories agree to a few ulps of the parameter scale per step: after 60
# steps, 1e-5 relative to the parameters.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('config,keras_optimizer', [
    ({'name': 'adam', 'learning_rate': 1e-2},
     lambda: keras.optimizers.Adam(learning_rate=1e-2)),
    ({'name': 'adam', 'learning_rate': 3e-3, 'beta_1': 0.8, 'beta_2': 0.99,
      'epsilon': 1e-4},
     lambda: keras.optimizers.Adam(3e-3, beta_1=0.8, beta_2=0.99, epsilon=1e-4)),
    ({'name': 'sgd', 'learning_rate': 0.05},
     lambda: keras.optimizers.SGD(0.05)),
    ({'name': 'sgd', 'learning_rate': 0.05, 'momentum': 0.9},
     lambda: keras.optimizers.SGD(0.05, momentum=0.9)),
    ({'name': 'sgd', 'learning_rate': 0.05, 'momentum': 0.9, 'nesterov': True},
     lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True)),
    ({'name': 'sgd', 'learning_rate': 0.1, 'momentum': 0.9, 'schedule': 'inverse_time',
      'decay': 0.05},
     lambda: keras.optimizers.SGD(keras.optimizers.schedules.InverseTimeDecay(
         0.1, decay_steps=1, decay_rate=0.05), momentum=0.9)),
    ({'name': 'rmsprop', 'learning_rate': 1e-2},
     lambda: keras.optimizers.RMSprop(1e-2)),
    ({'name': 'rmsprop', 'learning_rate': 1e-2, 'rho': 0.8, 'momentum': 0.5},
     lambda: keras.optimizers.RMSprop(1e-2, rho=0.8, momentum=0.5)),
], ids=['adam', 'adam-custom', 'sgd', 'sgd-momentum', 'sgd-nesterov', 'sgd-decay',
        'rmsprop', 'rmsprop-momentum'])
def test_jit_optimizer_equals_keras(config, keras_optimizer):
  init = np.random.default_rng(1).normal(0, 1, (5, 3)).astype(np.float32)
  gradients = _gradients()
  expected = _keras_trajectory(keras_optimizer(), init, gradients)
  got, _ = _our_trajectory(optim.create_optimizer(config), init, gradients)
  np.testing.assert_allclose(got, expected, **TOLERANCE)


def test_jit_adam_default_epsilon_equals_keras_on_tiny_gradients():
  """Gradients ~1e-7, where Keras's default eps = 1e-7 (added to the uncorrected
  sqrt(v)) dominates the denominator; the parameters start at zero, so the
  trajectory is the sum of the updates alone.

  Measured against Keras: max error 1.1e-7 of max|trajectory| (0.035). With
  epsilon 1e-8 the error is 3.6x that scale, with optax.adam (eps 1e-8 on
  the corrected sqrt(v)) 6x, with optax.adam(eps=1e-7) 2.7x: TOLERANCE
  (1e-5 relative + 1e-6) tells each of them apart by five orders of magnitude.
  """
  init = np.zeros((5, 3), np.float32)
  gradients = [g * 1e-7 for g in _gradients()]
  expected = _keras_trajectory(keras.optimizers.Adam(learning_rate=1e-2), init, gradients)
  got, _ = _our_trajectory(optim.create_optimizer({'name': 'adam', 'learning_rate': 1e-2}),
                           init, gradients)
  assert np.abs(expected).max() > 0.01  # the updates are not lost in the tolerance
  np.testing.assert_allclose(got, expected, **TOLERANCE)


def test_jit_sgd_decay_is_lr_over_one_plus_decay_t():
  config = {'name': 'sgd', 'learning_rate': 0.1, 'schedule': 'inverse_time', 'decay': 1e-2}
  gradients = [np.ones((1,), np.float32)] * NUM_STEPS
  got, _ = _our_trajectory(optim.create_optimizer(config), np.zeros(1, np.float32),
                           gradients)
  # t = updates already done, as Keras counts them.
  expected = -np.cumsum([0.1 / (1 + 1e-2 * t) for t in range(NUM_STEPS)])
  np.testing.assert_allclose(got[:, 0], expected, rtol=1e-6)


def _keras_plateau_rates(epoch_losses, learning_rate, **kwargs):
  model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
  model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss='mse')
  callback = keras.callbacks.ReduceLROnPlateau(monitor='loss', **kwargs)
  callback.set_model(model)
  callback.on_train_begin()
  rates = []
  for epoch, loss in enumerate(epoch_losses):
    rates.append(float(model.optimizer.learning_rate.numpy()))
    callback.on_epoch_end(epoch, {'loss': loss})
  return rates


EPOCH_LOSSES = [
    2.0, 1.5, 1.4, 1.4, 1.4, 1.4,       # improvements, then a plateau
    1.39995, 1.39995,                    # within min_delta 1e-4: not improvements
    1.39989,                             # just beyond min_delta: an improvement
    1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5,   # a longer plateau: repeated halvings
    0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9,
]


@pytest.mark.parametrize('kwargs', [
    dict(factor=0.5, patience=3, min_delta=1e-4),
    dict(factor=0.5, patience=2, min_delta=1e-4, cooldown=2),
    dict(factor=0.1, patience=2, min_delta=1e-4, min_lr=2e-5),
], ids=['patience3', 'cooldown2', 'min_lr'])
def test_jit_plateau_decisions_equal_keras(kwargs):
  learning_rate = 1e-3
  expected = _keras_plateau_rates(EPOCH_LOSSES, learning_rate, **kwargs)
  assert len(set(expected)) > 2  # the sequence does trigger several reductions

  steps_per_epoch = 3
  config = {'name': 'sgd', 'learning_rate': learning_rate,
            'plateau': dict(enabled=True, **kwargs)}
  tx = optim.create_optimizer(config, steps_per_epoch=steps_per_epoch)
  params = jnp.zeros(1)
  state = tx.init(params)
  update = jax.jit(tx.update)
  rates = []
  for loss in EPOCH_LOSSES:
    # Each epoch: steps whose mean is the epoch loss, one above and one below.
    rates.append(float(optim.current_learning_rate(state, config, steps_per_epoch, 1)))
    for offset in (0.25, -0.25, 0.0):
      _, state = update(jnp.ones(1), state, params, value=jnp.float32(loss + offset))
  np.testing.assert_allclose(rates, expected, rtol=1e-6)


def test_jit_plateau_scale_applies_from_the_next_epoch():
  config = {'name': 'sgd', 'learning_rate': 1.0,
            'plateau': dict(enabled=True, factor=0.5, patience=1, min_delta=0.0)}
  tx = optim.create_optimizer(config, steps_per_epoch=2)
  params = jnp.zeros(1)
  state = tx.init(params)
  steps = []
  for loss in (1.0, 1.0, 1.0, 1.0, 1.0, 1.0):  # epoch 2 does not improve on epoch 1
    updates, state = tx.update(jnp.ones(1), state, params, value=jnp.float32(loss))
    steps.append(float(updates[0]))
  assert steps == [-1.0, -1.0, -1.0, -1.0, -0.5, -0.5]


@pytest.mark.parametrize('name', ['categorical_crossentropy', 'categorical_hinge'])
def test_jit_losses_equal_keras(name):
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (64, 7)).astype(np.float32)
  labels = rng.integers(0, 7, 64)
  one_hot = np.eye(7, dtype=np.float32)[labels]
  probs = keras.ops.softmax(logits)
  expected = np.asarray(getattr(keras.losses, name)(one_hot, probs))
  got = jax.jit(optim.get_loss(name))(jnp.asarray(logits), jnp.asarray(labels))
  # float32 softmax computed by two libraries: 1e-5 relative. Keras's
  # clipping at 1e-7 does not bite for these logits (|z| < 15).
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_bad_optimizer_configs():
  with pytest.raises(ValueError, match='Unknown optimizer'):
    optim.create_optimizer({'name': 'adagrad', 'learning_rate': 1.0})
  with pytest.raises(ValueError, match="Unknown field\\(s\\) \\['momentum'\\]"):
    optim.create_optimizer({'name': 'adam', 'learning_rate': 1.0, 'momentum': 0.9})
  with pytest.raises(ValueError, match='Unknown schedule'):
    optim.create_optimizer({'name': 'adam', 'learning_rate': 1.0, 'schedule': 'poly'})
  with pytest.raises(ValueError, match='learning_rate must be a positive number'):
    optim.create_optimizer({'name': 'sgd', 'learning_rate': 0})
  with pytest.raises(ValueError, match='Unknown loss'):
    optim.get_loss('mse')


def test_jit_cosine_and_step_schedules_equal_their_formulas():
  steps_per_epoch, num_epochs, lr = 10, 5, 0.1
  cosine = optim.create_schedule({'learning_rate': lr, 'schedule': 'cosine'},
                                 steps_per_epoch, num_epochs)
  step = optim.create_schedule({'learning_rate': lr, 'schedule': 'step', 'step_epochs': 2,
                                'step_factor': 0.5}, steps_per_epoch, num_epochs)
  counts = np.arange(0, 50)
  np.testing.assert_allclose(jax.jit(jax.vmap(cosine))(counts),
                             0.5 * lr * (1 + np.cos(np.pi * counts / 50)), rtol=1e-5,
                             atol=1e-8)
  np.testing.assert_allclose(jax.jit(jax.vmap(step))(counts),
                             lr * 0.5 ** (counts // 20), rtol=1e-6)
  warm = optim.create_schedule({'learning_rate': lr, 'schedule': 'cosine',
                                'warmup_epochs': 1}, steps_per_epoch, num_epochs)
  np.testing.assert_allclose([warm(0), warm(5), warm(10)], [0.0, 0.05, 0.1], rtol=1e-6)
