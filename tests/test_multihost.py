"""Multi-process runs: real processes on 127.0.0.1 with JAX's CPU collectives.

Two processes (one CPU device each) train from an empty data cache they
share, against one process on one device; a lost process stops the other;
workdirs move between one and two processes in both directions.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import conftest
from et_flax import checkpoints
from et_flax import evaluate
from et_flax import predict

pytestmark = pytest.mark.slow  # real processes on 127.0.0.1
REPO = pathlib.Path(__file__).resolve().parent.parent
NUM_EPOCHS = 2
HEARTBEAT_SECONDS = 10
TIMING_FIELDS = {'epoch_seconds', 'train_images_per_second', 'input_wait_fraction'}


def _args(workdir, data_dir, num_epochs=NUM_EPOCHS):
  # Augmentation and dropout on: their keys must follow the global batch too.
  return ['--config=configs/quickstart.py', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', '--config.data.image_size=8',
          '--config.model.num_modules=1', '--config.batch_size=64',
          f'--config.num_epochs={num_epochs}', '--config.conv_impl=xla',
          '--config.augment.preset=five', '--config.model.dropout_rate=0.2',
          # tanh, not ReLU: a pre-activation within 1e-9 of a ReLU's kink turns
          # the float32 noise of another summation order into a different
          # gradient, which then grows (seen at step 16 with ReLU here).
          '--config.model.activation=tanh',
          '--config.checkpoint_every_epochs=1',
          # Plain SGD: an update in proportion to the gradient keeps float32
          # noise at its size (Adam turns near-zero gradients into full steps).
          '--config.optimizer.name=sgd', '--config.optimizer.learning_rate=0.1']


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env():
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}
  env.pop('XLA_FLAGS', None)  # one CPU device per process
  return env


class Processes:
  """N processes of `et_flax.main` forming one run; stopped by PID at the end."""

  def __init__(self, log_dir, args, num_processes=2, name='run'):
    port = _free_port()
    self.logs = [pathlib.Path(log_dir) / f'{name}_{i}.log' for i in range(num_processes)]
    self.procs = []
    for i in range(num_processes):
      with self.logs[i].open('w') as log:
        self.procs.append(subprocess.Popen(
            [sys.executable, '-m', 'et_flax.main', *args,
             f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={num_processes}',
             f'--process_id={i}', f'--heartbeat_timeout_seconds={HEARTBEAT_SECONDS}',
             '--initialization_timeout_seconds=120'],
            cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT))

  def wait(self, timeout=300):
    deadline = time.time() + timeout
    codes = []
    for proc in self.procs:
      codes.append(proc.wait(timeout=max(1, deadline - time.time())))
    return codes

  def log(self, i):
    return self.logs[i].read_text()

  def stop(self):
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def _run_processes(log_dir, args, name):
  processes = Processes(log_dir, args, name=name)
  try:
    codes = processes.wait()
  finally:
    processes.stop()
  assert codes == [0, 0], '\n'.join(processes.log(i)[-3000:] for i in range(2))
  return processes


def _history(workdir):
  lines = (pathlib.Path(workdir) / checkpoints.HISTORY_FILE).read_text().splitlines()
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
          for line in lines]


def _final_state(workdir):
  variables, meta = checkpoints.load_checkpoint(workdir, 'latest')
  return meta.epoch, jax.device_get(variables)


def _max_relative_difference(a, b):
  return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope='session')
def runs(tmp_path_factory):
  """A 2-process run from an empty shared data cache, and the same run in one
  process: made once a session, whichever worker asks first."""
  def make(root):
    data_dir = root / 'data'  # empty: both processes find nothing prepared
    two = _run_processes(root, _args(root / 'two', data_dir), 'two')
    one = subprocess.run([sys.executable, '-m', 'et_flax.main',
                          *_args(root / 'one', data_dir)],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    return {'logs': [two.log(0), two.log(1)]}

  root = conftest.shared_folder(tmp_path_factory, 'multihost')
  made = conftest.made_once(tmp_path_factory, 'multihost', make)
  return {'root': root, 'data_dir': root / 'data', 'two': root / 'two', 'one': root / 'one',
          'logs': made['logs']}


def test_two_processes_train_as_one(runs):
  history_two, history_one = _history(runs['two']), _history(runs['one'])
  assert [e['epoch'] for e in history_two] == list(range(1, NUM_EPOCHS + 1))
  # The same batches, augmentation and dropout: only the order of the float32
  # sums differs (per-process partial sums, then Gloo's all-reduce), so the
  # losses and parameters agree to float32 noise over 42 SGD steps.
  for two, one in zip(history_two, history_one):
    for key in ('train_loss', 'val_loss'):
      assert two[key] == pytest.approx(one[key], rel=1e-4), (key, two, one)
    assert two['learning_rate'] == one['learning_rate']
  _, params_two = _final_state(runs['two'])
  _, params_one = _final_state(runs['one'])
  assert _max_relative_difference(params_one, params_two) < 1e-4
  epoch_1, _ = checkpoints.load_checkpoint(runs['one'], 1)
  # The second epoch moved them far more than that.
  assert _max_relative_difference(params_one, jax.device_get(epoch_1)) > 1e-2


def test_two_processes_read_disjoint_halves_and_write_once(runs):
  held = []
  for log in runs['logs']:
    counts = re.findall(r'(\d+) train and (\d+) val images \((\d+) and (\d+) on this host\)',
                        log)
    assert len(counts) == 1, log[-3000:]
    total = (int(counts[0][0]), int(counts[0][1]))
    held.append((int(counts[0][2]), int(counts[0][3])))
  assert total == (1347, 270)
  assert sum(h[0] for h in held) == total[0] and sum(h[1] for h in held) == total[1]
  assert 0 < held[0][0] < total[0]
  # Checkpoints written once, complete, by both processes together.
  for folder, expected in ((checkpoints.LATEST, {'1', '2'}),
                           (checkpoints.BEST, None)):
    names = {p.name for p in (runs['two'] / folder).iterdir()}
    assert not [n for n in names if 'tmp' in n], names
    if expected:
      assert names == expected
  assert len(list(runs['two'].glob('events.out.tfevents.*'))) == 1


def test_a_two_process_workdir_is_evaluated_predicted_and_resumed_by_one(runs, tmp_path):
  report = evaluate.evaluate_run(runs['two'], 'latest', figures=False)
  assert report['epoch'] == NUM_EPOCHS
  # One process evaluates what two trained: the history's validation numbers.
  last = _history(runs['two'])[-1]
  assert report['loss'] == pytest.approx(last['val_loss'], rel=1e-5)
  assert report['top1_accuracy'] == pytest.approx(last['val_top1_accuracy'], abs=1e-6)
  count = predict.write_submission(runs['two'], tmp_path / 'submission.csv',
                                   checkpoint='latest')
  assert count == len((tmp_path / 'submission.csv').read_text().splitlines()) - 1 > 0

  workdir = tmp_path / 'resumed_by_one'
  shutil.copytree(runs['two'], workdir)
  result = subprocess.run(
      [sys.executable, '-m', 'et_flax.main',
       *_args(workdir, runs['data_dir'], num_epochs=NUM_EPOCHS + 1)],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Resuming {workdir} after epoch {NUM_EPOCHS}' in result.stderr
  assert [e['epoch'] for e in _history(workdir)] == list(range(1, NUM_EPOCHS + 2))
  assert _history(workdir)[:NUM_EPOCHS] == _history(runs['two'])


def test_a_one_process_workdir_is_resumed_by_two(runs, tmp_path):
  workdir = tmp_path / 'resumed_by_two'
  shutil.copytree(runs['one'], workdir)
  processes = _run_processes(tmp_path, _args(workdir, runs['data_dir'],
                                             num_epochs=NUM_EPOCHS + 1), 'resume')
  assert f'Resuming {workdir} after epoch {NUM_EPOCHS}' in processes.log(0)
  assert [e['epoch'] for e in _history(workdir)] == list(range(1, NUM_EPOCHS + 2))


def test_a_lost_process_stops_the_other_and_a_restart_resumes_exactly(runs, tmp_path):
  workdir = tmp_path / 'killed'
  processes = Processes(tmp_path, _args(workdir, runs['data_dir']), name='killed')
  try:
    history = workdir / checkpoints.HISTORY_FILE
    deadline = time.time() + 300
    while time.time() < deadline and processes.procs[1].poll() is None:
      if history.exists() and history.read_text().count('\n') >= 1:
        break
      time.sleep(0.05)
    assert processes.procs[1].poll() is None, processes.log(1)[-3000:]
    processes.procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    code = processes.procs[0].wait(timeout=120)
    waited = time.time() - killed_at
  finally:
    processes.stop()
  assert code != 0
  # Within the heartbeat timeout (10 s here, 30 s by default) and its polling.
  assert waited < 60, waited
  assert 'stopped sending heartbeats' in processes.log(0), processes.log(0)[-3000:]

  _run_processes(tmp_path, _args(workdir, runs['data_dir']), 'restarted')
  assert _history(workdir) == _history(runs['two'])
  step_a, state_a = _final_state(runs['two'])
  step_b, state_b = _final_state(workdir)
  assert step_a == step_b == NUM_EPOCHS
  # Bit for bit: the same processes, programs, batches and keys.
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)


def test_two_devices_and_one_device_take_each_others_workdirs(runs, tmp_path):
  def run(workdir, num_epochs, devices):
    env = _env()
    if devices > 1:
      env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
    result = subprocess.run([sys.executable, '-m', 'et_flax.main',
                             *_args(workdir, runs['data_dir'], num_epochs)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

  workdir = tmp_path / 'moving'
  run(workdir, 1, devices=2)
  run(workdir, 2, devices=1)
  run(workdir, 3, devices=2)
  history = _history(workdir)
  assert [e['epoch'] for e in history] == [1, 2, 3]
  # Same batches whatever the device count: the losses follow the 1-process run.
  for moved, one in zip(history, _history(runs['one'])):
    assert moved['train_loss'] == pytest.approx(one['train_loss'], rel=1e-4)
