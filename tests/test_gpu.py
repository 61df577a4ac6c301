"""On a GPU for real: `pytest -m gpu` on a machine with an NVIDIA GPU and JAX's
CUDA build (skipped elsewhere). tools/measure_gpu.sh runs them there, from
digits prepared and decoded elsewhere (ET_FLAX_TEST_DATA_DIR), so that the
GPU machine needs no TensorFlow.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import quickstart
from et_flax import checkpoints
from et_flax import interrupts
from et_flax import train
from tests import test_device_loop
from tests.helpers import tiny_config

pytestmark = pytest.mark.gpu
ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module', autouse=True)
def _on_a_gpu():  # module scope: before `quickstart_runs` trains anything
  if jax.default_backend() != 'gpu':
    pytest.skip("needs an NVIDIA GPU with JAX's CUDA build (pip install -e '.[cuda]')")


@pytest.fixture(scope='module')
def quickstart_runs(tmp_path_factory, digits_data_dir):
  """The quickstart (16x16 digits, 40 epochs) in bfloat16 ('auto' here) and float32."""
  runs = {}
  for dtype in ('auto', 'float32'):
    config = quickstart.get_config()
    config.data.data_dir = str(digits_data_dir)
    config.compute_dtype = dtype
    workdir = tmp_path_factory.mktemp(f'quickstart_{dtype}')
    train.train_and_evaluate(config, str(workdir))
    history = [json.loads(line) for line in
               (workdir / checkpoints.HISTORY_FILE).read_text().splitlines()]
    runs[dtype] = (workdir, max(entry['val_top1_accuracy'] for entry in history))
  return runs


def test_gpu_quickstart_reaches_the_cpus_accuracy(quickstart_runs):
  _, best = quickstart_runs['auto']
  assert best >= 0.95


def test_gpu_bfloat16_and_float32_agree(quickstart_runs):
  assert abs(quickstart_runs['auto'][1] - quickstart_runs['float32'][1]) <= 0.03


def _final_params(workdir):
  return checkpoints.load_variables(workdir, 'latest')['params']


def test_gpu_two_runs_with_one_seed_are_bit_identical(digits_data_dir, tmp_path):
  for name in ('a', 'b'):
    train.train_and_evaluate(tiny_config(digits_data_dir, num_epochs=2), str(tmp_path / name))
  jax.tree.map(np.testing.assert_array_equal, _final_params(tmp_path / 'a'),
               _final_params(tmp_path / 'b'))


def test_gpu_a_run_stopped_by_sigterm_resumes_bit_for_bit(digits_data_dir, tmp_path,
                                                          monkeypatch):
  config = tiny_config(digits_data_dir, num_epochs=2)
  train.train_and_evaluate(config, str(tmp_path / 'whole'))
  original, steps = train.make_steps, []

  def stopping(*args, **kwargs):
    made = original(*args, **kwargs)

    def train_step(state, batch, rng):
      steps.append(1)
      if len(steps) == 30:  # within the second epoch (21 steps an epoch)
        os.kill(os.getpid(), signal.SIGTERM)
      return made.train(state, batch, rng)
    return train.Steps(train=train_step, eval=made.eval)

  monkeypatch.setattr(train, 'make_steps', stopping)
  with pytest.raises(interrupts.TrainingInterrupted):
    train.train_and_evaluate(config, str(tmp_path / 'stopped'))
  monkeypatch.setattr(train, 'make_steps', original)
  train.train_and_evaluate(config, str(tmp_path / 'stopped'))
  jax.tree.map(np.testing.assert_array_equal, _final_params(tmp_path / 'whole'),
               _final_params(tmp_path / 'stopped'))


def test_gpu_checkpoint_evaluates_on_the_cpu_alike(quickstart_runs):
  workdir, _ = quickstart_runs['float32']
  result = subprocess.run(
      [sys.executable, '-m', 'et_flax.evaluate', f'--workdir={workdir}', '--nofigures'],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT)))
  assert result.returncode == 0, result.stderr[-3000:]
  on_cpu = json.loads((workdir / 'eval_val_best.json').read_text())
  history = [json.loads(line) for line in
             (workdir / checkpoints.HISTORY_FILE).read_text().splitlines()]
  on_gpu = next(e for e in history if e['epoch'] == on_cpu['epoch'])
  # float32 on both; XLA's GPU and CPU kernels round apart: one image of 270 at most.
  assert abs(on_cpu['top1_accuracy'] - on_gpu['val_top1_accuracy']) <= 1 / 270 + 1e-6


def test_gpu_the_epoch_loop_reads_back_a_few_values_per_epoch_only(
    digits_data_dir, tmp_path, monkeypatch):
  test_device_loop.test_the_epoch_loop_reads_back_a_few_values_per_epoch_only(
      digits_data_dir, tmp_path, monkeypatch)


def test_gpu_an_implicit_read_in_the_loop_raises(digits_data_dir, tmp_path, monkeypatch):
  test_device_loop.test_an_implicit_read_in_the_loop_is_caught(
      digits_data_dir, tmp_path, monkeypatch)
