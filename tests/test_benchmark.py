"""The benchmark's numbers are consistent with what it times."""

from helpers import tiny_config
from et_flax.benchmark import steps as benchmark


def test_benchmark_reports_every_quantity(digits_data_dir):
  config = tiny_config(digits_data_dir)
  results = benchmark.run(config, batch_size=16, image_size=8, steps=3, warmup=1,
                          keras=True, pipeline_images=400, epoch_images=40)
  assert results['train_images_per_second'] == 16 / results['train_step_seconds']
  assert results['ours_over_keras'] == (results['train_images_per_second']
                                        / results['keras_train_images_per_second'])
  assert results['compile_seconds'] > 0 and results['eval_images_per_second'] > 0
  assert results['pipeline_images'] == 400
  assert 0.0 <= results['input_wait_fraction'] < 1.0
  assert results['cached_epoch_images_per_second'] > 0
  assert results['peak_host_megabytes'] > 100
  assert results['device_epoch_images'] == 32  # two full batches of 16
  assert results['device_epoch_images_per_second'] == 32 / results['device_epoch_seconds']
  table = benchmark.format_table(results)
  assert f'{results["ours_over_keras"]:.2f}x' in table
  assert 'input wait (share of step time)' in table
  assert 'device-resident epoch, 32 img' in table
