"""Training and evaluation: pure jitted steps and the resumable epoch loop.

`train_step` and `eval_step` are pure; `make_steps` jits them for a run's
settings (the benchmark uses it too); `train_epoch` and `evaluate` run them
over the data; `train_and_evaluate` is the plan of a run.

(No `from __future__ import annotations` here: clu reads the `Metrics` field
annotations as classes.)
"""

import dataclasses
import functools
import itertools
import pathlib
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from et_flax import augment
from et_flax import checkpoints
from et_flax import console
from et_flax import distributed
from et_flax import events
from et_flax import interrupts
from et_flax import models
from et_flax import optim
from et_flax import run_files
from et_flax import settings as settings_lib
from et_flax.data import input_pipeline

TOP_K = 5
# The epoch loop reads nothing back from the devices but at its allowed
# points, each an explicit `jax.device_get`: the learning rate and the step
# once per epoch, the epoch's metrics once, the progress bar's throttled loss.
# Tests set this to 'disallow' to prove it (an implicit read then raises).
LOOP_TRANSFER_GUARD = 'allow'


class TrainState(train_state.TrainState):
  batch_stats: Any


@flax.struct.dataclass
class Metrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  top1_accuracy: metrics.Average.from_output('top1_accuracy')
  top5_accuracy: metrics.Average.from_output('top5_accuracy')


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


@jax.jit
def merge_metrics(total: Metrics, new: Metrics) -> Metrics:
  """`total` and `new` merged on the device, in one dispatch."""
  return total.merge(new)


def read_metrics(total: Metrics) -> dict[str, float]:
  """The metrics' values, read from the devices in one transfer."""
  return {k: float(v) for k, v in jax.device_get(total.compute()).items()}


# ---------------------------------------------------------------------------
# The steps.

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


def accumulate_gradient(grad_fn: Callable, params: Any, images: jax.Array,
                        labels: jax.Array, batch_stats: Any, rng: jax.Array,
                        micro_batches: int) -> tuple[Any, Any]:
  """`grad_fn`'s result for the batch, from `micro_batches` equal parts of it.

  `grad_fn(params, images, labels, batch_stats, rng)` returns
  `((loss, (outputs, batch_stats)), grads)`, as `jax.value_and_grad(...,
  has_aux=True)` does; so does this. The mean gradient of equal parts is the
  batch's (summed in another order); batch norm sees the parts one after
  another and each part draws its own key (big_vision's
  `accumulate_gradient`, with the parts ordered by `_after`). XLA:CPU runs
  small batches much faster per image (docs/performance.md).
  """
  if micro_batches == 1:
    return grad_fn(params, images, labels, batch_stats, rng)

  def accumulate(carry, micro):
    grads_sum, batch_stats = carry
    micro_images, micro_labels, index = micro
    micro_images = _after(micro_images, grads_sum)
    (loss, (outputs, batch_stats)), grads = grad_fn(
        params, micro_images, micro_labels, batch_stats, jax.random.fold_in(rng, index))
    return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), (loss, outputs)

  def split(x):
    return x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:])

  (grads, batch_stats), (losses, outputs) = jax.lax.scan(
      accumulate, (jax.tree.map(jnp.zeros_like, params), batch_stats),
      (split(images), split(labels), jnp.arange(micro_batches)), unroll=True)
  grads = jax.tree.map(lambda g: g / micro_batches, grads)
  outputs = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), outputs)
  return (losses.mean(), (outputs, batch_stats)), grads


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
               *, loss_fn: optim.LossFn,
               augment_config: augment.AugmentConfig = augment.AugmentConfig(),
               preprocessing: str = 'rescale', micro_batches: int = 1,
               axis_name: str | None = None) -> tuple[TrainState, Metrics]:
  """One optimizer step on `batch`, augmented on device first.

  Augmentation and dropout are keyed by (rng, step), so a resumed run draws
  the same randomness as an uninterrupted one. Under `jax.jit` with a
  sharded batch the step is data parallel as it stands; under `jax.pmap`,
  pass `axis_name` and the gradients, loss and batch statistics are averaged
  over it (each device then draws its own augmentation and dropout, and batch
  norm normalises with each device's own batch, as in flax's examples).
  With `micro_batches` > 1 the gradient is accumulated over that many equal
  parts of the batch (`accumulate_gradient`). Freezing lives in the
  optimizer (`optim.freeze`).
  """
  rng = jax.random.fold_in(rng, state.step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  augment_rng, dropout_rng = jax.random.split(rng)
  images = augment.augment_batch(augment_rng, batch['image'].astype(jnp.float32),
                                 augment_config)
  images = augment.preprocess(images, preprocessing)

  def loss_of(params, images, labels, batch_stats, dropout_rng):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': batch_stats}, images, train=True,
        rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
    outputs = classification_outputs(logits, labels, loss_fn)
    return outputs['loss'].mean(), (outputs, updates.get('batch_stats', batch_stats))

  (loss, (outputs, batch_stats)), grads = accumulate_gradient(
      jax.value_and_grad(loss_of, has_aux=True), state.params, images, batch['label'],
      state.batch_stats, dropout_rng, micro_batches)
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
                          augment.preprocess(batch['image'], preprocessing), train=False)
  outputs = classification_outputs(logits, batch['label'], loss_fn)
  return _metrics(outputs, axis_name, mask=batch['mask'])


@dataclasses.dataclass(frozen=True)
class Steps:
  """A run's jitted steps."""
  train: Callable  # (state, batch, rng) -> (state, Metrics); the state is donated
  eval: Callable  # (state, batch) -> Metrics


def make_steps(settings: settings_lib.Settings, loss_fn: optim.LossFn,
               augment_config: augment.AugmentConfig) -> Steps:
  """`train_step` and `eval_step`, jitted with the run's settings."""
  return Steps(
      train=jax.jit(functools.partial(
          train_step, loss_fn=loss_fn, augment_config=augment_config,
          preprocessing=settings.preprocessing, micro_batches=settings.micro_batches),
                    donate_argnums=(0,)),
      eval=jax.jit(functools.partial(eval_step, loss_fn=loss_fn,
                                     preprocessing=settings.preprocessing)))


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
# Epochs.

@dataclasses.dataclass
class EpochRun:
  """How far `train_epoch` got."""
  state: TrainState
  train_metrics: Metrics | None
  steps_done: int
  wait_seconds: float  # waiting for input
  stopped_by: int | None = None  # the signal that stopped it within the epoch


def train_epoch(state: TrainState, rng: jax.Array, batches: Iterator[Any],
                train_step_fn: Callable, *, feed: Callable[[Any], Any],
                progress: console.EpochProgress, stop: interrupts.StopRequests,
                train_metrics: Metrics | None = None, steps_done: int = 0,
                after_step: Callable[[TrainState], None] | None = None) -> EpochRun:
  """Steps over `batches` until they end or a stop is requested.

  `feed` puts a host batch on the devices; `train_metrics` and `steps_done`
  carry on an epoch a stopped run had begun. Nothing is read back from the
  devices but the progress bar's loss (at most every
  `console.BAR_STATS_INTERVAL_SECONDS`): the steps queue up on the devices.
  """
  wait_seconds = 0.0
  while True:
    signum = stop.requested(steps_done)
    if signum is not None:
      progress.close()
      return EpochRun(state, train_metrics, steps_done, wait_seconds, signum)
    wait_start = time.perf_counter()
    batch = next(batches, None)
    wait_seconds += time.perf_counter() - wait_start
    if batch is None:
      break
    state, step_metrics = train_step_fn(state, feed(batch), rng)
    train_metrics = (step_metrics if train_metrics is None
                     else merge_metrics(train_metrics, step_metrics))
    steps_done += 1
    progress.update(steps_done, loss=lambda: read_metrics(train_metrics)['loss'])
    if after_step is not None:
      after_step(state)
  progress.close()
  return EpochRun(state, train_metrics, steps_done, wait_seconds)


def evaluate(state: TrainState, split: input_pipeline.Split, batch_size: int,
             eval_step_fn, mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Mean loss, top-1 and top-5 over every image of `split`.

  With several hosts, each feeds its rows of every batch (`split` holding
  its share, `input_pipeline.eval_share`); the metrics are global.
  """
  total = None
  rows = distributed.batch_rows(mesh, batch_size)
  for batch in input_pipeline.eval_batches(split, batch_size, rows):
    batch_metrics = eval_step_fn(state, distributed.shard_batch(batch, mesh, batch_size))
    total = batch_metrics if total is None else merge_metrics(total, batch_metrics)
  return read_metrics(total)


def _metrics_to_json(train_metrics: Metrics | None) -> list[float] | None:
  """An epoch's running metrics, exactly: float32 and int32 values are exact as
  JSON numbers."""
  if train_metrics is None:
    return None
  return [np.asarray(leaf).item() for leaf in jax.device_get(jax.tree.leaves(train_metrics))]


def _metrics_from_json(saved: list[float] | None, mesh: jax.sharding.Mesh
                       ) -> Metrics | None:
  if saved is None:
    return None
  template = Metrics.empty()
  leaves = [np.asarray(value, like.dtype)
            for value, like in zip(saved, jax.tree.leaves(template), strict=True)]
  return distributed.replicate(jax.tree.unflatten(jax.tree.structure(template), leaves),
                               mesh)


# ---------------------------------------------------------------------------
# A run.

@dataclasses.dataclass
class _Data:
  train: Any  # input_pipeline.TrainInput or DeviceTrainInput
  val: input_pipeline.Split
  settings: settings_lib.Settings  # device_resident resolved with the data's size


def _load_data(config: ml_collections.ConfigDict, info: input_pipeline.DatasetInfo,
               mesh: jax.sharding.Mesh, platform: settings_lib.Platform) -> _Data:
  """Decodes this host's share of train and val; the training input over it."""
  # Each host decodes only the examples of the rows it feeds.
  train_rows = distributed.batch_rows(mesh, config.batch_size)
  val_rows = distributed.batch_rows(mesh, config.eval_batch_size)
  whole = jax.process_count() == 1
  train_split = input_pipeline.load_split(
      info, 'train',
      None if whole else input_pipeline.train_share(config.batch_size, config.seed,
                                                    train_rows))
  val_split = input_pipeline.load_split(
      info, 'val',
      None if whole else input_pipeline.eval_share(config.eval_batch_size, val_rows))
  settings = settings_lib.resolve(
      config, platform, train_bytes=train_split.images.nbytes + train_split.labels.nbytes)
  if settings.device_resident:
    train_input = input_pipeline.DeviceTrainInput(
        train_split, config.batch_size, config.seed, NamedSharding(mesh, P('data')))
  else:
    train_input = input_pipeline.TrainInput(train_split, config.batch_size, config.seed,
                                            train_rows)
  console.info('%d train and %d val images%s, %d classes, %d steps per epoch; training '
               'batches built on %s', train_split.total, val_split.total,
               '' if whole else f' ({len(train_split)} and {len(val_split)} on this host)',
               info.num_classes, train_input.steps_per_epoch,
               'the device' if settings.device_resident else 'the host')
  console.info('Data prepared from %s', info.describe_source())
  return _Data(train_input, val_split, settings)


def _log_header(config: ml_collections.ConfigDict, settings: settings_lib.Settings,
                params: Any) -> None:
  console.info('Devices: %d x %s%s', jax.device_count(), jax.devices()[0].device_kind,
               '' if jax.process_count() == 1 else
               f' in {jax.process_count()} processes ({jax.local_device_count()} here)')
  console.info('Model %s: %d parameters in %d weighted layers; %s', config.model.name,
               models.count_params(params), len(models.weighted_layers(params)),
               settings.describe())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False) -> dict[str, float]:
  """Trains `config.model` on `config.data`, evaluating on val every epoch.

  A workdir with checkpoints resumes from the latest: the same batches,
  randomness, optimizer and plateau state and history as an uninterrupted
  run, on any number of devices and hosts. A config that differs from the
  saved one in anything but run length, logging or data location is refused
  unless `allow_config_change`. Every part of the config is checked before
  any image is decoded or any step taken. The run holds the workdir's lock
  throughout: a second run there is refused at once. A full disk or quota
  stops it with a console.StorageFullError saying what it was writing and
  which epoch's checkpoint is the last complete one. Returns the last
  epoch's metrics.
  """
  platform = settings_lib.Platform.current()
  settings_lib.check_run_config(config, platform)
  settings = settings_lib.resolve(config, platform)  # builds oneDNN now, if asked for
  workdir = pathlib.Path(workdir)
  with distributed.hold_workdir(workdir), interrupts.StopRequests() as stop:
    try:
      return _Run(config, workdir, platform, settings, stop).run(allow_config_change)
    except Exception as error:
      if console.storage_full(error) is None:
        raise
      if isinstance(error, FloatingPointError):  # a non-finite loss, its save failed: both said
        raise console.StorageFullError(
            f'{error} Free space (or raise the quota) before running it again.') from error
      # Said once every save under way has ended: what is saved is what stays.
      raise console.StorageFullError(
          checkpoints.storage_full_message(error, workdir)) from error


class _Run:
  """One training run: the plan (`run`) and the steps of its loop."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path,
               platform: settings_lib.Platform, settings: settings_lib.Settings,
               stop: interrupts.StopRequests):
    self.config, self.workdir, self.platform = config, workdir, platform
    self.settings, self.stop = settings, stop
    self.is_chief = jax.process_index() == 0

  def run(self, allow_config_change: bool) -> dict[str, float]:
    config, workdir = self.config, self.workdir
    info = input_pipeline.get_dataset_info(config.data)
    model = settings_lib.build_model(config, self.settings, info.num_classes,
                                     info.image_size)
    loss_fn = optim.get_loss(config.loss)
    optim.check_optimizer_config(config.optimizer)
    augment_config = augment.config_from(config.augment)
    saved_meta = checkpoints.check_resumable(workdir, config, allow_config_change)
    if saved_meta is not None and saved_meta.epoch >= config.num_epochs:
      return checkpoints.finished_run_summary(workdir, saved_meta, config.num_epochs)

    # Starting weights of a new run, loaded before any decoding so that a wrong
    # or unreadable file fails fast.
    self.mesh = mesh = distributed.make_mesh()
    replicated = NamedSharding(mesh, P())
    init_rng, rng = jax.random.split(jax.random.key(config.seed))
    variables = None if saved_meta is not None else checkpoints.starting_variables(
        config, lambda: init_variables(init_rng, model, info.image_size), replicated)
    if self.is_chief:
      with checkpoints.writing(str(run_files.classes_path(workdir))):
        run_files.write_classes(workdir, info.class_mapping())
    # Saves are written in the background; leaving this block, however it is
    # left, waits for the last one.
    with checkpoints.RunCheckpoints(workdir, config.max_to_keep) as self.run_checkpoints:
      data = _load_data(config, info, mesh, self.platform)
      self.settings = data.settings
      steps_per_epoch = data.train.steps_per_epoch
      tx = optim.create_optimizer(
          config.optimizer, steps_per_epoch, config.num_epochs,
          frozen_steps=config.get('freeze_backbone_epochs', 0) * steps_per_epoch,
          frozen=models.backbone_mask)
      state = create_train_state(init_rng, model, info.image_size, tx, variables)
      state, rng, self.progress = checkpoints.restore_or_init(
          self.run_checkpoints, saved_meta, state, rng, replicated)
      saved_settings = None if saved_meta is None else saved_meta.settings
      changed = settings_lib.changes(saved_settings or {}, self.settings)
      if changed:
        # Another platform or dtype computes the same maths with other rounding.
        console.info('Resumed with other settings than the checkpoint was written with: %s',
                     ', '.join(changed))
      # The history file is rewritten from the checkpoint: epochs after it that a
      # killed run had logged are dropped, and will be logged again when redone.
      if self.is_chief:
        with checkpoints.writing(str(run_files.history_path(workdir))):
          run_files.write_history(workdir, self.progress.history)
      _log_header(config, self.settings, state.params)
      # Global arrays, as a multi-host checkpoint needs them.
      state = distributed.replicate(state, mesh)
      self.rng = jax.random.wrap_key_data(
          distributed.replicate(np.asarray(jax.random.key_data(rng)), mesh))
      self.steps = make_steps(self.settings, loss_fn, augment_config)
      # TensorBoard events from the first host; the console line is logged below.
      with checkpoints.writing(f'the TensorBoard events in {workdir}'):
        self.writer = events.EventWriter(workdir) if self.is_chief else events.NoWriter()
      summary = self.progress.history[-1] if self.progress.history else {}
      self.stop.training = True
      with jax.transfer_guard_device_to_host(LOOP_TRANSFER_GUARD):
        for epoch in range(self.progress.epoch + 1, config.num_epochs + 1):
          start = time.perf_counter()
          epoch_run, learning_rate = self._train(epoch, state, data)
          state = epoch_run.state
          if epoch_run.stopped_by is not None:
            self._save_and_stop(epoch, epoch_run, learning_rate, start)
          summary = self._evaluate(epoch, epoch_run, data, learning_rate, start)
          self._record(epoch, state, summary)
      self.writer.close()
    self._log_closing()
    return summary

  def _train(self, epoch: int, state: TrainState, data: _Data) -> tuple[EpochRun, float]:
    """Epoch `epoch`'s steps (from where a stopped run left it), and its rate."""
    config = self.config
    steps_per_epoch = data.train.steps_per_epoch
    learning_rate = float(jax.device_get(optim.current_learning_rate(
        state.opt_state, config.optimizer, steps_per_epoch, config.num_epochs)))
    batches = data.train.epoch(epoch)
    steps_done, train_metrics = 0, None
    within = self._stopped_within(epoch)
    if within is not None:
      steps_done, learning_rate = within.steps_done, within.learning_rate
      batches = itertools.islice(batches, steps_done, None)
      train_metrics = _metrics_from_json(within.train_metrics, self.mesh)
    progress = console.EpochProgress(epoch, config.num_epochs, steps_per_epoch,
                                     config.batch_size, initial_step=steps_done,
                                     mode=None if self.is_chief else 'off')
    feed = ((lambda batch: batch) if data.settings.device_resident else
            functools.partial(distributed.shard_batch, mesh=self.mesh,
                              batch_size=config.batch_size))
    return train_epoch(state, self.rng, batches, self.steps.train, feed=feed,
                       progress=progress, stop=self.stop, train_metrics=train_metrics,
                       steps_done=steps_done), learning_rate

  def _stopped_within(self, epoch: int) -> run_files.StoppedWithin | None:
    """Where a stopped run left epoch `epoch`, when this run resumes it there."""
    within = self.progress.within
    return within if within is not None and within.epoch == epoch else None

  def _time_before(self, epoch: int) -> tuple[float, float]:
    """The seconds epoch `epoch` took before a stop, and those spent waiting
    for input (0 when this run did not resume it)."""
    within = self._stopped_within(epoch)
    return (0.0, 0.0) if within is None else (within.seconds, within.wait_seconds)

  def _save_and_stop(self, epoch: int, epoch_run: EpochRun, learning_rate: float,
                     start: float) -> None:
    """Saves a run stopped by a signal where it stands, and raises TrainingInterrupted."""
    saved_epoch, steps_done = self.progress.saved_epoch, epoch_run.steps_done
    if saved_epoch != epoch - 1 or steps_done:
      global_step = int(jax.device_get(epoch_run.state.step))
      seconds, wait_seconds = self._time_before(epoch)
      interrupted = run_files.StoppedWithin(
          global_step=global_step, epoch=epoch, steps_done=steps_done,
          learning_rate=learning_rate,
          train_metrics=_metrics_to_json(epoch_run.train_metrics),
          # The resumed epoch's time and rate count this part too.
          seconds=seconds + time.perf_counter() - start,
          wait_seconds=wait_seconds + epoch_run.wait_seconds)
      meta = checkpoints.run_meta(self.config, self.progress, self.settings.to_dict(),
                                  interrupted)
      self.run_checkpoints.save_interrupted(
          global_step, checkpoints.state_dict(epoch_run.state, self.rng), meta)
      saved = f'saved in {self.workdir / checkpoints.INTERRUPTED}'
    elif saved_epoch:
      saved = f'epoch {saved_epoch} is saved in {self.workdir / checkpoints.LATEST}'
    else:
      saved = 'nothing to save yet'
    self.writer.close()
    self.run_checkpoints.close()
    signum = epoch_run.stopped_by
    raise interrupts.TrainingInterrupted(
        signum, f'Stopped by {signal.Signals(signum).name} after step {steps_done} '
        f'of epoch {epoch}: {saved}. Run the same command to resume.')

  def _evaluate(self, epoch: int, epoch_run: EpochRun, data: _Data, learning_rate: float,
                start: float) -> dict[str, Any]:
    """The epoch's summary: its training metrics (finite, or a stop), val's, timing."""
    config = self.config
    train_summary = read_metrics(epoch_run.train_metrics)
    # An epoch resumed after a stop: the part before it counts too.
    seconds_before, wait_seconds = self._time_before(epoch)
    start -= seconds_before
    wait_seconds += epoch_run.wait_seconds
    train_seconds = time.perf_counter() - start
    if not np.isfinite(train_summary['loss']):
      stop = f'Training loss is {train_summary["loss"]} in epoch {epoch}: stopping.'
      fix = '(lower optimizer.learning_rate or check the data)'
      try:
        saved = self.run_checkpoints.latest_epoch()  # waits for the save under way
      except Exception as save_error:
        # That save failed: the stop says so too, and which checkpoint is complete.
        epochs = checkpoints.complete_epochs(self.workdir)
        failed = console.user_error_message(save_error)
        if failed is None:
          raise  # a bug: its traceback
        raise FloatingPointError(
            f'{stop} The checkpoint save before it failed too: {failed}. '
            f'{checkpoints.last_good_checkpoint(self.workdir, epochs[-1] if epochs else None)} '
            f'{fix}') from save_error
      raise FloatingPointError(
          f'{stop} {checkpoints.last_good_checkpoint(self.workdir, saved)} {fix}')
    val_summary = evaluate(epoch_run.state, data.val, config.eval_batch_size,
                           self.steps.eval, self.mesh)
    steps_per_epoch = data.train.steps_per_epoch
    return {'epoch': epoch, 'step': int(jax.device_get(epoch_run.state.step)),
            **{f'train_{k}': v for k, v in train_summary.items()},
            **{f'val_{k}': v for k, v in val_summary.items()},
            'learning_rate': learning_rate,
            'epoch_seconds': time.perf_counter() - start,
            'train_images_per_second': steps_per_epoch * config.batch_size / train_seconds,
            'input_wait_fraction': wait_seconds / train_seconds}

  def _record(self, epoch: int, state: TrainState, summary: dict[str, Any]) -> None:
    """The epoch's line, history entry, TensorBoard scalars and checkpoints."""
    config, progress = self.config, self.progress
    progress.history.append(summary)
    progress.epoch, progress.within = epoch, None
    is_best = summary['val_top1_accuracy'] > progress.best_top1
    progress.best_top1 = max(progress.best_top1, summary['val_top1_accuracy'])
    if self.is_chief:
      with checkpoints.writing(f'the TensorBoard events in {self.workdir}'):
        self.writer.write_scalars(epoch, {k: v for k, v in summary.items() if k != 'epoch'})
      with checkpoints.writing(str(run_files.history_path(self.workdir))):
        run_files.append_history(self.workdir, summary)
    console.info(
        'epoch %d/%d: train loss %.4f top1 %.4f | val loss %.4f top1 %.4f '
        'top5 %.4f | lr %.3g | %.1f s, %.0f img/s', epoch, config.num_epochs,
        summary['train_loss'], summary['train_top1_accuracy'], summary['val_loss'],
        summary['val_top1_accuracy'], summary['val_top5_accuracy'],
        summary['learning_rate'], summary['epoch_seconds'],
        summary['train_images_per_second'])
    if epoch % config.checkpoint_every_epochs == 0 or epoch == config.num_epochs or is_best:
      meta = checkpoints.run_meta(config, progress, self.settings.to_dict())
      self.run_checkpoints.save(epoch, checkpoints.state_dict(state, self.rng), meta,
                                best=is_best)
      progress.saved_epoch = epoch

  def _log_closing(self) -> None:
    history = self.progress.history
    if not history:
      return
    best = max(history, key=lambda entry: entry['val_top1_accuracy'])
    log = console.log_path()
    console.info('Best epoch %d: val top-1 %.4f, kept in %s/. Results in %s: %s/, %s, '
                 'TensorBoard events%s', best['epoch'], best['val_top1_accuracy'],
                 checkpoints.BEST, self.workdir, checkpoints.LATEST,
                 run_files.HISTORY_FILE,
                 f', {log.name}' if log is not None and log.parent == self.workdir else '')
