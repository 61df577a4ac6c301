"""Training and evaluation: pure jitted steps and the epoch loop.

(No `from __future__ import annotations` here: clu reads the `Metrics` field
annotations as classes.)
"""


import functools
import time
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from clu import metrics
from flax.training import train_state

from et_flax import augment
from et_flax import input_pipeline
from et_flax import models
from et_flax import optim

TOP_K = 5


class TrainState(train_state.TrainState):
  batch_stats: Any


@flax.struct.dataclass
class Metrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  top1_accuracy: metrics.Average.from_output('top1_accuracy')
  top5_accuracy: metrics.Average.from_output('top5_accuracy')


def preprocess(images: jax.Array) -> jax.Array:
  """0-255 images (uint8, or float after augmentation) to float32 in [0, 1].

  Keras's `rescale=1/255`, applied after the augmentations as Keras does.
  """
  return images.astype(jnp.float32) / 255.0


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k largest logits (k capped at the classes)."""
  _, indices = jax.lax.top_k(logits, min(k, logits.shape[-1]))
  return jnp.any(indices == labels[:, None], axis=-1).astype(jnp.float32)


def classification_outputs(logits: jax.Array, labels: jax.Array,
                           loss_fn: optim.LossFn) -> dict[str, jax.Array]:
  """Per-example loss, top-1 and top-5 correctness."""
  return {
      'loss': loss_fn(logits, labels),
      'top1_accuracy': top_k_correct(logits, labels, 1),
      'top5_accuracy': top_k_correct(logits, labels, TOP_K),
  }


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
               *, loss_fn: optim.LossFn,
               augment_config: augment.AugmentConfig = augment.AugmentConfig(),
               ) -> tuple[TrainState, Metrics]:
  """One optimizer step on `batch`, augmented on device first.

  Augmentation and dropout are keyed by (rng, step), so a resumed run draws
  the same randomness as an uninterrupted one.
  """
  augment_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, state.step))
  images = augment.augment_batch(augment_rng, batch['image'].astype(jnp.float32),
                                 augment_config)
  images, labels = preprocess(images), batch['label']

  def loss_of(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
    outputs = classification_outputs(logits, labels, loss_fn)
    return outputs['loss'].mean(), (outputs, updates)

  grads, (outputs, updates) = jax.grad(loss_of, has_aux=True)(state.params)
  state = state.apply_gradients(
      grads=grads, batch_stats=updates.get('batch_stats', state.batch_stats))
  return state, Metrics.single_from_model_output(**outputs)


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *,
              loss_fn: optim.LossFn) -> Metrics:
  """Metrics of `batch` in inference mode; padded examples (mask 0) ignored."""
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                          preprocess(batch['image']), train=False)
  outputs = classification_outputs(logits, batch['label'], loss_fn)
  return Metrics.single_from_model_output(mask=batch['mask'], **outputs)


def create_train_state(rng: jax.Array, model: flax.linen.Module, image_size: int,
                       tx: optax.GradientTransformation) -> TrainState:
  variables = jax.jit(functools.partial(model.init, train=False))(
      rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32))
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables.get('batch_stats', {}), tx=tx)


def _check_run_fields(config: ml_collections.ConfigDict) -> None:
  for field in ('batch_size', 'num_epochs', 'eval_batch_size'):
    value = config.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f'config.{field} must be a positive integer, got {value!r}')


def evaluate(state: TrainState, split: input_pipeline.Split, batch_size: int,
             eval_step_fn) -> dict[str, float]:
  """Mean loss, top-1 and top-5 over every image of `split`."""
  total = None
  for batch in input_pipeline.eval_batches(split, batch_size):
    batch_metrics = eval_step_fn(state, batch)
    total = batch_metrics if total is None else total.merge(batch_metrics)
  return {k: float(v) for k, v in total.compute().items()}


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, float]:
  """Trains `config.model` on `config.data`, evaluating on val every epoch.

  Every part of the config is checked before any image is decoded or any
  step taken. Returns the last epoch's metrics (`train_*` and `val_*`).
  """
  _check_run_fields(config)
  info = input_pipeline.get_dataset_info(config.data)
  model = models.create_model(config.model, info.num_classes, info.image_size)
  loss_fn = optim.get_loss(config.loss)
  tx = optim.create_optimizer(config.optimizer)
  augment_config = augment.config_from(config.augment)
  input_pipeline.save_class_mapping(info, workdir)

  logging.info('Decoding %s at %dx%d', info.builder.data_dir, info.image_size,
               info.image_size)
  train_split = input_pipeline.load_split(info, 'train')
  val_split = input_pipeline.load_split(info, 'val')
  train_input = input_pipeline.TrainInput(
      train_split, config.batch_size, config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  logging.info('%d train and %d val images, %d classes, %d steps per epoch',
               len(train_split), len(val_split), info.num_classes,
               train_input.steps_per_epoch)

  rng = jax.random.key(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  state = create_train_state(init_rng, model, info.image_size, tx)
  logging.info('Model %s: %d parameters in %d weighted layers', config.model.name,
               models.count_params(state.params),
               len(models.weighted_layers(state.params)))

  train_step_fn = jax.jit(functools.partial(train_step, loss_fn=loss_fn,
                                            augment_config=augment_config),
                          donate_argnums=(0,))
  eval_step_fn = jax.jit(functools.partial(eval_step, loss_fn=loss_fn))
  # TensorBoard events from the first host; the console line is logged below.
  writer = (metric_writers.SummaryWriter(workdir) if jax.process_index() == 0
            else metric_writers.MultiWriter([]))

  summary: dict[str, float] = {}
  for epoch in range(1, config.num_epochs + 1):
    start = time.perf_counter()
    train_metrics = None
    for batch in train_input.epoch(epoch):
      state, step_metrics = train_step_fn(state, batch, dropout_rng)
      train_metrics = (step_metrics if train_metrics is None
                       else train_metrics.merge(step_metrics))
    train_summary = {k: float(v) for k, v in train_metrics.compute().items()}
    train_seconds = time.perf_counter() - start
    if not np.isfinite(train_summary['loss']):
      raise FloatingPointError(
          f'Training loss is {train_summary["loss"]} in epoch {epoch}: stopping '
          '(lower optimizer.learning_rate or check the data)')
    val_summary = evaluate(state, val_split, config.eval_batch_size, eval_step_fn)
    summary = {**{f'train_{k}': v for k, v in train_summary.items()},
               **{f'val_{k}': v for k, v in val_summary.items()},
               'epoch_seconds': time.perf_counter() - start,
               'train_images_per_second': (train_input.steps_per_epoch
                                           * config.batch_size / train_seconds)}
    writer.write_scalars(epoch, summary)
    logging.info(
        'epoch %d/%d: train loss %.4f top1 %.4f | val loss %.4f top1 %.4f '
        'top5 %.4f | %.1f s, %.0f img/s', epoch, config.num_epochs,
        summary['train_loss'], summary['train_top1_accuracy'], summary['val_loss'],
        summary['val_top1_accuracy'], summary['val_top5_accuracy'],
        summary['epoch_seconds'], summary['train_images_per_second'])
  writer.flush()
  return summary
