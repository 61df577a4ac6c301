"""Optimizers (optax chains) and losses, built from the config."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def categorical_crossentropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example cross-entropy of integer labels, from logits (log-softmax)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


LOSSES: dict[str, LossFn] = {
    'categorical_crossentropy': categorical_crossentropy,
}


def get_loss(name: str) -> LossFn:
  if name not in LOSSES:
    raise ValueError(f'Unknown loss {name!r} in config.loss; valid losses: '
                     f'{sorted(LOSSES)}')
  return LOSSES[name]


def _adam(learning_rate: float, beta_1: float = 0.9, beta_2: float = 0.999,
          epsilon: float = 1e-7) -> optax.GradientTransformation:
  # Keras's defaults (epsilon 1e-7, not optax's 1e-8).
  return optax.adam(learning_rate, b1=beta_1, b2=beta_2, eps=epsilon)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    'adam': _adam,
}


def create_optimizer(optimizer_config: Mapping[str, Any]) -> optax.GradientTransformation:
  """The optax chain named by `config.optimizer.name`, with its other fields."""
  fields = dict(optimizer_config)
  name = fields.pop('name', None)
  if name not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {name!r} in config.optimizer.name; valid '
                     f'names: {sorted(OPTIMIZERS)}')
  learning_rate = fields.get('learning_rate')
  if not isinstance(learning_rate, (int, float)) or learning_rate <= 0:
    raise ValueError('config.optimizer.learning_rate must be a positive number, got '
                     f'{learning_rate!r}')
  valid = set(inspect.signature(OPTIMIZERS[name]).parameters)
  unknown = sorted(set(fields) - valid)
  if unknown:
    raise ValueError(f'Unknown field(s) {unknown} in config.optimizer for {name!r}; '
                     f'valid fields: {sorted(valid)}')
  return OPTIMIZERS[name](**fields)
