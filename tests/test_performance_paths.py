"""The GPU paths, checked on CPU: device-resident data, bfloat16, no retracing."""

import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import counting_split
from helpers import tiny_config
from et_flax import checkpoints
from et_flax import distributed
from et_flax import models
from et_flax import optim
from et_flax import settings
from et_flax import train
from et_flax.cpu import micro_batches
from et_flax.cpu import onednn
from et_flax.data import input_pipeline


def test_device_resident_epochs_equal_the_host_batches():
  split = counting_split(23)
  mesh = distributed.make_mesh()
  device = input_pipeline.DeviceTrainInput(
      split, batch_size=5, seed=3,
      sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
  host = input_pipeline.TrainInput(split, batch_size=5, seed=3)
  assert device.steps_per_epoch == host.steps_per_epoch == 4
  for epoch in (1, 2):
    on_device = list(device.epoch(epoch))
    on_host = list(host.epoch(epoch))
    assert all(isinstance(b['image'], jax.Array) for b in on_device)
    for a, b in zip(on_device, on_host):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
    labels = np.concatenate([b['label'] for b in on_device])
    assert len(set(labels)) == len(labels) == 20  # each example at most once


def test_device_resident_training_equals_host_training(digits_data_dir, tmp_path):
  results = {}
  for resident in (False, True):
    config = tiny_config(digits_data_dir, num_epochs=2)
    config.data.device_resident = resident
    config.augment.preset = 'five'
    workdir = tmp_path / str(resident)
    results[resident] = train.train_and_evaluate(config, str(workdir))
    results[resident, 'params'] = checkpoints.load_variables(workdir, 'latest')
  for key in ('train_loss', 'val_top1_accuracy'):
    assert results[True][key] == results[False][key]
  jax.tree.map(np.testing.assert_array_equal, results[True, 'params'],
               results[False, 'params'])


def test_bfloat16_steps_stay_close_to_float32(digits_data_dir):
  info = input_pipeline.get_dataset_info(tiny_config(digits_data_dir).data)
  split = input_pipeline.load_split(info, 'train')
  batch = next(input_pipeline.TrainInput(split, 64, seed=0).epoch(0))
  losses = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = models.create_model({'name': 'et', 'num_modules': 1}, 10, 8, dtype=dtype)
    state = train.create_train_state(jax.random.key(0), model, 8, optim.create_optimizer(
        {'name': 'adam', 'learning_rate': 3e-3}))
    step = jax.jit(functools.partial(train.train_step,
                                     loss_fn=optim.categorical_crossentropy))
    losses[dtype] = []
    for _ in range(10):
      state, metrics = step(state, batch, jax.random.key(1))
      losses[dtype].append(float(metrics.compute()['loss']))
    # Parameters, and so the optimizer, stay float32.
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    logits = state.apply_fn({'params': state.params}, batch['image'] / 255.0)
    assert logits.dtype == jnp.float32
  # bfloat16 keeps 8 bits of mantissa (relative rounding 2**-8 = 0.004): over
  # 10 steps the loss (about 2.3) may drift by a few hundredths, no more.
  np.testing.assert_allclose(losses[jnp.bfloat16], losses[jnp.float32], atol=0.03)
  assert losses[jnp.bfloat16] != losses[jnp.float32]  # it did compute in bfloat16


def test_compute_dtype_choice():
  from configs import default

  def resolved(name, backend):
    config = default.get_config()
    config.compute_dtype, config.conv_impl = name, 'xla'
    return settings.resolve(config, settings.Platform(backend)).dtype

  assert resolved('auto', 'cpu') == jnp.float32
  assert resolved('auto', 'gpu') == jnp.bfloat16
  assert resolved('float32', 'gpu') == jnp.float32
  assert resolved('bfloat16', 'cpu') == jnp.bfloat16
  with pytest.raises(ValueError, match="compute_dtype must be one of"):
    resolved('float16', 'cpu')


def test_no_recompiles_after_the_first_step(digits_data_dir, tmp_path, monkeypatch):
  traced = chex.assert_max_traces(train.train_step, n=1)
  monkeypatch.setattr(train, 'train_step', traced)
  config = tiny_config(digits_data_dir, num_epochs=3)
  config.augment.preset = 'eight'
  train.train_and_evaluate(config, str(tmp_path))
  chex.clear_trace_counter()


def test_micro_batches_give_the_batch_update(digits_data_dir):
  info = input_pipeline.get_dataset_info(tiny_config(digits_data_dir).data)
  split = input_pipeline.load_split(info, 'train')
  batch = next(input_pipeline.TrainInput(split, 64, seed=0).epoch(0))
  model = models.create_model({'name': 'et', 'num_modules': 1}, 10, 8)
  tx = optim.create_optimizer({'name': 'sgd', 'learning_rate': 0.5, 'momentum': 0.9})
  states = {}
  for micro in (1, 4):
    state = train.create_train_state(jax.random.key(0), model, 8, tx)
    step = jax.jit(functools.partial(train.train_step, micro_batches=micro,
                                     loss_fn=optim.categorical_crossentropy))
    for _ in range(3):
      state, metrics = step(state, batch, jax.random.key(1))
    states[micro] = (state, metrics.compute())
  # The same mean gradient summed in another order: float32 rounding only.
  for a, b in zip(jax.tree.leaves(states[1][0].params), jax.tree.leaves(states[4][0].params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert float(states[1][1]['loss']) == pytest.approx(float(states[4][1]['loss']), rel=1e-5)
  assert float(states[1][1]['top1_accuracy']) == float(states[4][1]['top1_accuracy'])


def test_micro_batch_size_must_divide_the_batch(digits_data_dir, tmp_path):
  config = tiny_config(digits_data_dir, micro_batch_size=24)
  with pytest.raises(ValueError, match="micro_batch_size must be 'auto', 0 .* or divide"):
    train.train_and_evaluate(config, str(tmp_path))


def test_micro_batch_size_auto_and_command_line_values(monkeypatch):
  from configs import default, vgg16_20
  config = default.get_config()
  # The machine 'auto' sees: one CPU device where oneDNN builds, whatever this one is.
  cpu = settings.Platform('cpu', onednn_platform=True)
  monkeypatch.setattr(onednn, 'available', lambda: (True, ''))
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})  # 2 cores

  def micro_batch_size(platform=cpu):
    return settings.resolve(config, platform).micro_batch_size

  assert micro_batch_size() == 16  # oneDNN convolutions: 16 images fit in 4 MiB, the floor
  # A oneDNN call runs a piece of whole images per thread: a part has at
  # least an image per core.
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(32)))
  assert micro_batch_size() == 32
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})
  assert micro_batch_size(settings.Platform('gpu')) == 0  # whole batches on GPUs
  config.conv_impl = 'xla'
  assert micro_batch_size() == 8
  config.conv_impl = 'auto'
  config.model.width = 4  # 1 MiB per image: 4 fit in 4 MiB, but the floor is 16
  assert micro_batch_size() == 16
  config.conv_impl = 'xla'  # 2 MiB and a floor of 8 for XLA's
  assert micro_batch_size() == 8
  config.conv_impl = 'auto'
  config.model.width = 2  # 512 KiB per image: 8 fit in 4 MiB, the floor is 16
  assert micro_batch_size() == 16
  config.model.width = 1
  config.data.image_size = 16  # 32 images fit in 1 MiB: whole batches of 32
  config.batch_size = 32
  assert micro_batch_size() == 0
  config.batch_size = 384  # 256 images fit in 4 MiB; the largest divisor below is 192
  assert micro_batch_size() == 192
  config.data.image_size = 64
  config.batch_size = 6  # the floor, 16, is more than the batch: whole batches
  assert micro_batch_size() == 0
  config.batch_size = 128
  config.model.batch_norm = True
  assert micro_batch_size() == 0  # parts would be normalised apart
  config.micro_batch_size = '32'  # as --config.micro_batch_size=32 arrives
  assert settings.resolve(config, cpu).micro_batches == 4
  config = vgg16_20.get_config()  # 14 images' outputs outweigh the kernels: parts of 16
  assert micro_batch_size() == 16
  config.batch_size = 28  # oneDNN's floor, 16, does not divide 28: whole batches
  assert micro_batch_size() == 0
  config.conv_impl = 'xla'  # XLA's floor is 8: the smallest divisor of 28 from 14 up
  assert micro_batch_size() == 14
  config.conv_impl = 'auto'
  config.batch_size = 8  # fewer images than that: whole batches
  assert micro_batch_size() == 0


def test_kernel_and_output_bytes_by_hand():
  """VGG16's, counted from its definition: 3x3 kernels of 3-64-64 | 128 128 |
  256 x3 | 512 x3 | 512 x3 channels, and each stage's outputs at 64, 32, 16,
  8 and 4 pixels a side; plain E.T. at 16x16 as its config builds it."""
  from configs import default, vgg16_20
  channels = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
  kernels = sum(9 * cin * cout for cin, cout in zip(channels, channels[1:]))
  outputs = (2 * 64 * 64 * 64 + 2 * 32 * 32 * 128 + 3 * 16 * 16 * 256 + 3 * 8 * 8 * 512
             + 3 * 4 * 4 * 512)
  assert micro_batches.kernel_and_output_bytes(vgg16_20.get_config()) == (4 * kernels, 4 * outputs)
  config = default.get_config()
  config.data.image_size = 16
  params = train.init_variables(jax.random.key(0), models.create_model(config.model, 200),
                                16)['params']
  kernel_bytes = sum(4 * leaf.size for path, leaf in models.flatten_params(params).items()
                     if path.endswith('/kernel') and leaf.ndim == 4)
  assert micro_batches.kernel_and_output_bytes(config)[0] == kernel_bytes


def test_micro_batches_hold_one_part_of_activations_at_a_time():
  """The compiled step's scratch memory stays below the whole batch's activations.

  Plain E.T. with one module at 32x32, batch 64 in 8 parts: every conv output
  is 32 * 32 * 16 float32 = 64 KiB per image, and the backward pass keeps the
  7 conv outputs (stem and two blocks of three), 448 KiB per image, 28 MiB for
  the batch. With the parts ordered (`train._after`), one part's 3.5 MiB is
  alive at a time (8.6 MiB of scratch in all, measured); without the order
  XLA:CPU hoists every part's forward pass (61 MiB, measured). The bound is
  half the batch's conv outputs.
  """
  size, batch_size, parts = 32, 64, 8
  model = models.create_model({'name': 'et', 'num_modules': 1}, 10, size)
  tx = optim.create_optimizer({'name': 'adam', 'learning_rate': 1e-3})
  state = jax.eval_shape(lambda: train.create_train_state(jax.random.key(0), model, size,
                                                          tx))
  batch = {'image': jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
           'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
  step = jax.jit(functools.partial(train.train_step, loss_fn=optim.categorical_crossentropy,
                                   micro_batches=parts))
  compiled = step.lower(state, batch, jax.random.key(1)).compile()
  batch_conv_outputs = batch_size * 7 * size * size * 16 * 4
  assert compiled.memory_analysis().temp_size_in_bytes < batch_conv_outputs / 2


def test_device_resident_auto_keeps_the_images_on_an_accelerator_with_room():
  from configs import default
  config = default.get_config()
  config.conv_impl = 'xla'
  gpu = settings.Platform('gpu', device_memory=1000)

  def resident(platform, train_bytes):
    return settings.resolve(config, platform, train_bytes=train_bytes).device_resident

  assert resident(gpu, 499) is True  # under half the device's memory
  assert resident(gpu, 500) is False
  assert resident(gpu, None) is False  # not decoded yet: unknown size
  assert resident(settings.Platform('cpu', device_memory=1000), 10) is False
  assert resident(settings.Platform('gpu', process_count=2, device_memory=1000), 10) is False
  config.data.device_resident = True
  assert resident(settings.Platform('cpu'), None) is True  # explicit: never changed
  with pytest.raises(ValueError, match='device_resident=True works on one host only'):
    resident(settings.Platform('gpu', process_count=2), None)
  config.data.device_resident = 'yes'
  with pytest.raises(ValueError, match="device_resident must be 'auto', True or False"):
    resident(gpu, None)
