"""Optimizers as optax chains that follow Keras's update formulas, and losses.

Each optimizer is one `optax.named_chain` of four elements:

  direction      the optimizer's learning-rate-free step (Adam's bias-corrected
                 m / (sqrt(v) + eps), RMSprop's g / sqrt(v + eps), SGD's g)
  plateau        Keras ReduceLROnPlateau at epoch granularity, fed the training
                 loss (`update(..., value=loss)`), as a scale
  learning_rate  the schedule (constant, Keras time-based decay, cosine, step)
  momentum       Keras's momentum buffer m = mu * m - lr * step, where the
                 optimizer has one (SGD, RMSprop with momentum)

Keras multiplies the learning rate in *before* accumulating momentum, so a
reduced rate leaves the earlier, larger steps in the buffer; keeping the
plateau scale and the rate ahead of the momentum element reproduces that.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
SCHEDULES = ('constant', 'inverse_time', 'cosine', 'step')


# ---------------------------------------------------------------------------
# Losses: per example, integer labels, from logits.

def categorical_crossentropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Keras categorical cross-entropy of softmax(logits), via a stable log-softmax.

  Keras clips probabilities to [1e-7, 1 - 1e-7]; that only matters for
  probabilities the log-softmax represents more accurately anyway.
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def categorical_hinge(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Keras categorical hinge on the softmax output (as the report used it).

  pos = sum(y * p), neg = max((1 - y) * p), loss = max(0, neg - pos + 1).
  """
  probs = jax.nn.softmax(logits)
  one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=probs.dtype)
  positive = jnp.sum(one_hot * probs, axis=-1)
  negative = jnp.max((1.0 - one_hot) * probs, axis=-1)
  return jnp.maximum(0.0, negative - positive + 1.0)


LOSSES: dict[str, LossFn] = {
    'categorical_crossentropy': categorical_crossentropy,
    'categorical_hinge': categorical_hinge,
}


def get_loss(name: str) -> LossFn:
  if name not in LOSSES:
    raise ValueError(f'Unknown loss {name!r} in config.loss; valid losses: '
                     f'{sorted(LOSSES)}')
  return LOSSES[name]


# ---------------------------------------------------------------------------
# Directions (learning-rate free).

class AdamState(NamedTuple):
  count: jax.Array
  m: Any
  v: Any


def keras_adam_direction(beta_1: float, beta_2: float,
                         epsilon: float) -> optax.GradientTransformation:
  """Keras Adam without the rate: sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps).

  Keras folds the bias correction into the rate and adds eps to the
  uncorrected sqrt(v); optax.adam adds it to the corrected one.
  """
  def init(params):
    # Two separate trees: a donated state must not hold one buffer twice.
    return AdamState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params),
                     jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    count = state.count + 1
    m = jax.tree.map(lambda m, g: m + (g - m) * (1 - beta_1), state.m, updates)
    v = jax.tree.map(lambda v, g: v + (g * g - v) * (1 - beta_2), state.v, updates)
    t = count.astype(jnp.float32)
    correction = jnp.sqrt(1 - beta_2**t) / (1 - beta_1**t)
    direction = jax.tree.map(lambda m, v: correction * m / (jnp.sqrt(v) + epsilon), m, v)
    return direction, AdamState(count, m, v)

  return optax.GradientTransformation(init, update)


class RMSpropState(NamedTuple):
  velocity: Any


def keras_rmsprop_direction(rho: float, epsilon: float) -> optax.GradientTransformation:
  """Keras RMSprop without the rate: g / sqrt(v + eps) (eps inside the root)."""
  def init(params):
    return RMSpropState(jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    velocity = jax.tree.map(lambda v, g: rho * v + (1 - rho) * g * g,
                            state.velocity, updates)
    direction = jax.tree.map(lambda g, v: g / jnp.sqrt(v + epsilon), updates, velocity)
    return direction, RMSpropState(velocity)

  return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------------------
# Plateau, rate, momentum.

class PlateauState(NamedTuple):
  scale: jax.Array            # multiplies the learning rate
  best: jax.Array             # best epoch loss so far (inf before the first)
  wait: jax.Array             # epochs without improvement
  cooldown_counter: jax.Array
  loss_sum: jax.Array         # the current epoch's losses so far
  steps_in_epoch: jax.Array


def keras_reduce_on_plateau(steps_per_epoch: int, factor: float = 0.5,
                            patience: int = 50, min_delta: float = 1e-4,
                            cooldown: int = 0, min_scale: float = 0.0
                            ) -> optax.GradientTransformationExtraArgs:
  """Keras ReduceLROnPlateau on the epoch's mean training loss, as a scale.

  Call `update(..., value=loss)` every step. After the epoch's last step the
  mean loss goes through Keras's rule: an improvement is a mean below
  best - min_delta; after `patience` epochs without one the scale is
  multiplied by `factor` (not below `min_scale`, Keras's min_lr over the base
  rate) and `cooldown` epochs follow in which waiting does not count. The new
  scale applies from the next epoch's first step, as a Keras callback's does.
  """
  def init(params):
    del params
    return PlateauState(scale=jnp.ones([], jnp.float32),
                        best=jnp.full([], jnp.inf, jnp.float32),
                        wait=jnp.zeros([], jnp.int32),
                        cooldown_counter=jnp.zeros([], jnp.int32),
                        loss_sum=jnp.zeros([], jnp.float32),
                        steps_in_epoch=jnp.zeros([], jnp.int32))

  def end_of_epoch(state: PlateauState, current: jax.Array) -> PlateauState:
    in_cooldown = state.cooldown_counter > 0
    cooldown_counter = jnp.where(in_cooldown, state.cooldown_counter - 1,
                                 state.cooldown_counter)
    wait = jnp.where(in_cooldown, 0, state.wait)
    improved = current < state.best - min_delta
    best = jnp.where(improved, current, state.best)
    still_cooling = cooldown_counter > 0
    wait = jnp.where(improved, 0, jnp.where(still_cooling, wait, wait + 1))
    reduce = (~improved) & (~still_cooling) & (wait >= patience) & (state.scale > min_scale)
    scale = jnp.where(reduce, jnp.maximum(state.scale * factor, min_scale), state.scale)
    return PlateauState(
        scale=scale, best=best, wait=jnp.where(reduce, 0, wait),
        cooldown_counter=jnp.where(reduce, cooldown, cooldown_counter),
        loss_sum=jnp.zeros([], jnp.float32), steps_in_epoch=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, *, value, **extra_args):
    del params, extra_args
    updates = jax.tree.map(lambda u: u * state.scale, updates)
    state = state._replace(loss_sum=state.loss_sum + value.astype(jnp.float32),
                           steps_in_epoch=state.steps_in_epoch + 1)
    epoch_done = state.steps_in_epoch >= steps_per_epoch
    decided = end_of_epoch(state, state.loss_sum / steps_per_epoch)
    state = jax.tree.map(lambda a, b: jnp.where(epoch_done, a, b), decided, state)
    return updates, state

  return optax.GradientTransformationExtraArgs(init, update)


class LearningRateState(NamedTuple):
  count: jax.Array  # updates already done (Keras's `iterations`)


def scale_by_learning_rate(schedule: optax.Schedule, sign: float
                           ) -> optax.GradientTransformation:
  def init(params):
    del params
    return LearningRateState(jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    rate = sign * schedule(state.count)
    return (jax.tree.map(lambda u: rate * u, updates),
            LearningRateState(state.count + 1))

  return optax.GradientTransformation(init, update)


class MomentumState(NamedTuple):
  momentum: Any


def keras_momentum(momentum: float, nesterov: bool = False
                   ) -> optax.GradientTransformation:
  """m = mu * m - step; the update is m (or mu * m - step with Nesterov).

  Receives lr * step already, so the buffer keeps the rates it was fed.
  """
  def init(params):
    return MomentumState(jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    m = jax.tree.map(lambda m, s: momentum * m - s, state.momentum, updates)
    if nesterov:
      out = jax.tree.map(lambda m, s: momentum * m - s, m, updates)
    else:
      out = m
    return out, MomentumState(m)

  return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------------------
# Building from the config.

def _adam(beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7):
  return keras_adam_direction(beta_1, beta_2, epsilon), None


def _sgd(momentum: float = 0.0, nesterov: bool = False):
  return optax.identity(), (keras_momentum(momentum, nesterov) if momentum else None)


def _rmsprop(rho: float = 0.9, momentum: float = 0.0, epsilon: float = 1e-7):
  return (keras_rmsprop_direction(rho, epsilon),
          keras_momentum(momentum) if momentum else None)


OPTIMIZERS = {'adam': _adam, 'sgd': _sgd, 'rmsprop': _rmsprop}
_SCHEDULE_FIELDS = ('name', 'learning_rate', 'schedule', 'decay', 'warmup_epochs',
                    'step_epochs', 'step_factor', 'plateau')


def create_schedule(optimizer_config: Mapping[str, Any], steps_per_epoch: int,
                    num_epochs: int) -> optax.Schedule:
  """The rate at update count t (Keras's `iterations`), before the plateau."""
  learning_rate = optimizer_config['learning_rate']
  name = optimizer_config.get('schedule', 'constant')
  if name == 'constant':
    return optax.constant_schedule(learning_rate)
  if name == 'inverse_time':
    # Keras 2's `decay` argument: lr / (1 + decay * t).
    decay = optimizer_config.get('decay', 0.0)
    return lambda count: learning_rate / (1.0 + decay * count)
  if name == 'cosine':
    total = steps_per_epoch * num_epochs
    warmup = steps_per_epoch * optimizer_config.get('warmup_epochs', 0)
    if warmup:
      return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, total)
    return optax.cosine_decay_schedule(learning_rate, total)
  if name == 'step':
    step_epochs = optimizer_config.get('step_epochs', 30)
    factor = optimizer_config.get('step_factor', 0.1)
    return lambda count: learning_rate * factor ** (count // (steps_per_epoch * step_epochs))
  raise ValueError(f'Unknown schedule {name!r} in config.optimizer.schedule; valid '
                   f'schedules: {list(SCHEDULES)}')


class FreezeState(NamedTuple):
  count: jax.Array  # updates so far
  masked: optax.MaskedState


def freeze(steps: int, frozen: Callable[[Any], Any]) -> optax.GradientTransformation:
  """Zeroes the gradients of the `frozen(params)` parameters for `steps` updates.

  big_vision's freezing (`optax.masked(optax.set_to_zero(), mask)`), gated
  by the update count: first in the chain, so that the optimizer after it
  sees zero gradients there (its moments decay, its step count runs on).
  `frozen` maps the parameters to a tree (or prefix) of booleans.
  """
  zero = optax.masked(optax.set_to_zero(), frozen)

  def init(params):
    return FreezeState(count=jnp.zeros([], jnp.int32), masked=zero.init(params))

  def update(updates, state, params=None):
    zeroed, masked = zero.update(updates, state.masked, params)
    still_frozen = state.count < steps
    updates = jax.tree.map(lambda z, u: jnp.where(still_frozen, z, u), zeroed, updates)
    return updates, FreezeState(count=optax.safe_increment(state.count), masked=masked)

  return optax.GradientTransformation(init, update)


def check_optimizer_config(optimizer_config: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first bad field of `config.optimizer`."""
  fields = dict(optimizer_config)
  name = fields.get('name')
  if name not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {name!r} in config.optimizer.name; valid '
                     f'names: {sorted(OPTIMIZERS)}')
  learning_rate = fields.get('learning_rate')
  if (not isinstance(learning_rate, (int, float)) or isinstance(learning_rate, bool)
      or learning_rate <= 0):
    raise ValueError('config.optimizer.learning_rate must be a positive number, got '
                     f'{learning_rate!r}')
  own = {k: v for k, v in fields.items() if k not in _SCHEDULE_FIELDS}
  valid = set(inspect.signature(OPTIMIZERS[name]).parameters)
  unknown = sorted(set(own) - valid)
  if unknown:
    raise ValueError(f'Unknown field(s) {unknown} in config.optimizer for {name!r}; '
                     f'valid fields: {sorted(valid | set(_SCHEDULE_FIELDS))}')
  if fields.get('schedule', 'constant') not in SCHEDULES:
    raise ValueError(f'Unknown schedule {fields["schedule"]!r} in '
                     f'config.optimizer.schedule; valid schedules: {list(SCHEDULES)}')


def create_optimizer(optimizer_config: Mapping[str, Any], steps_per_epoch: int = 1,
                     num_epochs: int = 1, frozen_steps: int = 0,
                     frozen: Callable[[Any], Any] | None = None
                     ) -> optax.GradientTransformationExtraArgs:
  """The optax chain of `config.optimizer` (see the module docstring).

  Its `update` takes `value=` (the step's training loss) for the plateau.
  With `frozen_steps`, the `frozen(params)` parameters get no gradient in
  the first `frozen_steps` updates (`freeze`).
  """
  check_optimizer_config(optimizer_config)
  if frozen_steps and frozen is None:
    raise ValueError('frozen_steps needs `frozen`, the parameters to freeze')
  fields = dict(optimizer_config)
  name, learning_rate = fields['name'], fields['learning_rate']
  own = {k: v for k, v in fields.items() if k not in _SCHEDULE_FIELDS}
  direction, momentum = OPTIMIZERS[name](**own)
  schedule = create_schedule(fields, steps_per_epoch, num_epochs)
  plateau_config = dict(fields.get('plateau') or {})
  if plateau_config.pop('enabled', False):
    min_lr = plateau_config.pop('min_lr', 0.0)
    plateau = keras_reduce_on_plateau(steps_per_epoch, min_scale=min_lr / learning_rate,
                                      **plateau_config)
  else:
    plateau = keras_reduce_on_plateau(steps_per_epoch, factor=1.0, patience=2**30)
  # Without momentum the rate's sign makes the update a descent step; with
  # it, the momentum element subtracts.
  elements = [('freeze', freeze(frozen_steps, frozen))] if frozen_steps else []
  elements += [('direction', direction), ('plateau', plateau),
              ('learning_rate', scale_by_learning_rate(schedule, 1.0 if momentum else -1.0))]
  if momentum is not None:
    elements.append(('momentum', momentum))
  return optax.named_chain(*elements)


def current_learning_rate(opt_state: Mapping[str, Any], optimizer_config: Mapping[str, Any],
                          steps_per_epoch: int, num_epochs: int) -> jax.Array:
  """The rate the next update will use: schedule(count) * plateau scale."""
  schedule = create_schedule(optimizer_config, steps_per_epoch, num_epochs)
  return schedule(opt_state['learning_rate'].count) * opt_state['plateau'].scale

