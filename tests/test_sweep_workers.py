"""Workers sharing one sweep (et_flax.sweep_workers, reproduce --workers/--worker).

Two workers end with the histories and table of one worker on the same
share of the machine; a worker killed with SIGKILL leaves its run to the
other, which resumes it to the uninterrupted history; two `--worker`
processes started apart train each run once; the cores are split, never
oversubscribed; runs go longest first; a launcher killed outright leaves
each worker one SIGTERM.
"""

import contextlib
import csv
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import made_once
from et_flax import reproduce
from et_flax import sweep_workers

REPO = pathlib.Path(__file__).resolve().parent.parent
RUNS = ('plain_2', 'plain_5', 'hinge_5')
METRICS = ('epoch', 'step', 'train_loss', 'train_top1_accuracy', 'val_loss',
           'val_top1_accuracy', 'val_top5_accuracy', 'learning_rate')
TIMEOUT = 300  # seconds, for any one sweep here
CORES = sorted(os.sched_getaffinity(0))
TWO_CORES = CORES[:2]  # where two workers run, a core each
two_cores = pytest.mark.skipif(len(CORES) < 2, reason='two workers need two cores')


def _metrics(run_dir):
  lines = (pathlib.Path(run_dir) / 'history.jsonl').read_text().splitlines()
  return [{k: json.loads(line)[k] for k in METRICS} for line in lines]


def _table(sweep):
  """reproduction.csv without its timing column."""
  rows = list(csv.DictReader((sweep / f'{reproduce.TABLE}.csv').open()))
  return [{k: v for k, v in row.items() if k != 'seconds_per_epoch'} for row in rows]


def _status(sweep):
  return json.loads((sweep / reproduce.STATUS_FILE).read_text())['runs']


def _command(sweep, runs, data_dir, *extra, **overrides):
  overrides = {'data.data_dir': data_dir, **overrides}
  return [sys.executable, '-m', 'et_flax.reproduce', f'--workdir={sweep}', '--quick',
          f'--only={",".join(runs)}', '--evaluate=false', *extra,
          *(f'--config.{key}={value}' for key, value in overrides.items())]


def _one_worker_share():
  """What a worker of two gets here (its cores, OpenMP's team): a run's bits
  follow its team of threads, so one worker compares on the same share."""
  share = sweep_workers.worker_environments(2, gpus=[], cores=TWO_CORES)[0]
  return {k: v for k, v in share.items() if k != sweep_workers.WORKER_ENV}


def _on_two_cores(command):
  return ['taskset', '-c', ','.join(map(str, TWO_CORES)), *command]


def _sweep(command, env=None, timeout=TIMEOUT, **kwargs):
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False,
                          timeout=timeout, env={**os.environ, **(env or {})}, **kwargs)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope='module')
def one_worker(digits_data_dir, tmp_path_factory):
  """RUNS swept by one worker on one worker's share of the cores."""
  def make(folder):
    _sweep(_command(folder / 'sweep', RUNS, digits_data_dir), env=_one_worker_share())
    return str(folder / 'sweep')
  return pathlib.Path(made_once(tmp_path_factory, 'one_worker_sweep', make))


def _stop(processes):
  for process in processes:
    if process.poll() is None:
      os.kill(process.pid, signal.SIGKILL)
      process.wait(timeout=60)


def test_the_cores_are_split_and_never_oversubscribed():
  for cores in ([0], [0, 1], [0, 1, 2], list(range(2, 18)), [0, 3, 5, 6, 7, 9, 12]):
    for workers in range(1, len(cores) + 1):
      environments = sweep_workers.worker_environments(workers, gpus=[], cores=cores)
      shares = [sweep_workers.parse_core_list(e[sweep_workers.CORES_ENV])
                for e in environments]
      assert sorted(sum(shares, [])) == sorted(cores), (cores, workers)  # each core once
      assert [int(e['OMP_NUM_THREADS']) for e in environments] == [len(s) for s in shares]
      assert min(map(len, shares)) >= max(map(len, shares)) - 1 >= 0
      assert [e[sweep_workers.WORKER_ENV] for e in environments] == [
          f'{i}/{workers}' for i in range(1, workers + 1)]
  with pytest.raises(ValueError, match='gives this process 2 CPU cores'):
    sweep_workers.worker_environments(3, gpus=[], cores=[0, 1])
  with pytest.raises(ValueError, match='no GPU is visible'):
    sweep_workers.worker_environments(2, gpus=[], cores=[0, 1], workers_per_device=2)


def test_gpus_go_one_worker_each_or_shared_with_their_memory():
  one_each = sweep_workers.worker_environments(2, gpus=['3', '5'], cores=[0])
  assert [e['CUDA_VISIBLE_DEVICES'] for e in one_each] == ['3', '5']
  assert not any('XLA_PYTHON_CLIENT_MEM_FRACTION' in e for e in one_each)
  shared = sweep_workers.worker_environments(3, gpus=['0', '1'], cores=[0],
                                             workers_per_device=2)
  assert [e['CUDA_VISIBLE_DEVICES'] for e in shared] == ['0', '0', '1']
  assert [e.get('XLA_PYTHON_CLIENT_MEM_FRACTION') for e in shared] == ['0.375', '0.375',
                                                                       None]
  with pytest.raises(ValueError, match='2 GPUs here take at most 2 workers'):
    sweep_workers.worker_environments(3, gpus=['0', '1'], cores=[0])
  assert sweep_workers.visible_gpus({'CUDA_VISIBLE_DEVICES': '2,7'}) == ['2', '7']
  assert sweep_workers.visible_gpus({'JAX_PLATFORMS': 'cpu',
                                     'CUDA_VISIBLE_DEVICES': '0'}) == []


def test_runs_go_longest_first_and_the_schedule_of_n_workers():
  names = ['plain_2', 'plain_5', 'deep_5', 'wide_5', 'resnet50_20', 'vgg16_20']
  configs = {n: reproduce.experiment_config(n) for n in names}
  rough = sweep_workers.expected_seconds(configs, None, quick=False)
  assert sorted(names, key=lambda n: -rough[n]) == [
      'vgg16_20', 'resnet50_20', 'wide_5', 'deep_5', 'plain_5', 'plain_2']
  # Quick mode: the same epochs, VGG16 and ResNet50 at 32x32, E.T. at 8x8.
  quick = {n: reproduce.experiment_config(n, quick=True) for n in names}
  quick_seconds = sweep_workers.expected_seconds(quick, None, quick=True)
  assert min(quick_seconds['vgg16_20'], quick_seconds['resnet50_20']) > max(
      quick_seconds[n] for n in ('plain_2', 'plain_5', 'wide_5', 'deep_5'))
  # Saved rates win; a run without one is scaled by those that have one.
  saved = {'plain_2': {'epoch_seconds': 1000.0}, 'wide_5': {'epoch_seconds': 1.0}}
  seconds = sweep_workers.expected_seconds(configs, saved, quick=False)
  assert seconds['plain_2'] == 1000.0 * configs['plain_2'].num_epochs
  assert seconds['wide_5'] == 1.0 * configs['wide_5'].num_epochs
  ratio = max(seconds[n] / rough[n] for n in saved)  # the upper median of two
  assert seconds['vgg16_20'] == pytest.approx(rough['vgg16_20'] * ratio, rel=1e-12)
  # Longest first over 2 workers: 5 | 4, then 3 to the 4, 3 to the 5, 3 to the 7.
  assert sweep_workers.schedule_seconds([3, 5, 3, 4, 3], 2) == 10
  assert sweep_workers.schedule_seconds([3, 5, 3, 4, 3], 1) == 18
  assert sweep_workers.schedule_seconds([3, 5], 4) == 5


def test_the_workers_get_the_launchers_arguments_but_the_worker_count():
  assert reproduce._worker_argv(  # pylint: disable=protected-access
      ['--workdir=w', '--workers=2', '--quick', '--workers', '3', '--workers_per_device=2',
       '--only=plain_2']) == ['--workdir=w', '--quick', '--only=plain_2']


@pytest.mark.parametrize('args, message', [
    (['--workers=0'], 'error: --workers=0: give the number of worker processes'),
    (['--worker', '--workers=2'], 'error: --worker is one worker'),
    (['--workers_per_device=2'], 'error: --workers_per_device shares each GPU'),
    (['--worker', '--estimate'], 'error: --estimate trains nothing'),
    ([f'--workers={len(CORES) + 1}'], f'error: --workers={len(CORES) + 1}: this machine'),
])
def test_bad_worker_flags_are_one_error_line(run_command, tmp_path, args, message):
  code, _, stderr = run_command('et_flax.reproduce', f'--workdir={tmp_path / "w"}',
                                '--quick', *args)
  assert code == 1 and stderr.startswith(message), stderr
  assert len(stderr.splitlines()) == 1, stderr
  assert not (tmp_path / 'w').exists()


@two_cores
def test_two_workers_end_with_the_histories_and_table_of_one(one_worker, digits_data_dir,
                                                             tmp_path):
  sweep = tmp_path / 'sweep'
  result = _sweep(_on_two_cores(_command(sweep, RUNS, digits_data_dir, '--workers=2')))
  status = _status(sweep)
  assert {status[n]['status'] for n in RUNS} == {'done'}
  assert {status[n]['worker'] for n in RUNS} == {'1/2', '2/2'}  # both worked
  for name in RUNS:
    assert _metrics(sweep / name) == _metrics(one_worker / name), name
    log = (sweep / name / 'log.txt').read_text()
    assert log.count('Worker ') == 1 and f'Worker {status[name]["worker"]} (PID' in log
    assert re.search(r'CPU cores \d+ \(1\), OMP_NUM_THREADS=1', log), log  # its own core
  assert _table(sweep) == _table(one_worker)
  assert (sweep / reproduce.FIGURE).stat().st_size > 0
  assert 'Runs longest first, by epochs x images x model cost (quick mode)' in result.stderr
  assert '3 of 3 runs done' in result.stderr.splitlines()[-1]


@two_cores
def test_two_workers_started_apart_share_the_sweep(one_worker, digits_data_dir, tmp_path):
  """`--worker` twice, by hand: each run trained once, by one of them."""
  sweep = tmp_path / 'sweep'
  shares = sweep_workers.worker_environments(2, gpus=[], cores=TWO_CORES)
  processes = []
  try:
    for index, share in enumerate(shares):
      share = {k: v for k, v in share.items() if k != sweep_workers.WORKER_ENV}
      with (tmp_path / f'{index}.err').open('wb') as err:
        processes.append(subprocess.Popen(
            _command(sweep, RUNS, digits_data_dir, '--worker'), cwd=REPO,
            env={**os.environ, **share}, stdout=subprocess.DEVNULL, stderr=err))
      time.sleep(1)  # apart
    codes = [process.wait(timeout=TIMEOUT) for process in processes]
  finally:
    _stop(processes)
  assert codes == [0, 0], [(tmp_path / f'{i}.err').read_text()[-2000:] for i in (0, 1)]
  status = _status(sweep)
  pids = {process.pid for process in processes}
  for name in RUNS:
    assert status[name]['status'] == 'done' and status[name]['pid'] in pids, name
    log = (sweep / name / 'log.txt').read_text()
    assert log.count('Worker PID ') == 1 and 'Resuming' not in log, name
    assert _metrics(sweep / name) == _metrics(one_worker / name), name
  assert _table(sweep) == _table(one_worker)


@two_cores
def test_a_killed_workers_run_is_resumed_by_another(digits_data_dir, tmp_path):
  """SIGKILL to the worker training hinge_5 once it saved epoch 1: the other
  worker, waiting, takes the run over and ends it as an uninterrupted run."""
  sweep, reference = tmp_path / 'sweep', tmp_path / 'reference'
  # Batches of 8: epochs of 83 steps, long enough to kill the run within.
  overrides = {'num_epochs': 6, 'batch_size': 8}
  _sweep(_command(reference, ['hinge_5'], digits_data_dir, **overrides),
         env=_one_worker_share())
  command = _on_two_cores(_command(sweep, ['hinge_5'], digits_data_dir, '--workers=2',
                                  **overrides))
  processes, killed = [], None
  try:
    with (tmp_path / 'launcher.err').open('wb') as err:
      launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    processes.append(launcher)
    deadline = time.monotonic() + TIMEOUT
    while not (sweep / 'hinge_5' / 'checkpoints' / '1').is_dir():
      assert launcher.poll() is None, (tmp_path / 'launcher.err').read_text()[-3000:]
      assert time.monotonic() < deadline, 'timed out waiting for epoch 1'
      time.sleep(0.02)
    killed = sweep_workers.holder_of(sweep, 'hinge_5')['pid']
    os.kill(killed, signal.SIGKILL)
    assert _status(sweep)['hinge_5']['status'] == 'running', 'killed too late'
    assert launcher.wait(timeout=TIMEOUT) == 0, (tmp_path / 'launcher.err').read_text()[-3000:]
  finally:
    _stop(processes)
    if killed is not None:
      with contextlib.suppress(ProcessLookupError):
        os.kill(killed, signal.SIGKILL)
  errors = (tmp_path / 'launcher.err').read_text()
  assert 'was killed by SIGKILL' in errors
  status = _status(sweep)['hinge_5']
  assert status['status'] == 'done' and status['pid'] != killed
  log = (sweep / 'hinge_5' / 'log.txt').read_text()
  assert f'(PID {killed} on' in log and f'(PID {status["pid"]} on' in log
  assert f'Resuming {sweep / "hinge_5"}' in log
  assert _metrics(sweep / 'hinge_5') == _metrics(reference / 'hinge_5')
  assert len(_metrics(reference / 'hinge_5')) == overrides['num_epochs']


WORKER = """
import os, pathlib, signal, sys, time
from et_flax import sweep_workers
out = pathlib.Path(sys.argv[1]) / os.environ[sweep_workers.WORKER_ENV].split('/')[0]
signals = []

def stopped(signum, frame):
  signals.append(signal.Signals(signum).name)

signal.signal(signal.SIGTERM, stopped)
sweep_workers.stop_with_launcher()
out.with_suffix('.pid').write_text(str(os.getpid()))
deadline = time.monotonic() + 120
while not signals and time.monotonic() < deadline:
  time.sleep(0.05)
time.sleep(3)  # time for a second signal
out.with_suffix('.stopped').write_text(' '.join(signals))
"""
LAUNCHER = """
import sys
from et_flax import sweep_workers
sweep_workers.launch([sys.executable, '-c', sys.argv[1], sys.argv[2]],
                     [{sweep_workers.WORKER_ENV: '1/2'}, {sweep_workers.WORKER_ENV: '2/2'}])
"""


def test_workers_stop_when_their_launcher_is_killed(tmp_path):
  """SIGKILL to the launcher: each worker gets one SIGTERM (and so saves
  and stops; a second would stop it without saving) rather than train on
  alone."""
  launcher = subprocess.Popen([sys.executable, '-c', LAUNCHER, WORKER, str(tmp_path)], cwd=REPO)
  pid_files = [tmp_path / '1.pid', tmp_path / '2.pid']
  pids = []
  try:
    deadline = time.monotonic() + 60
    while not all(p.exists() and p.read_text() for p in pid_files):
      assert time.monotonic() < deadline and launcher.poll() is None, 'the workers did not start'
      time.sleep(0.1)
    pids = [int(p.read_text()) for p in pid_files]
    launcher.kill()
    launcher.wait(timeout=30)
    stopped = [tmp_path / '1.stopped', tmp_path / '2.stopped']
    deadline = time.monotonic() + 30
    for pid in pids:
      while _alive(pid):
        assert time.monotonic() < deadline, 'a worker outlived its launcher'
        time.sleep(0.1)
    assert [p.read_text() for p in stopped] == ['SIGTERM', 'SIGTERM']
  finally:
    if launcher.poll() is None:
      launcher.kill()
      launcher.wait(timeout=30)
    for pid in pids:
      with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  stat = pathlib.Path(f'/proc/{pid}/stat')
  if not pathlib.Path('/proc').is_dir():
    return True
  try:  # an orphan that has exited but not yet been reaped counts as gone
    return stat.read_text().rsplit(') ', 1)[1][0] != 'Z'
  except FileNotFoundError:
    return False
