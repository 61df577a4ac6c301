"""Speed of a config's train and eval steps, its input pipeline, and Keras's.

  python -m et_flax.benchmark [steps] --config=configs/default.py [--batch_size=128]
      [--steps=10] [--keras=true] [--rounds=1] [--pipeline_images=10000]
      [--epoch_images=100000] [--load=busy:1] [--json=bench.json]

Reports, as a table and JSON: train-step images/s (median over --steps steps
after --warmup), eval images/s, compile time, peak host and device memory,
the input pipeline (decoding a generated Tiny ImageNet-layout tree of random
JPEGs, then cached epochs) and the share of step time spent waiting for
input when the pipeline feeds the step; and the same model written in Keras
(TensorFlow) with the config's optimizer and loss, timed on the same batch
on the same machine in the same run, with our/Keras as a ratio. Like for
like: both steps are timed without augmentation; when the config augments,
ours again with its on-device augmentation against Keras fed by
ImageDataGenerator (as the report ran it). With --rounds=R the train steps,
ours and Keras's, are timed again in R interleaved rounds of --steps each,
so that the ratio holds on a machine whose speed drifts within a run. With
--load, something else uses the cores meanwhile (a busy loop, a second
training process: et_flax/benchmark/load.py). Steps run on random data:
speed does not depend on the pixels.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Mapping
import json
import pathlib
import resource
import statistics
import tempfile
import time
from typing import Any

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from et_flax import augment
from et_flax import config_files
from et_flax import console
from et_flax import distributed
from et_flax import interrupts
from et_flax import models
from et_flax import optim
from et_flax import settings as settings_lib
from et_flax import train
from et_flax.benchmark import load
from et_flax.cpu import onednn
from et_flax.data import fake_data
from et_flax.data import input_pipeline

FLAGS = flags.FLAGS


def _median_seconds(fn, steps: int, warmup: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_steps(config, settings: settings_lib.Settings, batch_size: int, image_size: int,
               num_classes: int, steps: int, warmup: int,
               augment_config: augment.AugmentConfig = augment.AugmentConfig()
               ) -> dict[str, Any]:
  """Compile time and median seconds of our train and eval steps (`train.make_steps`),
  the train step augmenting on the device with `augment_config`."""
  model = settings_lib.build_model(config, settings, num_classes, image_size)
  tx = optim.create_optimizer(config.optimizer, steps_per_epoch=100, num_epochs=10)
  mesh = distributed.make_mesh()
  state = distributed.replicate(train.create_train_state(jax.random.key(0), model,
                                                         image_size, tx), mesh)
  rng = np.random.default_rng(0)
  host_batch = {'image': rng.integers(0, 256, (batch_size, image_size, image_size, 3),
                                      dtype=np.uint8),
                'label': rng.integers(0, num_classes, batch_size).astype(np.int32)}
  batch = distributed.shard_batch(host_batch, mesh)
  run_steps = train.make_steps(settings, optim.get_loss(config.loss), augment_config)
  key = jax.random.key(1)
  start = time.perf_counter()
  compiled = run_steps.train.lower(state, batch, key).compile()
  compile_seconds = time.perf_counter() - start

  holder = {'state': state}

  def train_once():
    holder['state'], metrics = compiled(holder['state'], batch, key)
    return metrics

  train_seconds = _median_seconds(train_once, steps, warmup)
  eval_batch = {**batch, 'mask': distributed.shard_batch(
      {'mask': np.ones(batch_size, bool)}, mesh)['mask']}
  eval_seconds = _median_seconds(lambda: run_steps.eval(holder['state'], eval_batch),
                                 steps, warmup)
  return {'compile_seconds': compile_seconds, 'train_step_seconds': train_seconds,
          'train_images_per_second': batch_size / train_seconds,
          'eval_images_per_second': batch_size / eval_seconds,
          'state': holder['state'], 'step': compiled, 'batch': host_batch,
          'train_once': train_once}


def interleaved_seconds(timers: Mapping[str, Callable[[], Any]], steps: int,
                        rounds: int) -> dict[str, float]:
  """Median seconds of a call of each timer, over `rounds` rounds in which
  each timer in turn makes `steps` calls: a machine whose speed drifts during
  the run then slows every timer alike, which timing one after the other
  does not."""
  times = {name: [] for name in timers}
  for _ in range(rounds):
    for name, fn in timers.items():
      for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times[name].append(time.perf_counter() - start)
  return {name: statistics.median(seconds) for name, seconds in times.items()}


def keras_optimizer(optimizer_config):
  """The Keras optimizer `config.optimizer` reproduces (plateau halving, a
  per-epoch callback, does not change a step's cost)."""
  import keras  # pylint: disable=import-outside-toplevel

  fields = dict(optimizer_config)
  name, rate = fields['name'], fields['learning_rate']
  if fields.get('schedule', 'constant') == 'inverse_time':
    rate = keras.optimizers.schedules.InverseTimeDecay(rate, 1, fields.get('decay', 0.0))
  if name == 'adam':
    return keras.optimizers.Adam(rate, beta_1=fields.get('beta_1', 0.9),
                                 beta_2=fields.get('beta_2', 0.999),
                                 epsilon=fields.get('epsilon', 1e-7))
  if name == 'sgd':
    return keras.optimizers.SGD(rate, momentum=fields.get('momentum', 0.0),
                                nesterov=fields.get('nesterov', False))
  if name == 'rmsprop':
    return keras.optimizers.RMSprop(rate, rho=fields.get('rho', 0.9),
                                    momentum=fields.get('momentum', 0.0),
                                    epsilon=fields.get('epsilon', 1e-7))
  raise ValueError(f'no Keras optimizer for config.optimizer.name={name!r}')


def build_keras_model(config, num_classes: int, image_size: int):
  """The config's model in Keras, returning logits."""
  import keras  # pylint: disable=import-outside-toplevel

  from et_flax.keras import models as keras_models  # pylint: disable=import-outside-toplevel

  if config.model.name == 'et':  # E.T. written in Keras layers (et_flax/keras/models.py)
    return keras_models.build_keras_et(config.model, num_classes, image_size)
  application = models.facts(config.model).keras_application
  if application is None:
    raise ValueError(f'model {config.model.name!r} has no Keras counterpart to time: '
                     'pass --keras=false')
  base = getattr(keras.applications, application)(
      weights=None, include_top=False, pooling='avg', input_shape=(image_size, image_size, 3))
  x = base.output
  if config.model.get('dropout_rate', 0.0):
    x = keras.layers.Dropout(config.model.dropout_rate)(x)
  return keras.Model(base.input, keras.layers.Dense(num_classes)(x))


def keras_image_generator(augment_config: augment.AugmentConfig):
  """Keras's ImageDataGenerator with the same ranges and `rescale=1/255`, as
  the report fed its models (it has no random-resized crop)."""
  from keras.src.legacy.preprocessing import image  # pylint: disable=import-outside-toplevel

  fields = {f: getattr(augment_config, f) for f in (
      'rotation_range', 'width_shift_range', 'height_shift_range', 'shear_range',
      'zoom_range', 'channel_shift_range', 'horizontal_flip', 'vertical_flip')}
  return image.ImageDataGenerator(rescale=1.0 / 255, **fields)


def time_keras(config, batch: dict[str, np.ndarray], num_classes: int, steps: int,
               warmup: int, augment_config: augment.AugmentConfig | None = None
               ) -> tuple[dict[str, Any], dict[str, Callable[[], Any]]]:
  """The same model in Keras (TensorFlow): the config's optimizer and loss, the
  same batch; with `augment_config`, also fed by ImageDataGenerator. Returns
  the results and the timed steps ('keras', 'keras_augmented'), to time
  again."""
  console.import_tensorflow('timing the steps in Keras (--keras=false skips it)')
  import keras  # pylint: disable=import-outside-toplevel

  image_size = batch['image'].shape[1]
  model = build_keras_model(config, num_classes, image_size)
  labels = batch['label']
  if config.loss == 'categorical_hinge':
    loss, targets = keras.losses.CategoricalHinge(), np.eye(num_classes, dtype=np.float32)[labels]
  else:
    loss, targets = keras.losses.SparseCategoricalCrossentropy(from_logits=True), labels
  optimizer = keras_optimizer(config.optimizer)
  model.compile(optimizer=optimizer, loss=loss)
  images = batch['image'].astype(np.float32) / 255.0
  start = time.perf_counter()
  model.train_on_batch(images, targets)
  compile_seconds = time.perf_counter() - start
  timers = {'keras': lambda: model.train_on_batch(images, targets)}
  seconds = _median_seconds(timers['keras'], steps, warmup)
  results = {'keras_optimizer': type(optimizer).__name__,
             'keras_compile_seconds': compile_seconds, 'keras_train_step_seconds': seconds,
             'keras_train_images_per_second': len(labels) / seconds}
  if augment_config is not None:
    flow = keras_image_generator(augment_config).flow(
        batch['image'].astype(np.float32), targets, batch_size=len(labels), shuffle=False)
    timers['keras_augmented'] = lambda: model.train_on_batch(*next(flow))
    seconds = _median_seconds(timers['keras_augmented'], steps, warmup)
    results['keras_train_augmented_images_per_second'] = len(labels) / seconds
  return results, timers


def time_pipeline(config, batch_size: int, image_size: int, num_images: int,
                  timing: dict[str, Any], steps: int) -> dict[str, Any]:
  """Decoding, cached epochs, and the input wait when the pipeline feeds steps."""
  with tempfile.TemporaryDirectory() as scratch:
    scratch = pathlib.Path(scratch)
    per_class = max(1, num_images // 200)
    root = fake_data.write_tiny_imagenet_tree(
        scratch / 'tiny-imagenet-200', fake_data.random_wnids(200), per_class,
        num_val=10, pixels='random')
    data_config = {'name': 'tiny_imagenet', 'data_dir': str(root),
                   'image_size': image_size, 'tfds_dir': str(scratch / 'tfds')}
    info = input_pipeline.get_dataset_info(data_config)
    start = time.perf_counter()
    split = input_pipeline.load_split(info, 'train')
    decode_seconds = time.perf_counter() - start
    train_input = input_pipeline.TrainInput(split, batch_size, seed=0)
    start = time.perf_counter()
    count = sum(b['image'].shape[0] for b in train_input.epoch(1))
    cached_rate = count / (time.perf_counter() - start)

    # Feed real steps from the pipeline: how long does the step wait?
    mesh = distributed.make_mesh()
    state, compiled = timing['state'], timing['step']
    key = jax.random.key(1)
    wait = total = 0.0
    batches = train_input.epoch(2)
    jax.block_until_ready(state)
    for _ in range(min(steps, train_input.steps_per_epoch)):
      start = time.perf_counter()
      batch = next(batches)
      fetched = time.perf_counter()
      state, metrics = compiled(state, distributed.shard_batch(batch, mesh), key)
      jax.block_until_ready(metrics)
      wait += fetched - start
      total += time.perf_counter() - start
    timing['state'] = state
  return {'pipeline_images': len(split),
          'decode_images_per_second': len(split) / decode_seconds,
          'cached_epoch_images_per_second': cached_rate,
          'input_wait_fraction': wait / total}


def time_device_epoch(config, batch_size: int, image_size: int, num_images: int,
                      timing: dict[str, Any]) -> dict[str, Any]:
  """One epoch of `num_images` random images resident on the device.

  The path `config.data.device_resident` takes: the uint8 split on the
  device, batches gathered there, the step fed without host transfers.
  """
  rng = np.random.default_rng(0)
  split = input_pipeline.Split(
      images=rng.integers(0, 256, (num_images, image_size, image_size, 3), dtype=np.uint8),
      labels=rng.integers(0, timing['num_classes'], num_images).astype(np.int32),
      file_names=())
  mesh = distributed.make_mesh()
  device_input = input_pipeline.DeviceTrainInput(
      split, batch_size, seed=0,
      sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
  state, compiled, key = timing['state'], timing['step'], jax.random.key(1)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for batch in device_input.epoch(1):
    state, metrics = compiled(state, batch, key)
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - start
  # The same epoch through the run's own loop (`train.train_epoch`: the
  # metrics merged on the device, the stop checks, the progress lines).
  progress = console.EpochProgress(2, 2, device_input.steps_per_epoch, batch_size,
                                   mode='lines', stream=io.StringIO())
  start = time.perf_counter()
  with interrupts.StopRequests() as stop:
    epoch_run = train.train_epoch(state, key, device_input.epoch(2), compiled,
                                  feed=lambda batch: batch, progress=progress, stop=stop)
  train.read_metrics(epoch_run.train_metrics)
  loop_seconds = time.perf_counter() - start
  timing['state'] = epoch_run.state
  images = device_input.steps_per_epoch * batch_size
  return {'device_epoch_images': images, 'device_epoch_seconds': seconds,
          'device_epoch_images_per_second': images / seconds,
          'loop_epoch_seconds': loop_seconds,
          'loop_epoch_images_per_second': images / loop_seconds}


def _peak_memory() -> dict[str, Any]:
  device_stats = jax.local_devices()[0].memory_stats() or {}
  return {'peak_host_megabytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          'peak_device_megabytes': (device_stats['peak_bytes_in_use'] / 2**20
                                    if 'peak_bytes_in_use' in device_stats else None)}


def run(config, batch_size: int, image_size: int, steps: int, warmup: int,
        keras: bool, pipeline_images: int, epoch_images: int = 0,
        rounds: int = 1) -> dict[str, Any]:
  """Everything the module docstring lists, for `config` at this batch and
  image size. With `rounds` > 1 (and `keras`), the train steps, ours and
  Keras's, are timed again in that many interleaved rounds of `steps` each
  (`interleaved_seconds`), and the images/s and ratios come from those."""
  if rounds < 1:
    raise ValueError(f'rounds must be at least 1, got {rounds}')
  # The micro-batch choice ('auto') and its check depend on both sizes.
  config = copy.deepcopy(config)
  config.batch_size, config.data.image_size = batch_size, image_size
  settings = settings_lib.resolve(config)
  num_classes = config.data.classes if isinstance(config.data.classes, int) else len(
      config.data.classes)
  num_classes = num_classes or 200
  # Like for like: the step without augmentation on both sides, then, when the
  # config augments, ours on the device against Keras's ImageDataGenerator.
  augment_config = augment.config_from(config.augment)
  timing = time_steps(config, settings, batch_size, image_size, num_classes, steps, warmup)
  timing['num_classes'] = num_classes
  timers = {'train': timing['train_once']}
  if not augment_config.is_identity:
    augmented = time_steps(config, settings, batch_size, image_size, num_classes, steps,
                           warmup, augment_config)
    timing['train_augmented_images_per_second'] = augmented['train_images_per_second']
    timers['train_augmented'] = augmented['train_once']
  results = {'config_model': config.model.to_dict(), 'batch_size': batch_size,
             'image_size': image_size, 'device': str(jax.devices()[0]),
             'device_count': jax.device_count(),
             'compute_dtype': settings.compute_dtype,
             'micro_batch_size': settings.micro_batch_size,
             'conv_impl': settings.conv_impl}
  if results['conv_impl'] == 'onednn':
    results['onednn_version'] = onednn.version()
  results.update({k: v for k, v in timing.items()
                  if k not in ('state', 'step', 'batch', 'num_classes', 'train_once')})
  if epoch_images:
    results.update(time_device_epoch(config, batch_size, image_size, epoch_images, timing))
  if pipeline_images:
    results.update(time_pipeline(config, batch_size, image_size, pipeline_images, timing,
                                 steps))
  results.update(_peak_memory())
  if keras:
    keras_results, keras_timers = time_keras(
        config, timing['batch'], num_classes, steps, warmup,
        None if augment_config.is_identity else augment_config)
    results.update(keras_results)
    if rounds > 1:
      seconds = interleaved_seconds({**timers, **keras_timers}, steps, rounds)
      results['interleaved_rounds'] = rounds
      for name, key in (('train', 'train_images_per_second'),
                        ('train_augmented', 'train_augmented_images_per_second'),
                        ('keras', 'keras_train_images_per_second'),
                        ('keras_augmented', 'keras_train_augmented_images_per_second')):
        if name in seconds:
          results[key] = batch_size / seconds[name]
      results['train_step_seconds'] = seconds['train']
      results['keras_train_step_seconds'] = seconds['keras']
    results['ours_over_keras'] = (results['train_images_per_second']
                                  / results['keras_train_images_per_second'])
    if 'keras_train_augmented_images_per_second' in results:
      results['augmented_ours_over_keras'] = (
          results['train_augmented_images_per_second']
          / results['keras_train_augmented_images_per_second'])
  return results


def format_table(results: dict[str, Any]) -> str:
  rounds = results.get('interleaved_rounds')
  median = f'median of {rounds} interleaved rounds' if rounds else 'median'
  rows = [('device', results['device'] + f' x{results["device_count"]}'
            + (f', {results["load"]}' if results.get('load') else '')),
          ('model / batch / image', f'{results["config_model"]["name"]} / '
           f'{results["batch_size"]} / {results["image_size"]}px, '
           f'{results["compute_dtype"]}, micro-batch {results["micro_batch_size"] or "-"}, '
           f'{results.get("conv_impl", "xla")} convs'),
          ('compile (s)', f'{results["compile_seconds"]:.1f}'),
          (f'train step, no augmentation (img/s, {median})',
           f'{results["train_images_per_second"]:.1f}'),
          ('eval step (img/s, median)', f'{results["eval_images_per_second"]:.1f}')]
  if 'train_augmented_images_per_second' in results:
    rows.append(('train step, augmented on the device (img/s)',
                 f'{results["train_augmented_images_per_second"]:.1f}'))
  if 'decode_images_per_second' in results:
    rows += [('pipeline: decode (img/s)', f'{results["decode_images_per_second"]:.0f}'),
             ('pipeline: cached epoch (img/s)',
              f'{results["cached_epoch_images_per_second"]:.0f}'),
             ('input wait (share of step time)', f'{results["input_wait_fraction"]:.2%}')]
  if 'device_epoch_seconds' in results:
    rows.append((f'device-resident epoch, {results["device_epoch_images"]} img (s)',
                 f'{results["device_epoch_seconds"]:.2f} '
                 f'({results["device_epoch_images_per_second"]:.0f} img/s)'))
    rows.append(('the same through the training loop (s)',
                 f'{results["loop_epoch_seconds"]:.2f} '
                 f'({results["loop_epoch_images_per_second"]:.0f} img/s)'))
  rows.append(('peak host memory (MB)', f'{results["peak_host_megabytes"]:.0f}'))
  if results['peak_device_megabytes'] is not None:
    rows.append(('peak device memory (MB)', f'{results["peak_device_megabytes"]:.0f}'))
  if 'keras_train_images_per_second' in results:
    rows += [(f'Keras train step, {results["keras_optimizer"]} (img/s, {median})',
              f'{results["keras_train_images_per_second"]:.1f}'),
             ('et_flax / Keras', f'{results["ours_over_keras"]:.2f}x')]
  if 'keras_train_augmented_images_per_second' in results:
    rows += [('Keras fed by ImageDataGenerator (img/s)',
              f'{results["keras_train_augmented_images_per_second"]:.1f}'),
             ('et_flax / Keras, augmented', f'{results["augmented_ours_over_keras"]:.2f}x')]
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def main(argv):
  del argv
  config = FLAGS.config
  batch_size = FLAGS.batch_size or config.batch_size
  image_size = FLAGS.image_size or config.data.image_size
  load.parse(FLAGS.load)  # a bad value before any work
  with load.running(FLAGS.load, FLAGS.deterministic):
    results = run(config, batch_size, image_size, FLAGS.steps, FLAGS.warmup, FLAGS.keras,
                  FLAGS.pipeline_images, FLAGS.epoch_images, FLAGS.rounds)
  results['load'] = load.describe(FLAGS.load)
  print(format_table(results))
  if FLAGS.json:
    pathlib.Path(FLAGS.json).write_text(json.dumps(results, indent=1))


def define_flags() -> None:
  config_files.importable()  # the config's `from configs import ...`, from any directory
  config_flags.DEFINE_config_file('config', None, 'A config file with get_config().')
  flags.DEFINE_integer('batch_size', 0, 'Batch size (default: the config\'s).')
  flags.DEFINE_integer('image_size', 0, 'Image side (default: the config\'s).')
  flags.DEFINE_integer('steps', 10, 'Timed steps (the median is reported).')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compiling.')
  flags.DEFINE_bool('keras', True, 'Also time the same model in Keras (TensorFlow).')
  flags.DEFINE_integer('rounds', 1, 'With --keras: time the train steps, ours and Keras\'s, '
                       'again in this many interleaved rounds of --steps each, and report '
                       'those medians (1: no second timing).', lower_bound=1)
  flags.DEFINE_integer('pipeline_images', 10000,
                       'Images in the generated tree for the pipeline (0: skip).')
  flags.DEFINE_integer('epoch_images', 0,
                       'Also time one device-resident epoch of this many random '
                       'images (100000: a Tiny ImageNet epoch).')
  flags.DEFINE_string('json', '', 'Also write the results here.')
  load.define_flag()
  flags.mark_flag_as_required('config')

