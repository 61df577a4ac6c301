"""The input-pipeline benchmark measures what it says on a generated tree."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_pipeline_benchmark_writes_its_table_and_json(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'et_flax.benchmark', 'pipeline', f'--workdir={tmp_path}',
       '--num_classes=4', '--train_per_class=5', '--num_val=3', '--batch_size=4',
       '--epochs=2'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
      env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / 'pipeline_benchmark.json').read_text())
  assert results['train_images'] == 20
  assert results['cache_megabytes'] == 20 * 64 * 64 * 3 / 2**20
  assert len(results['epoch_images_per_second']) == 2
  assert 'decode + cache train (once)' in result.stdout
  assert 'read train from the cache (a run)' in result.stdout
  assert results['read_cached_seconds'] > 0
  tree = tmp_path / 'tiny-imagenet-200'
  assert len((tree / 'wnids.txt').read_text().split()) == 4
  assert len((tree / 'val' / 'val_annotations.txt').read_text().splitlines()) == 3
