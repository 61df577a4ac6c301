"""Training and evaluation: pure jitted steps and the resumable epoch loop.

(No `from __future__ import annotations` here: clu reads the `Metrics` field
annotations as classes.)
"""

import contextlib
import functools
import itertools
import json
import os
import pathlib
import signal
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
from clu import periodic_actions
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from et_flax import augment
from et_flax import checkpoints
from et_flax import console
from et_flax import distributed
from et_flax import input_pipeline
from et_flax import interrupts
from et_flax import keras_import
from et_flax import models
from et_flax import onednn
from et_flax import optim
from et_flax import workdir_lock

TOP_K = 5
HISTORY_FILE = 'history.jsonl'


class TrainState(train_state.TrainState):
  batch_stats: Any


@flax.struct.dataclass
class Metrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  top1_accuracy: metrics.Average.from_output('top1_accuracy')
  top5_accuracy: metrics.Average.from_output('top5_accuracy')


PREPROCESSING = ('rescale', 'caffe')
# Keras's `preprocess_input(mode='caffe')` (VGG16, ResNet50): BGR means.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


def preprocess(images: jax.Array, mode: str = 'rescale') -> jax.Array:
  """0-255 RGB images (uint8, or float after augmentation) to model inputs.

  'rescale': Keras's `rescale=1/255`, after the augmentations as in Keras.
  'caffe': Keras Applications' ImageNet preprocessing for VGG16 and ResNet50
  (RGB to BGR, ImageNet mean subtracted, no scaling), for pretrained weights.
  """
  images = images.astype(jnp.float32)
  if mode == 'rescale':
    return images / 255.0
  if mode == 'caffe':
    return images[..., ::-1] - jnp.asarray(CAFFE_BGR_MEAN, jnp.float32)
  raise ValueError(f'Unknown preprocessing {mode!r}; valid: {list(PREPROCESSING)}')


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


def _metrics(outputs: Mapping[str, jax.Array], axis_name: str | None,
             mask: jax.Array | None = None) -> Metrics:
  if axis_name is None:
    return Metrics.single_from_model_output(mask=mask, **outputs)
  return Metrics.gather_from_model_output(axis_name=axis_name, mask=mask, **outputs)


def _after(x: jax.Array, tree: Any) -> jax.Array:
  """`x`, made to depend on every leaf of `tree` (exactly: x + 0).

  Orders the micro-batches: each part's forward pass waits for the previous
  part's gradients, so only one part's activations are alive at a time
  (XLA:CPU hoists every forward pass otherwise, and drops
  `lax.optimization_barrier`). min(|s|, 0) is 0 for every finite or infinite
  s; a NaN gradient makes the later parts NaN, as the loss already is.
  """
  s = sum(jnp.ravel(leaf)[0] for leaf in jax.tree.leaves(tree))
  return x + jnp.minimum(jnp.abs(s), 0.0).astype(x.dtype)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
               *, loss_fn: optim.LossFn,
               augment_config: augment.AugmentConfig = augment.AugmentConfig(),
               preprocessing: str = 'rescale', frozen_steps: int = 0,
               micro_batches: int = 1,
               axis_name: str | None = None) -> tuple[TrainState, Metrics]:
  """One optimizer step on `batch`, augmented on device first.

  Augmentation and dropout are keyed by (rng, step), so a resumed run draws
  the same randomness as an uninterrupted one. Under `jax.jit` with a
  sharded batch the step is data parallel as it stands; under `jax.pmap`,
  pass `axis_name` and the gradients, loss and batch statistics are averaged
  over it (each device then draws its own augmentation and dropout, and batch
  norm normalises with each device's own batch, as in flax's examples).
  For the first `frozen_steps` steps only the classifier head learns (the
  backbone's gradients are zeroed; its batch statistics still adapt). With
  `micro_batches` > 1 the gradient is accumulated over that many equal parts
  of the batch (the same update, summed in another order; batch norm then
  sees the parts one after another, and dropout draws a key per part).
  """
  rng = jax.random.fold_in(rng, state.step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  augment_rng, dropout_rng = jax.random.split(rng)
  images = augment.augment_batch(augment_rng, batch['image'].astype(jnp.float32),
                                 augment_config)
  images, labels = preprocess(images, preprocessing), batch['label']

  def loss_of(params, images, labels, batch_stats, dropout_rng):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': batch_stats}, images, train=True,
        rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
    outputs = classification_outputs(logits, labels, loss_fn)
    return outputs['loss'].mean(), (outputs, updates.get('batch_stats', batch_stats))

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)
  if micro_batches == 1:
    (loss, (outputs, batch_stats)), grads = grad_fn(
        state.params, images, labels, state.batch_stats, dropout_rng)
  else:
    # The mean gradient of equal micro-batches is the batch's gradient; XLA:CPU
    # runs small batches much faster per image (docs/performance.md).
    def accumulate(carry, micro):
      grads_sum, batch_stats = carry
      micro_images, micro_labels, index = micro
      micro_images = _after(micro_images, grads_sum)
      (loss, (outputs, batch_stats)), grads = grad_fn(
          state.params, micro_images, micro_labels, batch_stats,
          jax.random.fold_in(dropout_rng, index))
      return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), (loss, outputs)

    def split(x):
      return x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:])

    (grads, batch_stats), (losses, outputs) = jax.lax.scan(
        accumulate, (jax.tree.map(jnp.zeros_like, state.params), state.batch_stats),
        (split(images), split(labels), jnp.arange(micro_batches)), unroll=True)
    grads = jax.tree.map(lambda g: g / micro_batches, grads)
    loss = losses.mean()
    outputs = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), outputs)
  if frozen_steps:
    trainable = (state.step >= frozen_steps).astype(jnp.float32)
    grads = {name: grads[name] if name in models.HEAD_NAMES else
             jax.tree.map(lambda g: g * trainable, grads[name]) for name in grads}
  if axis_name is not None:
    grads, loss, batch_stats = jax.lax.pmean((grads, loss, batch_stats), axis_name)
  # The plateau element of the chain is fed the training loss.
  param_updates, opt_state = state.tx.update(grads, state.opt_state, state.params,
                                             value=loss)
  state = state.replace(step=state.step + 1,
                        params=optax.apply_updates(state.params, param_updates),
                        opt_state=opt_state, batch_stats=batch_stats)
  return state, _metrics(outputs, axis_name)


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *,
              loss_fn: optim.LossFn, preprocessing: str = 'rescale',
              axis_name: str | None = None) -> Metrics:
  """Metrics of `batch` in inference mode; padded examples (mask 0) ignored."""
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                          preprocess(batch['image'], preprocessing), train=False)
  outputs = classification_outputs(logits, batch['label'], loss_fn)
  return _metrics(outputs, axis_name, mask=batch['mask'])


def init_variables(rng: jax.Array, model: flax.linen.Module,
                   image_size: int) -> dict[str, Any]:
  return jax.jit(functools.partial(model.init, train=False))(
      rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32))


def create_train_state(rng: jax.Array, model: flax.linen.Module, image_size: int,
                       tx: optax.GradientTransformation,
                       variables: Mapping[str, Any] | None = None) -> TrainState:
  """A fresh state; `variables` (e.g. imported weights) replace the init."""
  if variables is None:
    variables = init_variables(rng, model, image_size)
  state = TrainState.create(apply_fn=model.apply, params=variables['params'],
                            batch_stats=variables.get('batch_stats', {}), tx=tx)
  # An int32 array from the start, as every step returns it: no retrace.
  return state.replace(step=jnp.zeros([], jnp.int32))


# ---------------------------------------------------------------------------
# Devices.

def make_mesh() -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over every device of every host."""
  # Auto axes: XLA propagates the batch sharding through the step, which then
  # reads exactly as on one device.
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                batch_size: int | None = None) -> dict[str, jax.Array]:
  """This host's rows of a batch of `batch_size` -> global arrays split over 'data'.

  `batch_size` (the global batch) may be left out on a single host.
  """
  sharding = NamedSharding(mesh, P('data'))
  return {k: jax.make_array_from_process_local_data(
              sharding, v, None if batch_size is None else (batch_size, *v.shape[1:]))
          for k, v in batch.items() if k != 'file_name'}


def batch_rows(mesh: jax.sharding.Mesh, batch_size: int) -> slice:
  """The rows of each global batch that this host feeds."""
  return distributed.host_rows(NamedSharding(mesh, P('data')), batch_size)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  return jax.device_put(tree, NamedSharding(mesh, P()))


# ---------------------------------------------------------------------------
# The loop.

# Per image, CPUs train fastest on parts of the batch whose activations stay
# in cache (docs/performance.md has the sweeps): 'auto' picks the largest part
# whose widest activation tensor fits this budget, but no fewer images than
# the floor (smaller parts only add per-call overhead and compile time).
AUTO_CPU_MICRO_BUDGET = {'onednn': (1 << 20, 4), 'xla': (2 << 20, 8)}  # bytes, images


def _micro_setting(config: ml_collections.ConfigDict) -> Any:
  # The default config holds a string ('auto'), so a command-line override
  # arrives as one too: '16' means 16.
  micro = config.get('micro_batch_size', 0)
  return int(micro) if isinstance(micro, str) and micro.isdigit() else micro


def _activation_bytes_per_image(config: ml_collections.ConfigDict) -> int:
  """Float32 bytes of the model's widest activation tensor, per image."""
  channels = 64 if config.model.name == 'vgg16' else 16 * config.model.get('width', 1)
  return config.data.image_size ** 2 * channels * 4


def micro_batch_size(config: ml_collections.ConfigDict, backend: str | None = None) -> int:
  """config.micro_batch_size, with 'auto' resolved (0: whole batches).

  'auto', on CPUs and for models without batch norm (where the parts give the
  very same update): the largest divisor of the batch whose activations fit
  AUTO_CPU_MICRO_BUDGET, at least its floor; 4 images for plain E.T. at
  64x64 with the oneDNN convolutions, 8 with XLA's, whole batches at 16x16.
  Elsewhere whole batches. `backend` (default: JAX's) is the platform the
  step will run on.
  """
  micro = _micro_setting(config)
  if micro != 'auto':
    return micro
  backend = backend or jax.default_backend()
  has_batch_norm = config.model.name == 'resnet50' or config.model.get('batch_norm', False)
  if backend != 'cpu' or has_batch_norm:
    return 0
  budget, floor = AUTO_CPU_MICRO_BUDGET[conv_impl(config, backend)]
  per_image = _activation_bytes_per_image(config)
  batch = config.batch_size
  fitting = [d for d in range(1, batch + 1) if batch % d == 0 and d * per_image <= budget]
  size = max(fitting[-1] if fitting else 1, min(floor, batch))
  while batch % size:  # the floor must divide the batch too
    size += 1
  return 0 if size >= batch else size


def check_micro_batch_size(config: ml_collections.ConfigDict) -> None:
  micro = _micro_setting(config)
  if micro != 'auto' and (not isinstance(micro, int) or micro < 0
                          or (micro and config.batch_size % micro)):
    raise ValueError("config.micro_batch_size must be 'auto', 0 (whole batches) or "
                     f'divide config.batch_size={config.batch_size}, got {micro!r}')


def micro_batches(config: ml_collections.ConfigDict, backend: str | None = None) -> int:
  micro = micro_batch_size(config, backend)
  return config.batch_size // micro if micro else 1


COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str, backend: str | None = None) -> Any:
  """'auto' is bfloat16 on GPUs and TPUs, float32 on CPUs."""
  if name == 'auto':
    name = 'float32' if (backend or jax.default_backend()) == 'cpu' else 'bfloat16'
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'config.compute_dtype must be one of '
                     f'{["auto", *COMPUTE_DTYPES]}, got {name!r}')
  return COMPUTE_DTYPES[name]


CONV_IMPLS = ('auto', *models.CONV_IMPLS)


def conv_impl(config: ml_collections.ConfigDict, backend: str | None = None) -> str:
  """config.conv_impl with 'auto' resolved to 'onednn' or 'xla'.

  'auto' is 'onednn' when the step computes in float32 on a single CPU device
  of a Linux x86-64 machine (where the oneDNN wheels install with et_flax)
  and the oneDNN convolution builds there (`onednn.available`: tried once per
  process, a warning saying why when not), 'xla' everywhere else (GPUs, TPUs,
  several devices, bfloat16, no C++ compiler).
  """
  name = config.get('conv_impl', 'xla')
  if name not in CONV_IMPLS:
    raise ValueError(f'config.conv_impl must be one of {list(CONV_IMPLS)}, got {name!r}')
  backend = backend or jax.default_backend()
  on_cpu = backend == 'cpu'
  if name == 'auto':
    use = (on_cpu and jax.device_count() == 1 and onednn.platform_supported()
           and compute_dtype(config.get('compute_dtype', 'float32'), backend) == jnp.float32
           and onednn.available()[0])
    name = 'onednn' if use else 'xla'
  elif name == 'onednn' and not on_cpu:
    raise ValueError("config.conv_impl='onednn' runs on CPUs only, but JAX's backend is "
                     f"{backend!r}; use 'auto' or 'xla'")
  return name


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                image_size: int | None = None, backend: str | None = None
                ) -> flax.linen.Module:
  """`config.model` with the run's compute dtype and convolution implementation.

  `backend` (default: JAX's) is the platform the model will run on.
  """
  return models.create_model(
      config.model, num_classes, image_size,
      dtype=compute_dtype(config.get('compute_dtype', 'float32'), backend),
      conv_impl=conv_impl(config, backend))


def _check_run_fields(config: ml_collections.ConfigDict) -> None:
  for field in ('batch_size', 'num_epochs', 'eval_batch_size', 'checkpoint_every_epochs',
                'max_to_keep'):
    value = config.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f'config.{field} must be a positive integer, got {value!r}')
  if config.get('preprocessing', 'rescale') not in PREPROCESSING:
    raise ValueError(f'config.preprocessing must be one of {list(PREPROCESSING)}, got '
                     f'{config.preprocessing!r}')
  frozen = config.get('freeze_backbone_epochs', 0)
  if not isinstance(frozen, int) or frozen < 0:
    raise ValueError('config.freeze_backbone_epochs must be an integer >= 0, got '
                     f'{frozen!r}')
  check_micro_batch_size(config)
  if conv_impl(config) == 'onednn':
    onednn.load()  # builds it now, before any data is read, or says why it cannot
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % jax.device_count():
      raise ValueError(f'config.{field}={config[field]} must be divisible by the '
                       f'{jax.device_count()} devices')


def evaluate(state: TrainState, split: input_pipeline.Split, batch_size: int,
             eval_step_fn, mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Mean loss, top-1 and top-5 over every image of `split`.

  With several hosts, each feeds its rows of every batch (`split` holding
  its share, `input_pipeline.eval_share`); the metrics are global.
  """
  total = None
  rows = batch_rows(mesh, batch_size)
  for batch in input_pipeline.eval_batches(split, batch_size, rows):
    batch_metrics = eval_step_fn(state, shard_batch(batch, mesh, batch_size))
    total = batch_metrics if total is None else total.merge(batch_metrics)
  return {k: float(v) for k, v in total.compute().items()}


@contextlib.contextmanager
def hold_workdir(workdir: pathlib.Path):
  """Holds the workdir's run lock (process 0 for all), or raises WorkdirBusyError."""
  lock = workdir_lock.RunLock(workdir)
  error = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except (workdir_lock.WorkdirBusyError, OSError) as caught:
      error = caught
  if jax.process_count() > 1:
    # Every process stops together, with process 0's reason.
    refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if refused and error is None:
      error = workdir_lock.WorkdirBusyError(
          f'{workdir} could not be locked by process 0 (its log says why)')
  if error is not None:
    raise error
  try:
    yield
  finally:
    lock.release()


def _state_dict(state: TrainState, rng: jax.Array) -> dict[str, Any]:
  return {'params': state.params, 'batch_stats': state.batch_stats,
          'opt_state': state.opt_state, 'step': state.step,
          'rng': jax.random.key_data(rng)}


def _metrics_to_json(train_metrics: Metrics | None) -> list[float] | None:
  """An epoch's running metrics, exactly: float32 and int32 values are exact as
  JSON numbers."""
  if train_metrics is None:
    return None
  return [np.asarray(leaf).item() for leaf in jax.tree.leaves(train_metrics)]


def _metrics_from_json(saved: list[float] | None, mesh: jax.sharding.Mesh
                       ) -> Metrics | None:
  if saved is None:
    return None
  template = Metrics.empty()
  leaves = [np.asarray(value, np.asarray(like).dtype)
            for value, like in zip(saved, jax.tree.leaves(template), strict=True)]
  return replicate(jax.tree.unflatten(jax.tree.structure(template), leaves), mesh)


def _write_history(path: pathlib.Path, history: list[dict[str, Any]]) -> None:
  tmp = path.with_suffix('.tmp')
  tmp.write_text(''.join(json.dumps(entry) + '\n' for entry in history))
  os.replace(tmp, path)


def _last_good_checkpoint(workdir: pathlib.Path, epoch: int | None) -> str:
  """Where a run stopped on a non-finite loss resumes from, truthfully."""
  if epoch is None:
    return 'No checkpoint of a finished epoch was written yet'
  return (f'The last good checkpoint, of epoch {epoch}, stays in '
          f'{workdir / checkpoints.LATEST / str(epoch)}')


def finished_run_summary(workdir: pathlib.Path, meta: Mapping[str, Any],
                         num_epochs: int) -> dict[str, float]:
  """Says that a rerun has nothing left to train, and how to go on.

  Returns the last epoch's summary, as a run that trained it would.
  """
  history = meta['history']
  best = max(history, key=lambda entry: entry['val_top1_accuracy'], default=None)
  console.info(
      '%s is complete: %d epochs trained (config.num_epochs=%d)%s. Checkpoints: %s '
      '(latest) and %s (best). To train on, rerun with a larger --config.num_epochs '
      '(e.g. --config.num_epochs=%d).', workdir, meta['epoch'], num_epochs,
      '' if best is None else (f'; best val top-1 {best["val_top1_accuracy"]:.4f} '
                               f'at epoch {best["epoch"]}'),
      workdir / checkpoints.LATEST, workdir / checkpoints.BEST, 2 * meta['epoch'])
  return history[-1] if history else {}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False) -> dict[str, float]:
  """Trains `config.model` on `config.data`, evaluating on val every epoch.

  A workdir with checkpoints resumes from the latest: the same batches,
  randomness, optimizer and plateau state and history as an uninterrupted
  run, on any number of devices and hosts. A config that differs from the
  saved one in anything but run length, logging or data location is refused
  unless `allow_config_change`. Every part of the config is checked before
  any image is decoded or any step taken. The run holds the workdir's lock
  throughout: a second run there is refused at once. Returns the last
  epoch's metrics.
  """
  _check_run_fields(config)
  with hold_workdir(pathlib.Path(workdir)), interrupts.StopRequests() as stop:
    return _train_and_evaluate(config, pathlib.Path(workdir), allow_config_change, stop)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                        allow_config_change: bool,
                        stop: interrupts.StopRequests) -> dict[str, float]:
  info = input_pipeline.get_dataset_info(config.data)
  model = build_model(config, info.num_classes, info.image_size)
  loss_fn = optim.get_loss(config.loss)
  optim.create_optimizer(config.optimizer)  # checks the fields
  augment_config = augment.config_from(config.augment)

  saved_meta = checkpoints.latest_meta(workdir)
  latest = None if saved_meta is None else saved_meta['epoch']
  if saved_meta is not None:
    differences = checkpoints.config_differences(saved_meta['config'],
                                                 checkpoints.config_to_dict(config))
    if differences and not allow_config_change:
      raise ValueError(
          f'{workdir} holds a run with another config; refusing to resume it. '
          'Differences (saved -> now):\n  ' + '\n  '.join(differences) +
          '\nUse another workdir, or pass --allow_config_change to resume anyway.')
  if latest is not None and latest >= config.num_epochs:
    return finished_run_summary(workdir, saved_meta, config.num_epochs)

  # Starting weights of a new run, loaded before any decoding so that a wrong
  # or unreadable file fails fast: Keras weights (pretrained backbones) or
  # another run's checkpoint (warm start).
  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  rng = jax.random.key(config.seed)
  init_rng, rng = jax.random.split(rng)
  variables = None
  if latest is None and config.get('pretrained_weights'):
    variables = keras_import.import_keras_weights(
        config.pretrained_weights, init_variables(init_rng, model, info.image_size),
        keep_head=True)
  elif latest is None and config.get('init_from'):
    variables = checkpoints.load_variables(config.init_from,
                                           config.get('init_from_checkpoint', 'latest'),
                                           replicated)
    checkpoints.check_same_shapes(variables, init_variables(init_rng, model,
                                                            info.image_size),
                                  f'The checkpoint in {config.init_from}')
    console.info('Warm start: params from %s (optimizer state fresh)', config.init_from)

  is_chief = jax.process_index() == 0
  if is_chief:
    input_pipeline.save_class_mapping(info, workdir)
  run_checkpoints = checkpoints.RunCheckpoints(workdir, config.max_to_keep)

  device_resident = config.data.get('device_resident', 'auto')
  if device_resident is True and jax.process_count() > 1:
    raise ValueError('data.device_resident=True works on one host only')
  # Each host decodes only the examples of the rows it feeds.
  train_rows = batch_rows(mesh, config.batch_size)
  val_rows = batch_rows(mesh, config.eval_batch_size)
  whole = jax.process_count() == 1
  console.info('Decoding %s at %dx%d%s', info.builder.data_dir, info.image_size,
               info.image_size, '' if whole else
               f' (this host: rows {train_rows.start}-{train_rows.stop - 1} of each batch)')
  train_split = input_pipeline.load_split(
      info, 'train',
      None if whole else input_pipeline.train_share(config.batch_size, config.seed,
                                                    train_rows))
  val_split = input_pipeline.load_split(
      info, 'val',
      None if whole else input_pipeline.eval_share(config.eval_batch_size, val_rows))
  if device_resident == 'auto':
    device_resident = (jax.default_backend() != 'cpu' and jax.process_count() == 1
                       and input_pipeline.fits_on_device(train_split))
  if device_resident:
    train_input = input_pipeline.DeviceTrainInput(
        train_split, config.batch_size, config.seed, NamedSharding(mesh, P('data')))
  else:
    train_input = input_pipeline.TrainInput(train_split, config.batch_size, config.seed,
                                            train_rows)
  steps_per_epoch = train_input.steps_per_epoch
  console.info('%d train and %d val images%s, %d classes, %d steps per epoch; training '
               'batches built on %s', train_split.total, val_split.total,
               '' if whole else f' ({len(train_split)} and {len(val_split)} on this host)',
               info.num_classes, steps_per_epoch,
               'the device' if device_resident else 'the host (tf.data)')
  tx = optim.create_optimizer(config.optimizer, steps_per_epoch, config.num_epochs)

  state = create_train_state(init_rng, model, info.image_size, tx, variables)
  history: list[dict[str, Any]] = []
  start_epoch = 1
  best_top1 = -1.0
  if latest is not None:
    # Shardings for this mesh: a checkpoint of any topology restores here.
    abstract = checkpoints.abstract_like(_state_dict(state, rng), replicated)
    # A shape change (allowed through --allow_config_change) cannot restore.
    run_checkpoints.check_fits(saved_meta, abstract)
    restored, meta = run_checkpoints.restore(saved_meta, abstract)
    state = state.replace(params=restored['params'], batch_stats=restored['batch_stats'],
                          opt_state=restored['opt_state'], step=restored['step'])
    rng = jax.random.wrap_key_data(restored['rng'])
    history, best_top1 = meta['history'], meta['best_val_top1_accuracy']
    start_epoch = meta['epoch'] + 1
  # A run stopped by a signal within an epoch goes on from the step it saved.
  within = None if saved_meta is None else saved_meta.get('interrupted')
  if latest is not None and within is not None and within['steps_done']:
    console.info('Resuming %s within epoch %d, after its step %d (global step %d)',
                 workdir, within['epoch'], within['steps_done'], int(state.step))
  elif latest is not None:
    console.info('Resuming %s after epoch %d (global step %d)', workdir, start_epoch - 1,
                 int(state.step))
  # The history file is rewritten from the checkpoint: epochs after it that a
  # killed run had logged are dropped, and will be logged again when redone.
  history_path = workdir / HISTORY_FILE
  if is_chief:
    _write_history(history_path, history)

  micro = micro_batch_size(config)
  console.info('Devices: %d x %s%s', jax.device_count(), jax.devices()[0].device_kind,
               '' if jax.process_count() == 1 else
               f' in {jax.process_count()} processes ({jax.local_device_count()} here)')
  console.info('Model %s: %d parameters in %d weighted layers; %s convolutions, '
               '%s compute, %s', config.model.name, models.count_params(state.params),
               len(models.weighted_layers(state.params)), conv_impl(config),
               jnp.dtype(compute_dtype(config.get('compute_dtype', 'float32'))).name,
               f'gradients accumulated over parts of {micro}' if micro else 'whole batches')
  # Global arrays, as a multi-host checkpoint needs them.
  state = replicate(state, mesh)
  rng = jax.random.wrap_key_data(replicate(np.asarray(jax.random.key_data(rng)), mesh))
  preprocessing = config.get('preprocessing', 'rescale')
  train_step_fn = jax.jit(functools.partial(
      train_step, loss_fn=loss_fn, augment_config=augment_config,
      preprocessing=preprocessing,
      frozen_steps=config.get('freeze_backbone_epochs', 0) * steps_per_epoch,
      micro_batches=micro_batches(config)),
                          donate_argnums=(0,))
  eval_step_fn = jax.jit(functools.partial(eval_step, loss_fn=loss_fn,
                                           preprocessing=preprocessing))
  # TensorBoard events from the first host; the console line is logged below.
  writer = (metric_writers.SummaryWriter(str(workdir)) if is_chief
            else metric_writers.MultiWriter([]))
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=steps_per_epoch * config.num_epochs, writer=writer,
      every_secs=60)

  summary: dict[str, float] = history[-1] if history else {}
  saved_epoch = start_epoch - 1 if within is None else None
  stop.training = True
  for epoch in range(start_epoch, config.num_epochs + 1):
    start = time.perf_counter()
    learning_rate = float(optim.current_learning_rate(
        state.opt_state, config.optimizer, steps_per_epoch, config.num_epochs))
    train_metrics = None
    wait_seconds = 0.0
    batches = train_input.epoch(epoch)
    step_in_epoch = 0
    if within is not None and epoch == within['epoch']:
      step_in_epoch, learning_rate = within['steps_done'], within['learning_rate']
      batches = itertools.islice(batches, step_in_epoch, None)
      train_metrics = _metrics_from_json(within['train_metrics'], mesh)
    progress = console.EpochProgress(epoch, config.num_epochs, steps_per_epoch,
                                     config.batch_size, initial_step=step_in_epoch,
                                     mode=None if is_chief else 'off')
    while True:
      signum = stop.requested(step_in_epoch)
      if signum is not None:
        progress.close()
        if saved_epoch != epoch - 1 or step_in_epoch:
          meta = {'epoch': epoch - 1, 'config': checkpoints.config_to_dict(config),
                  'history': history, 'best_val_top1_accuracy': best_top1,
                  'interrupted': {
                      'global_step': int(state.step), 'epoch': epoch,
                      'steps_done': step_in_epoch, 'learning_rate': learning_rate,
                      'train_metrics': _metrics_to_json(train_metrics)}}
          run_checkpoints.save_interrupted(int(state.step), _state_dict(state, rng), meta)
          saved = f'saved in {workdir / checkpoints.INTERRUPTED}'
        elif saved_epoch:
          saved = f'epoch {saved_epoch} is saved in {workdir / checkpoints.LATEST}'
        else:
          saved = 'nothing to save yet'
        writer.flush()
        run_checkpoints.close()
        raise interrupts.TrainingInterrupted(
            signum, f'Stopped by {signal.Signals(signum).name} after step {step_in_epoch} '
            f'of epoch {epoch}: {saved}. Run the same command to resume.')
      wait_start = time.perf_counter()
      batch = next(batches, None)
      wait_seconds += time.perf_counter() - wait_start
      if batch is None:
        break
      if not device_resident:
        batch = shard_batch(batch, mesh, config.batch_size)
      state, step_metrics = train_step_fn(state, batch, rng)
      train_metrics = (step_metrics if train_metrics is None
                       else train_metrics.merge(step_metrics))
      step_in_epoch += 1
      progress.update(step_in_epoch, loss=lambda: train_metrics.compute()['loss'])
      report_progress(int(state.step))
    progress.close()
    train_summary = {k: float(v) for k, v in train_metrics.compute().items()}
    train_seconds = time.perf_counter() - start
    if not np.isfinite(train_summary['loss']):
      raise FloatingPointError(
          f'Training loss is {train_summary["loss"]} in epoch {epoch}: stopping. '
          f'{_last_good_checkpoint(workdir, run_checkpoints.latest_epoch())} '
          '(lower optimizer.learning_rate or check the data)')
    val_summary = evaluate(state, val_split, config.eval_batch_size, eval_step_fn, mesh)
    summary = {'epoch': epoch, 'step': int(state.step),
               **{f'train_{k}': v for k, v in train_summary.items()},
               **{f'val_{k}': v for k, v in val_summary.items()},
               'learning_rate': learning_rate,
               'epoch_seconds': time.perf_counter() - start,
               'train_images_per_second': steps_per_epoch * config.batch_size / train_seconds,
               'input_wait_fraction': wait_seconds / train_seconds}
    history.append(summary)
    is_best = summary['val_top1_accuracy'] > best_top1
    best_top1 = max(best_top1, summary['val_top1_accuracy'])
    if is_chief:
      writer.write_scalars(epoch, {k: v for k, v in summary.items() if k != 'epoch'})
      with history_path.open('a') as history_file:
        history_file.write(json.dumps(summary) + '\n')
    console.info(
        'epoch %d/%d: train loss %.4f top1 %.4f | val loss %.4f top1 %.4f '
        'top5 %.4f | lr %.3g | %.1f s, %.0f img/s', epoch, config.num_epochs,
        summary['train_loss'], summary['train_top1_accuracy'], summary['val_loss'],
        summary['val_top1_accuracy'], summary['val_top5_accuracy'], learning_rate,
        summary['epoch_seconds'], summary['train_images_per_second'])
    if epoch % config.checkpoint_every_epochs == 0 or epoch == config.num_epochs or is_best:
      meta = {'epoch': epoch, 'config': checkpoints.config_to_dict(config),
              'history': history, 'best_val_top1_accuracy': best_top1}
      run_checkpoints.save(epoch, _state_dict(state, rng), meta, best=is_best)
      saved_epoch = epoch
  writer.flush()
  run_checkpoints.close()
  if history:
    best = max(history, key=lambda entry: entry['val_top1_accuracy'])
    log = console.log_path()
    console.info('Best epoch %d: val top-1 %.4f, kept in %s/. Results in %s: %s/, %s, '
                 'TensorBoard events%s', best['epoch'], best['val_top1_accuracy'],
                 checkpoints.BEST, workdir, checkpoints.LATEST, HISTORY_FILE,
                 f', {log.name}' if log is not None and log.parent == workdir else '')
  return summary

