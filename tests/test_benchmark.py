"""The benchmark's numbers are consistent with what it times, like for like."""

import importlib
import types

import pytest

from helpers import tiny_config
from et_flax import augment
from et_flax.benchmark import report_models
from et_flax.benchmark import steps as benchmark


def test_benchmark_reports_every_quantity(digits_data_dir):
  config = tiny_config(digits_data_dir)
  config.augment.preset = 'five'
  config.optimizer.update(name='sgd', learning_rate=0.01, momentum=0.9)
  results = benchmark.run(config, batch_size=16, image_size=8, steps=3, warmup=1,
                          keras=True, pipeline_images=400, epoch_images=40)
  assert results['train_images_per_second'] == 16 / results['train_step_seconds']
  assert results['ours_over_keras'] == (results['train_images_per_second']
                                        / results['keras_train_images_per_second'])
  assert results['keras_optimizer'] == 'SGD'  # the config's optimizer on both sides
  assert results['augmented_ours_over_keras'] == (
      results['train_augmented_images_per_second']
      / results['keras_train_augmented_images_per_second'])
  assert results['compile_seconds'] > 0 and results['eval_images_per_second'] > 0
  assert results['pipeline_images'] == 400
  assert 0.0 <= results['input_wait_fraction'] < 1.0
  assert results['cached_epoch_images_per_second'] > 0
  assert results['peak_host_megabytes'] > 100
  assert results['device_epoch_images'] == 32  # two full batches of 16
  assert results['device_epoch_images_per_second'] == 32 / results['device_epoch_seconds']
  table = benchmark.format_table(results)
  assert f'{results["ours_over_keras"]:.2f}x' in table
  assert f'{results["augmented_ours_over_keras"]:.2f}x' in table
  assert 'Keras train step, SGD' in table and 'Keras fed by ImageDataGenerator' in table
  assert 'input wait (share of step time)' in table
  assert 'device-resident epoch, 32 img' in table


@pytest.mark.parametrize('config_name', ['default', 'optimizer_sgd_10', 'optimizer_rmsprop_10'])
def test_keras_side_uses_the_configs_optimizer(config_name):
  config = importlib.import_module(f'configs.{config_name}').get_config()
  optimizer = benchmark.keras_optimizer(config.optimizer)
  fields = dict(config.optimizer)
  assert type(optimizer).__name__.lower() == fields['name']
  if fields['name'] == 'sgd':
    assert (optimizer.momentum, optimizer.nesterov) == (fields['momentum'], fields['nesterov'])
    schedule = optimizer._learning_rate  # pylint: disable=protected-access
    # Keras's decay: lr / (1 + decay * step), as optim's inverse_time.
    assert float(schedule(1000)) == pytest.approx(
        fields['learning_rate'] / (1 + fields['decay'] * 1000), rel=1e-6)
  else:
    assert float(optimizer.learning_rate) == pytest.approx(fields['learning_rate'])
    assert optimizer.epsilon == fields.get('epsilon', 1e-7)


def test_keras_generator_takes_our_ranges():
  config = augment.PRESETS['eight']
  generator = benchmark.keras_image_generator(config)
  assert generator.rotation_range == config.rotation_range == 20.0
  assert (generator.width_shift_range, generator.height_shift_range) == (0.1, 0.1)
  assert generator.shear_range == config.shear_range
  assert list(generator.zoom_range) == [1 - config.zoom_range, 1 + config.zoom_range]
  assert generator.channel_shift_range == config.channel_shift_range
  assert generator.horizontal_flip and generator.vertical_flip
  assert generator.rescale == 1 / 255


def test_interleaved_rounds_take_turns_and_report_those_medians(digits_data_dir,
                                                                  monkeypatch):
  calls = []
  original = benchmark.interleaved_seconds

  def interleaved(timers, steps, rounds):
    seconds = original(
        {name: (lambda name=name, fn=fn: (calls.append(name), fn())[1])
         for name, fn in timers.items()}, steps, rounds)
    return {name: 0.5 if name.startswith('keras') else 0.25 for name in seconds}

  monkeypatch.setattr(benchmark, 'interleaved_seconds', interleaved)
  config = tiny_config(digits_data_dir)
  config.augment.preset = 'five'
  results = benchmark.run(config, batch_size=16, image_size=8, steps=2, warmup=1,
                          keras=True, pipeline_images=0, rounds=3)
  # Each round, every timer in turn for --steps calls.
  one_round = ['train'] * 2 + ['train_augmented'] * 2 + ['keras'] * 2 + ['keras_augmented'] * 2
  assert calls == one_round * 3
  assert results['interleaved_rounds'] == 3
  assert results['train_images_per_second'] == 64 and results['train_step_seconds'] == 0.25
  assert results['keras_train_images_per_second'] == 32
  assert results['ours_over_keras'] == 2.0 and results['augmented_ours_over_keras'] == 2.0
  assert 'median of 3 interleaved rounds' in benchmark.format_table(results)


def test_interleaved_seconds_are_medians_per_timer(monkeypatch):
  clock = iter([0.0, 1.0, 1.0, 4.0, 4.0, 6.0, 6.0, 6.5, 6.5, 9.5, 9.5, 10.0])
  monkeypatch.setattr(benchmark, 'time', types.SimpleNamespace(perf_counter=lambda: next(clock)))
  order = []
  seconds = benchmark.interleaved_seconds(
      {'a': lambda: order.append('a'), 'b': lambda: order.append('b')}, steps=1, rounds=3)
  assert order == ['a', 'b'] * 3
  assert seconds == {'a': 2.0, 'b': 0.5}  # a: 1, 2, 3; b: 3, 0.5, 0.5


def test_report_models_table_goes_between_the_markers(tmp_path):
  row = {'name': 'plain E.T.', 'batch_size': 128, 'keras_optimizer': 'Adam',
         'train_images_per_second': 250.0, 'keras_train_images_per_second': 200.0,
         'ours_over_keras': 1.25, 'train_augmented_images_per_second': 240.0,
         'keras_train_augmented_images_per_second': 120.0, 'augmented_ours_over_keras': 2.0}
  table = report_models.markdown_table([row])
  assert table.splitlines()[2] == ('| plain E.T. | 128 | Adam | 250.0 | 200.0 | 1.25x | 240.0 '
                                   '| 120.0 | 2.00x |')
  docs = tmp_path / 'performance.md'
  start, end = report_models.markers()
  busy_start, busy_end = report_models.markers('busy:1')
  assert (start, end) == ('<!-- REPORT_MODELS start -->', '<!-- REPORT_MODELS end -->')
  assert busy_start == '<!-- REPORT_MODELS busy:1 start -->'
  docs.write_text(f'# P\n{start}\nold\n{end}\n{busy_start}\nold\n{busy_end}\nafter\n')
  report_models.write_docs(table, 'measured so', docs)
  report_models.write_docs(table, 'under load', docs, load_name='busy:1')
  assert docs.read_text() == (f'# P\n{start}\nmeasured so\n\n{table}\n{end}\n'
                              f'{busy_start}\nunder load\n\n{table}\n{busy_end}\nafter\n')
  docs.write_text('no markers')
  with pytest.raises(ValueError, match='no <!-- REPORT_MODELS start -->'):
    report_models.write_docs(table, 'note', docs)
