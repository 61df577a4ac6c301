"""The whole report in one command (et_flax.reproduce, et_flax.report.findings).

Every experiment config trains in quick mode; a failing run is recorded and
the sweep goes on; a sweep killed (SIGKILL) and stopped (SIGTERM) mid-run
resumes to the history of an uninterrupted run; the table and the report's
findings from hand-made histories.
"""

import csv
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from et_flax.report import findings
from et_flax import models
from et_flax import reproduce
from et_flax import train
from et_flax.cpu import onednn

REPO = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENT_CONFIGS = sorted(p.stem for p in (REPO / 'configs').glob('*.py')
                            if p.stem not in ('__init__', 'default', 'quickstart'))
# What each epoch's numbers are; the rest of a history entry is timing.
METRICS = ('epoch', 'step', 'train_loss', 'train_top1_accuracy', 'val_loss',
           'val_top1_accuracy', 'val_top5_accuracy', 'learning_rate')


def _history(workdir):
  path = pathlib.Path(workdir) / 'history.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines()]


def _metrics(history):
  return [{k: entry[k] for k in METRICS} for entry in history]


def _status(sweep):
  return json.loads((sweep / reproduce.STATUS_FILE).read_text())['runs']


def test_every_experiment_config_is_in_the_sweep_and_selected_by_its_flags():
  assert sorted(findings.BY_NAME) == EXPERIMENT_CONFIGS
  groups = {e.name: e.group for e in findings.EXPERIMENTS}
  names = lambda **flags: [e.name for e in reproduce.select_experiments(**flags)]
  assert names() == [n for n, g in groups.items() if g == findings.REPORT]
  assert set(names(future_work=True)) - set(names()) == {
      n for n, g in groups.items() if g == findings.FUTURE_WORK}
  assert set(names(pretrained=True)) - set(names()) == {
      n for n, g in groups.items() if g == findings.PRETRAINED}
  # --only keeps the report's order and takes any group.
  assert names(only=['tanh_200', 'wide_5', 'plain_2']) == ['plain_2', 'wide_5', 'tanh_200']
  with pytest.raises(ValueError, match='--only names no experiment: wide_3'):
    reproduce.select_experiments(only=['wide_5', 'wide_3'])


def test_quick_configs_take_the_digits_at_a_size_each_model_takes():
  for name in EXPERIMENT_CONFIGS:
    full = reproduce.experiment_config(name)
    quick = reproduce.experiment_config(name, quick=True)
    assert (quick.data.name, quick.num_epochs) == ('digits', reproduce.QUICK_EPOCHS), name
    size = {'et': 8, 'vgg16': 32, 'resnet50': 32}[quick.model.name]
    assert quick.data.image_size == size, name
    # The subsets of 2 and 5 classes stay; 10, 20 and 200 become the 10 digits.
    assert quick.data.classes == (full.data.classes if full.data.classes in (2, 5) else 0)
    assert quick.model == full.model and quick.optimizer == full.optimizer, name
    models.create_model(quick.model, quick.data.classes or 10, size)  # takes the size


def test_overrides_set_every_run_and_a_field_a_config_lacks_fails_that_config():
  overrides = {'data.data_dir': '/data/t', 'num_epochs': 3, 'model.width': 2}
  config = reproduce.experiment_config('plain_5', overrides=overrides)
  assert (config.data.data_dir, config.num_epochs, config.model.width) == ('/data/t', 3, 2)
  with pytest.raises(ValueError, match='--config.model.width: configs/vgg16_20.py has no '
                     'field model.width'):
    reproduce.experiment_config('vgg16_20', overrides=overrides)


def test_a_sweep_of_the_other_mode_is_refused(tmp_path):
  reproduce.SweepStatus(tmp_path, quick=True)
  with pytest.raises(ValueError, match='holds a quick sweep: rerun with --quick'):
    reproduce.SweepStatus(tmp_path, quick=False)


@pytest.mark.slow
@pytest.mark.first
def test_quick_mode_trains_every_config(digits_data_dir, tmp_path, monkeypatch):
  """Each config, 1 epoch on 2 digit classes: a finite loss; the outputs say quick."""
  # No Keras ImageNet weights under this HOME: the pretrained runs fail, recorded.
  monkeypatch.setenv('ET_FLAX_CACHE', str(onednn.cache_dir()))
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  sweep = tmp_path / 'sweep'
  summary = reproduce.run_sweep(
      sweep, findings.EXPERIMENTS, quick=True, evaluate_runs=False,
      overrides={'data.data_dir': str(digits_data_dir), 'data.classes': 2, 'num_epochs': 1})
  status = _status(sweep)
  for experiment in findings.EXPERIMENTS:
    name = experiment.name
    if experiment.group == findings.PRETRAINED:
      assert status[name]['status'] == 'failed', name
      assert 'weights_tf_dim_ordering_tf_kernels_notop.h5' in status[name]['message']
      continue
    assert status[name]['status'] == 'done', (name, status[name])
    history = _history(sweep / name)
    assert [entry['epoch'] for entry in history] == [1], name
    assert math.isfinite(history[0]['train_loss']), name
    assert math.isfinite(history[0]['val_loss']), name

  markdown = summary.table.read_text()
  assert '**Quick mode**' in markdown and '1 epoch.' in markdown
  assert '24 done, 4 failed of 28 runs' in markdown
  for experiment in findings.EXPERIMENTS:
    assert f'| {experiment.name} | {experiment.what} |' in markdown
  rows = list(csv.DictReader(summary.table.with_suffix('.csv').open()))
  assert [row['run'] for row in rows] == [e.name for e in findings.EXPERIMENTS]
  assert {row['mode'] for row in rows} == {'quick'}
  assert {row['gap_top1'] for row in rows} == {''}  # quick mode: in kind only
  assert (sweep / reproduce.FIGURE).stat().st_size > 0
  # Every finding was tested, but those that need a pretrained run.
  verdicts = {claim['finding']: claim['verdict'] for claim in summary.claims}
  assert len(verdicts) == len(findings.CLAIMS)
  for claim in findings.CLAIMS:
    pretrained = any(findings.BY_NAME[run].group == findings.PRETRAINED for run in claim.runs)
    assert (verdicts[claim.finding] == findings.INCOMPLETE) == pretrained, claim.finding


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_others_go_on(digits_data_dir, tmp_path,
                                                        monkeypatch):
  real_config = reproduce.experiment_config

  def exploding(name, quick=False, overrides=None):
    config = real_config(name, quick, overrides)
    if name == 'plain_2':
      config.optimizer.learning_rate = 1e38  # a non-finite loss in epoch 1
    return config

  monkeypatch.setattr(reproduce, 'experiment_config', exploding)
  sweep = tmp_path / 'sweep'
  experiments = [findings.BY_NAME[n] for n in ('plain_2', 'vgg16_20', 'hinge_5')]
  overrides = {'data.data_dir': str(digits_data_dir), 'num_epochs': 1}
  summary = reproduce.run_sweep(sweep, experiments, quick=True,
                                overrides={**overrides, 'model.width': 1})
  status = _status(sweep)
  assert status['plain_2']['status'] == 'failed'
  assert status['plain_2']['message'].startswith('Training loss is nan in epoch 1')
  assert status['vgg16_20'] == {**status['vgg16_20'], 'status': 'failed', 'message':
                                '--config.model.width: configs/vgg16_20.py has no field '
                                'model.width'}
  assert status['hinge_5']['status'] == 'done'
  report = json.loads((sweep / 'hinge_5' / 'eval_val_best.json').read_text())
  assert report['top1_accuracy'] == pytest.approx(  # float64 vs the history's float32
      _history(sweep / 'hinge_5')[0]['val_top1_accuracy'], abs=1e-7)
  assert (sweep / 'hinge_5' / 'curves.png').exists()
  markdown = summary.table.read_text()
  assert '## Failed runs' in markdown
  assert '- `vgg16_20`: --config.model.width: configs/vgg16_20.py has no field' in markdown
  assert '| hinge_5 | categorical hinge, 5 classes | done | 5 | 1 | 1 |' in markdown

  # Run again, fixed: the failed run is tried again, the finished one skipped.
  monkeypatch.setattr(reproduce, 'experiment_config', real_config)
  finished = (sweep / 'hinge_5' / 'history.jsonl').stat().st_mtime_ns
  reproduce.run_sweep(sweep, [experiments[0], experiments[2]], quick=True,
                      overrides=overrides, evaluate_runs=False)
  status = _status(sweep)
  assert status['plain_2']['status'] == 'done' and status['hinge_5']['status'] == 'done'
  assert (sweep / 'hinge_5' / 'history.jsonl').stat().st_mtime_ns == finished


def _wait_for(condition, process, timeout, what):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if condition():
      return
    if process.poll() is not None:
      raise AssertionError(f'the sweep ended (exit {process.returncode}) before {what}')
    time.sleep(0.02)
  raise AssertionError(f'timed out waiting for {what}')


@pytest.mark.first
@pytest.mark.slow
def test_a_killed_and_stopped_sweep_resumes_to_the_uninterrupted_history(
    digits_data_dir, tmp_path):
  """SIGKILL in the second run, then SIGTERM in it once resumed, then a rerun."""
  sweep = tmp_path / 'sweep'
  # Batches of 8: epochs of 83 steps, long enough to stop the run within.
  overrides = {'data.data_dir': str(digits_data_dir), 'num_epochs': 8, 'batch_size': 8}
  command = [sys.executable, '-m', 'et_flax.reproduce', f'--workdir={sweep}', '--quick',
             '--only=plain_2,hinge_5', '--evaluate=false',
             *(f'--config.{key}={value}' for key, value in overrides.items())]
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}
  processes = []

  def start(name):
    with (tmp_path / f'{name}.out').open('wb') as out, \
         (tmp_path / f'{name}.err').open('wb') as err:
      process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err)
    processes.append(process)
    return process

  def hinge_epochs():
    path = sweep / 'hinge_5' / 'history.jsonl'
    return len(path.read_text().splitlines()) if path.exists() else 0

  try:
    # SIGKILL once plain_2 is done and hinge_5 has saved an epoch.
    first = start('first')
    _wait_for(lambda: (sweep / 'hinge_5' / 'checkpoints' / '1').is_dir(), first, 240,
              'hinge_5 saved epoch 1')
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    status = _status(sweep)
    assert status['plain_2']['status'] == 'done'
    assert status['hinge_5']['status'] == 'running', 'killed too late: hinge_5 ended'
    plain_2_history = (sweep / 'plain_2' / 'history.jsonl').stat().st_mtime_ns
    killed_at = hinge_epochs()

    # SIGTERM once the resumed run has finished another epoch: saved, exit 143.
    second = start('second')
    _wait_for(lambda: 'Resuming' in (tmp_path / 'second.err').read_text()
              and hinge_epochs() > killed_at, second, 240,
              'hinge_5 resumed and finished an epoch')
    time.sleep(0.2)  # into the next epoch, most likely
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=120) == 128 + signal.SIGTERM
    errors = (tmp_path / 'second.err').read_text()
    assert '[1/2] plain_2: done, skipped' in errors
    status = _status(sweep)
    assert status['hinge_5']['status'] == 'interrupted', status['hinge_5']
    assert status['hinge_5']['message'].startswith('Stopped by SIGTERM after step')
    assert status['hinge_5']['message'] in errors

    third = start('third')
    assert third.wait(timeout=240) == 0, (tmp_path / 'third.err').read_text()[-3000:]
  finally:
    for process in processes:
      if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)

  status = _status(sweep)
  assert status['plain_2']['status'] == status['hinge_5']['status'] == 'done'
  assert (sweep / 'plain_2' / 'history.jsonl').stat().st_mtime_ns == plain_2_history
  errors = (tmp_path / 'third.err').read_text()
  assert '[1/2] plain_2: done, skipped' in errors
  # From hinge_5's checkpoints, not from scratch: its first epochs are not run again.
  assert f'Resuming {sweep / "hinge_5"}' in errors
  assert 'epoch 1/8:' not in errors and 'epoch 8/8:' in errors
  reference = tmp_path / 'reference'
  train.train_and_evaluate(
      reproduce.experiment_config('hinge_5', quick=True, overrides=overrides), reference)
  assert len(_history(reference)) == overrides['num_epochs']
  assert _metrics(_history(sweep / 'hinge_5')) == _metrics(_history(reference))


# ---------------------------------------------------------------------------
# The table and the findings, from hand-made runs.

def _run(name, top1s, status='done', seconds=1.0, train_top1=0.5, classes=5):
  history = [{'epoch': i + 1, 'val_top1_accuracy': top1, 'val_top5_accuracy': 1.0,
              'train_top1_accuracy': train_top1, 'epoch_seconds': seconds}
             for i, top1 in enumerate(top1s)]
  return findings.RunResult(name, status, '', classes, history)


def _verdicts(*runs):
  checked = findings.check_claims({run.name: run for run in runs})
  return {claim['finding']: (claim['verdict'], claim['ours']) for claim in checked}


def test_the_table_puts_the_best_epoch_beside_the_report():
  runs = [_run('dropout_5', [0.5, 0.75, 0.7], seconds=3.0),
          _run('vgg16_20', [0.6], classes=20), _run('deep_5', [], status='failed')]
  runs[1].history[0]['val_top5_accuracy'] = 0.9
  rows = {row['run']: row for row in findings.table_rows(runs)}
  assert rows['dropout_5']['top1'] == 0.75 and rows['dropout_5']['best_epoch'] == 2
  assert rows['dropout_5']['gap_top1'] == pytest.approx(0.75 - 0.72)
  assert rows['dropout_5']['seconds_per_epoch'] == 3.0
  assert rows['vgg16_20']['report_top5'] == 0.854  # compare.REPORT_RESULTS's
  assert rows['vgg16_20']['gap_top5'] == pytest.approx(0.9 - 0.854)
  assert rows['deep_5']['top1'] is None and rows['deep_5']['status'] == 'failed'
  quick = {row['run']: row for row in findings.table_rows(runs, quick=True)}
  assert quick['dropout_5']['gap_top1'] is None and quick['dropout_5']['top1'] == 0.75
  markdown = findings.table_markdown(findings.table_rows(runs))
  assert '| dropout_5 | dropout 0.5, 5 classes | done | 5 | 3 | 2 | 0.750 | 0.720 | +0.030 |' \
      in markdown


def test_the_findings_follow_the_numbers():
  plain = _run('plain_5', [0.66, 0.60], seconds=11)
  verdicts = _verdicts(plain, _run('dropout_5', [0.5, 0.72], seconds=11),
                       _run('stride2_5', [0.70]))
  assert verdicts['Dropout 0.5 before the last Dense helps on 5 classes'] == (
      findings.AGREES, 'dropout_5 0.720, plain_5 0.660')
  assert verdicts['With dropout the model converges later'][0] == findings.AGREES
  assert verdicts['A stride-2 max-pool after the stem hurts'] == (
      findings.DISAGREES, 'plain_5 0.660, stride2_5 0.700')
  # Findings whose runs are not all in the sweep are left out.
  assert 'The 8 augmentations help on 5 classes' not in verdicts
  # A run that is not done leaves its findings incomplete.
  verdicts = _verdicts(plain, _run('wide_5', [], status='failed'))
  assert verdicts['Width (k=2) helps on 5 classes'] == (findings.INCOMPLETE,
                                                        'wide_5 failed')
  rmsprop = _run('optimizer_rmsprop_10', [0.1, 0.12], train_top1=0.49, classes=10)
  assert _verdicts(rmsprop)[
      'RMSprop 1e-3 cannot train E.T.: validation accuracy stays at chance'][0] == (
          findings.AGREES)
  rmsprop = _run('optimizer_rmsprop_10', [0.1, 0.4], classes=10)
  assert _verdicts(rmsprop)[
      'RMSprop 1e-3 cannot train E.T.: validation accuracy stays at chance'][0] == (
          findings.DISAGREES)


def test_estimate_is_the_runs_epochs_at_the_timed_rates(monkeypatch):
  """Each run's hours from its timed steps, by hand: plain_2 has 2 classes,
  so 1,000 training images (batches of its batch size, the last partial one
  dropped) and 100 validation images an epoch."""
  from et_flax.benchmark import steps as benchmark  # pylint: disable=import-outside-toplevel
  timed = []

  def fake_time_steps(config, settings, batch_size, image_size, num_classes, steps, warmup,
                      augment_config):
    timed.append((config.model.name, batch_size, image_size, num_classes))
    return {'train_step_seconds': 0.5, 'train_images_per_second': batch_size / 0.5,
            'eval_images_per_second': 400.0}

  monkeypatch.setattr(benchmark, 'time_steps', fake_time_steps)
  experiments = reproduce.select_experiments(['plain_2', 'tanh_5'])
  estimates = reproduce.estimate_runs(experiments, {'num_epochs': 10})
  batch = reproduce.experiment_config('plain_2').batch_size
  assert [t[1:] for t in timed] == [(batch, 64, 2), (batch, 64, 5)]
  epoch_2 = (1000 // batch) * 0.5 + 100 / 400.0
  epoch_5 = (2500 // batch) * 0.5 + 250 / 400.0
  assert [e['run'] for e in estimates] == ['plain_2', 'tanh_5']
  assert estimates[0]['epoch_seconds'] == pytest.approx(epoch_2, rel=1e-12)
  assert estimates[1]['hours'] == pytest.approx(epoch_5 * 10 / 3600, rel=1e-12)


def test_estimate_command_totals_its_runs(tmp_path):
  """`--estimate` on one tiny run, with no --workdir: its line and the
  sweep's total agree (a total under 100 h keeps its tenths), and nothing is
  written; without --estimate, --workdir is required."""
  result = subprocess.run(
      [sys.executable, '-m', 'et_flax.reproduce', '--only=plain_2'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
      env={**os.environ, 'PYTHONPATH': str(REPO), 'TF_CPP_MIN_LOG_LEVEL': '2'})
  assert result.returncode == 1
  assert result.stderr.startswith('error: --workdir is required: the sweep runs in'), (
      result.stderr[-3000:])
  assert len(result.stderr.splitlines()) == 1, result.stderr
  result = subprocess.run(
      [sys.executable, '-m', 'et_flax.reproduce',
       '--estimate', '--only=plain_2', '--config.data.image_size=8',
       '--config.model.num_modules=1', '--config.batch_size=16',
       '--config.num_epochs=20000'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
      env={**os.environ, 'PYTHONPATH': str(REPO), 'TF_CPP_MIN_LOG_LEVEL': '2'})
  assert result.returncode == 0, result.stderr[-3000:]
  output = result.stdout + result.stderr
  run_line = next(line for line in output.splitlines() if line.startswith('plain_2: '))
  total_line = next(line for line in output.splitlines() if line.startswith('The sweep: '))
  run_hours = float(run_line.rsplit(': ', 1)[1].removesuffix(' h'))
  # Tenths under 100 h, whole hours above (which of them depends on this
  # machine's speed; 20,000 epochs of this run were 2-20 h on the 2-core CPU).
  expected = f'{run_hours:.1f}' if run_hours < 100 else f'{run_hours:.0f}'
  assert total_line.split()[2:4] == [expected, 'h'], (run_line, total_line)
  assert not list(tmp_path.iterdir())


def test_the_overrides_are_typed_by_the_default_config_and_leave_sys_argv(run_command):
  """--config.a.b=value for every run: typed by configs/default.py, a typo one
  error line, --config=FILE refused; the command line is read, never edited."""
  args = ['--workdir=unused', '--workers=0', '--config.batch_size=16',
          '--config.model.width', '2']
  code, _, stderr = run_command('et_flax.reproduce', *args)
  assert code == 1
  assert stderr.splitlines() == [
      'error: --workers=0: give the number of worker processes (1 or more)']
  assert sys.argv == ['-m', *args]
  code, _, stderr = run_command('et_flax.reproduce', '--config.batch_size=abc')
  assert code == 1
  assert stderr.splitlines()[0] == ("error: --config.batch_size=abc: config.batch_size "
                                    "takes an integer (its value now: 128), not 'abc'")
  code, _, stderr = run_command('et_flax.reproduce', '--config.modle.width=2')
  assert code == 1
  assert stderr.splitlines() == [
      "error: --config.modle.width=2: the config has no field 'modle'. Did you mean "
      '"model" instead of "modle"?']
  code, _, _ = run_command('et_flax.reproduce', '--config=configs/default.py')
  assert code == 1 and sys.argv == ['-m', '--config=configs/default.py']
