"""The epoch loop never waits for the devices without need.

The steps of an epoch read nothing back from the devices (the progress bar's
throttled loss aside, which these runs, off a terminal, never show), and the
loop's explicit reads are a fixed few per epoch, however many steps the
epoch has. On a GPU the loop also runs under
`jax.transfer_guard_device_to_host('disallow')`, which raises on any implicit
read; on the CPU, whose arrays live in host memory, the guard is silent, so
the reads are counted where JAX makes them (`ArrayImpl._value`, `__array__`,
`item`: `int()`, `float()`, `bool()`, `.tolist()`, `jax.device_get`).
tests/test_gpu.py runs the same test on a GPU.
"""

import contextlib
import inspect

import jax
import numpy as np
import pytest
from jax._src import array as jax_array

from et_flax import train
from tests.helpers import tiny_config

# Per epoch: the learning rate, the step, the training and the val metrics.
READS_PER_EPOCH = 4


def count_reads_within_steps(monkeypatch) -> list[str]:
  """Every device-to-host read JAX makes while `train.train_epoch` runs."""
  reads, inside = [], []
  value = jax_array.ArrayImpl._value
  monkeypatch.setattr(jax_array.ArrayImpl, '_value', property(
      lambda self: (inside and reads.append('_value'), value.fget(self))[1]))
  for name in ('__array__', 'item'):
    original = getattr(jax_array.ArrayImpl, name)

    def counted(self, *args, _original=original, _name=name, **kwargs):
      if inside:
        reads.append(_name)
      return _original(self, *args, **kwargs)
    monkeypatch.setattr(jax_array.ArrayImpl, name, counted)
  train_epoch = train.train_epoch

  def marked(*args, **kwargs):
    inside.append(True)
    try:
      return train_epoch(*args, **kwargs)
    finally:
      inside.clear()
  monkeypatch.setattr(train, 'train_epoch', marked)
  return reads


def run_counting_reads(config, workdir, monkeypatch):
  """Trains `config` with implicit reads disallowed in the loop; returns the
  summary and the explicit reads made from train.py."""
  reads = []
  device_get = jax.device_get

  def counted(tree):
    caller = inspect.stack()[1]
    if caller.filename == train.__file__:
      reads.append(caller.function)
    return device_get(tree)

  monkeypatch.setattr(train, 'LOOP_TRANSFER_GUARD', 'disallow')
  monkeypatch.setattr(jax, 'device_get', counted)
  summary = train.train_and_evaluate(config, str(workdir))
  return summary, reads


def test_the_epoch_loop_reads_back_a_few_values_per_epoch_only(digits_data_dir, tmp_path,
                                                             monkeypatch):
  config = tiny_config(digits_data_dir, num_epochs=2, checkpoint_every_epochs=1)
  within_steps = count_reads_within_steps(monkeypatch)
  summary, reads = run_counting_reads(config, tmp_path / 'run', monkeypatch)
  steps_per_epoch = 1347 // config.batch_size
  assert summary['step'] == 2 * steps_per_epoch
  assert within_steps == []
  assert len(reads) == 2 * READS_PER_EPOCH < steps_per_epoch, reads
  assert np.isfinite(summary['train_loss'])


def test_an_implicit_read_in_the_loop_is_caught(digits_data_dir, tmp_path, monkeypatch):
  """What the test above relies on: a read of the step after every step (as
  the loop once did) is counted, and raises under the guard on a GPU."""
  within_steps = count_reads_within_steps(monkeypatch)
  step_fn = train.make_steps

  def reading_every_step(*args, **kwargs):
    steps = step_fn(*args, **kwargs)

    def train_step(state, batch, rng):
      state, metrics = steps.train(state, batch, rng)
      int(state.step)
      return state, metrics
    return train.Steps(train=train_step, eval=steps.eval)

  monkeypatch.setattr(train, 'make_steps', reading_every_step)
  config = tiny_config(digits_data_dir)
  guard = (pytest.raises(Exception, match='Disallowed device-to-host transfer')
           if jax.default_backend() == 'gpu' else contextlib.nullcontext())
  with guard:
    run_counting_reads(config, tmp_path / 'run', monkeypatch)
  if jax.default_backend() != 'gpu':
    assert len(within_steps) == 1347 // config.batch_size
