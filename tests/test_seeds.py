"""Seeds (reproduce --seeds=N): each experiment's runs of N seeds, the table's
mean and spread, and findings that are "within noise" inside the spread.

A quick sweep of two tiny configs with 2 seeds: the seeds' runs exist and
differ, the table is their mean and standard deviation by NumPy from their
own histories, and --seeds=1 on the same workdir writes the one-seed
sweep's table as it was; the findings from made-up runs (no training): with
one seed exactly as before seeds, with several agreeing or disagreeing only
outside the seeds' spread; --estimate counts each seed's run.
"""

import csv
import json
import logging
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

from et_flax.report import findings
from et_flax import reproduce
from et_flax import sweep_workers

REPO = pathlib.Path(__file__).resolve().parent.parent
RUNS = ('plain_2', 'hinge_5')
TIMEOUT = 300  # seconds, for any one sweep here


def _run(name, top1s, status='done', seconds=1.0, train_top1=0.5, classes=5, seed=0):
  history = [{'epoch': i + 1, 'val_top1_accuracy': top1,
              'val_top5_accuracy': min(1.0, top1 + 0.3), 'train_top1_accuracy': train_top1,
              'epoch_seconds': seconds + i}
             for i, top1 in enumerate(top1s)]
  return findings.RunResult(name, status, '', classes, history, seed)


def _seeds(name, top1s_of_each_seed, **kwargs):
  return [_run(name, top1s, seed=seed, **kwargs)
          for seed, top1s in enumerate(top1s_of_each_seed)]


def _verdicts(*runs_of_each):
  checked = findings.check_claims({runs[0].name: runs for runs in runs_of_each})
  return {claim['finding']: (claim['verdict'], claim['ours']) for claim in checked}


# ---------------------------------------------------------------------------
# One seed: as before seeds.

ONE_SEED_RUNS = (
    ('plain_2', [0.9, 0.95], {'train_top1': 0.97, 'classes': 2}),
    ('optimizer_rmsprop_10', [0.1, 0.12], {'classes': 10}),
    ('plain_5', [0.5, 0.66, 0.6, 0.58], {'seconds': 11, 'train_top1': 0.9}),
    ('dropout_5', [0.5, 0.6, 0.72], {'seconds': 11.5}),
    ('augment8_5', [], {'status': 'failed'}),
    ('wide_5', [0.6, 0.7], {'seconds': 13}),
    ('deep_5', [0.55, 0.68], {'seconds': 22}),
    ('tanh_5', [0.64, 0.65, 0.62], {'seconds': 10}),
    ('vgg16_20', [0.4], {'status': 'running', 'classes': 20}),
    ('optimizer_adam_10', [0.3, 0.5, 0.55], {'classes': 10}),
    ('optimizer_sgd_10', [0.1, 0.2, 0.3, 0.35], {'classes': 10}),
    ('stride2_5', [0.7], {}),
    ('hinge_5', [0.6, 0.66], {}),
    ('wide_200', [0.1, 0.2, 0.25], {'classes': 200}),
    ('dropout_augment5_200', [0.1, 0.22, 0.24, 0.3], {'classes': 200}),
)
# What findings.py wrote for ONE_SEED_RUNS before seeds (commit a8eb475):
# the table's columns, its first rows (and a quick table's first), the findings.
BEFORE_SEEDS_COLUMNS = [
    'run', 'experiment', 'status', 'classes', 'epochs', 'best_epoch', 'top1', 'report_top1',
    'gap_top1', 'top5', 'report_top5', 'gap_top5', 'seconds_per_epoch',
    'report_seconds_per_epoch', 'report_says']
BEFORE_SEEDS_HEADER = (
    '| run | experiment | status | classes | epochs | best epoch | top-1 | report top-1 | gap '
    '| top-5 | report top-5 | gap | s/epoch | report s/epoch | report says |')
BEFORE_SEEDS_TABLE = BEFORE_SEEDS_HEADER + """
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| plain_2 | plain E.T., 2 classes | done | 2 | 2 | 2 | 0.950 | - | - | 1.000 | - | - | 2.0 | - | overfits |
| optimizer_rmsprop_10 | RMSprop 1e-3, 10 classes | done | 10 | 2 | 2 | 0.120 | 0.050 | +0.070 | 0.420 | - | - | 2.0 | - | chance |
| plain_5 | plain E.T., 5 classes | done | 5 | 4 | 2 | 0.660 | 0.660 | +0.000 | 0.960 | - | - | 13.0 | 11.0 | - |
| dropout_5 | dropout 0.5, 5 classes | done | 5 | 3 | 3 | 0.720 | 0.720 | +0.000 | 1.000 | - | - | 13.0 | 11.0 | - |
| augment8_5 | 8 augmentations, 5 classes | failed | 5 | 0 | - | - | 0.705 | - | - | - | - | - | 17.0 | 0.70-0.71 |
"""
BEFORE_SEEDS_QUICK_ROW = (
    '| vgg16_20 | VGG16 from scratch, 20 classes | running | 20 | 1 | 1 | 0.400 | 0.531 | - '
    '| 0.700 | 0.854 | - | 1.0 | - | - |')
BEFORE_SEEDS_FINDINGS = """\
| the report finds | report | ours | verdict |
|---|---|---|---|
| Plain E.T. overfits a 2-class subset (the sanity check) | overfits | plain_2 best train top-1 0.970 (agrees at >= 0.95) | **agrees** |
| RMSprop 1e-3 cannot train E.T.: validation accuracy stays at chance | val 0.05 (chance), train 0.49 | best val top-1 0.120 (chance 0.100; agrees at <= 1.5x chance), last train top-1 0.500 | **agrees** |
| SGD (momentum 0.9, decay 1e-6) trains E.T. slowly, below Adam | 0.22 after 800 epochs vs 0.55 | optimizer_sgd_10 0.350, optimizer_adam_10 0.550; val top-1 0.350 first at epoch 4 (SGD) and 2 (Adam) | **agrees** |
| Adam 1e-3 with plateau halving is the best of the three optimizers | 0.55 vs 0.22 (SGD) and chance (RMSprop) | optimizer_adam_10 0.550, optimizer_sgd_10 0.350, optimizer_rmsprop_10 0.120 | **agrees** |
| Plain E.T. overfits early on 5 classes | overfits after ~15 epochs at 0.66 | best val epoch 2 of 4; last epoch train top-1 0.900, val 0.580 (agrees: best in the first half, train above val by > 0.1) | **agrees** |
| Dropout 0.5 before the last Dense helps on 5 classes | 0.72 vs 0.66 | dropout_5 0.720, plain_5 0.660 | **agrees** |
| With dropout the model converges later | ~400 epochs later | best val epoch: dropout_5 3, plain_5 2 | **agrees** |
| The 8 augmentations help on 5 classes | 0.70-0.71 vs 0.66 | augment8_5 failed | **incomplete** |
| Augmentation ends slightly below dropout | 0.70-0.71 vs 0.72 | augment8_5 failed | **incomplete** |
| Augmentation costs time per epoch | 17 s vs 11 s (dropout) | augment8_5 failed | **incomplete** |
| Width (k=2) helps on 5 classes | 0.70 vs 0.66 | wide_5 0.700, plain_5 0.660 | **agrees** |
| Width costs a little time per epoch | 13 s vs 11 s | wide_5 14.00 s/epoch, plain_5 13.00 | **agrees** |
| Width helps on 200 classes early on | +0.01 in the first 50 epochs | best val top-1 in the first 3 epochs: wide_200 0.250, dropout_augment5_200 0.240 | **agrees** |
| Depth (8 modules) helps slightly on 5 classes | 0.68 vs 0.66 | deep_5 0.680, plain_5 0.660 | **agrees** |
| Width is more effective than depth | 0.70 at 13 s/epoch vs 0.68 at 22 s | wide_5 0.700, deep_5 0.680; 14.00 vs 23.00 s/epoch | **agrees** |
| A stride-2 max-pool after the stem hurts | 0.38 vs 0.66 | plain_5 0.660, stride2_5 0.700 | **disagrees** |
| Categorical hinge is worse than cross-entropy | 0.60 vs 0.66 | plain_5 0.660, hinge_5 0.660 | **disagrees** |
| tanh ends slightly below ReLU | 0.65 vs 0.66 | plain_5 0.660, tanh_5 0.650 | **agrees** |
| tanh converges sooner than ReLU | ~5 epochs sooner | 95% of the best val top-1 first at epoch 1 (tanh), 2 (relu) | **agrees** |
| tanh is less steady than ReLU | "seems more unsteady" | mean change of val top-1 between epochs: tanh 0.020, relu 0.080 | **disagrees** |
"""


def test_one_seed_writes_the_table_and_findings_of_before_seeds():
  runs = [_run(name, top1s, **kwargs) for name, top1s, kwargs in ONE_SEED_RUNS]
  table = findings.table_markdown(findings.table_rows(runs))
  assert table.startswith(BEFORE_SEEDS_TABLE)
  assert len(table.splitlines()) == 2 + len(runs)
  quick = findings.table_markdown(findings.table_rows(runs, quick=True))
  assert BEFORE_SEEDS_QUICK_ROW in quick.splitlines()
  assert findings.table_columns(findings.table_rows(runs)) == BEFORE_SEEDS_COLUMNS
  # Each run alone, or as the one seed of its experiment: the same findings.
  for results in ({run.name: run for run in runs}, {run.name: [run] for run in runs}):
    checked = findings.check_claims(results)
    assert findings.claims_markdown(checked) == BEFORE_SEEDS_FINDINGS
    assert findings.verdict_counts(checked) == '14 agrees, 3 disagrees, 3 incomplete'


# ---------------------------------------------------------------------------
# Several seeds, made up.

def _inside(a, b):
  """By hand: whether mean(a) - mean(b) is within the sum of their sample
  standard deviations."""
  return abs(np.mean(a) - np.mean(b)) <= np.std(a, ddof=1) + np.std(b, ddof=1)


def test_a_difference_inside_the_seeds_spread_is_within_noise():
  helps = 'Dropout 0.5 before the last Dense helps on 5 classes'
  # Every seed has dropout above plain, by less than the seeds' spread.
  dropout, plain = [0.70, 0.76], [0.66, 0.70]
  assert _inside(dropout, plain) and all(d > p for d, p in zip(dropout, plain))
  verdicts = _verdicts(_seeds('dropout_5', [[t] for t in dropout]),
                       _seeds('plain_5', [[t] for t in plain]))
  assert verdicts[helps] == (findings.WITHIN_NOISE,
                             'dropout_5 0.730 ± 0.042, plain_5 0.680 ± 0.028')
  # The spread is the sum of both: the difference (0.05) is above either
  # standard deviation (0.042, 0.028), below their sum.
  assert np.mean(dropout) - np.mean(plain) > max(np.std(dropout, ddof=1),
                                                 np.std(plain, ddof=1))
  # Further apart than the spread: agrees; the other way round: disagrees.
  dropout = [0.74, 0.78]
  assert not _inside(dropout, plain)
  verdicts = _verdicts(_seeds('dropout_5', [[t] for t in dropout]),
                       _seeds('plain_5', [[t] for t in plain]),
                       _seeds('stride2_5', [[t] for t in dropout]))
  assert verdicts[helps][0] == findings.AGREES
  assert verdicts['A stride-2 max-pool after the stem hurts'] == (
      findings.DISAGREES, 'plain_5 0.680 ± 0.028, stride2_5 0.760 ± 0.028')
  # Equal numbers of several seeds are no difference either.
  verdicts = _verdicts(_seeds('hinge_5', [[0.6], [0.6]]), _seeds('plain_5', [[0.6], [0.6]]))
  assert verdicts['Categorical hinge is worse than cross-entropy'] == (
      findings.WITHIN_NOISE, 'plain_5 0.600 ± 0.000, hinge_5 0.600 ± 0.000')


def test_thresholds_and_findings_of_several_comparisons_follow_the_spread():
  overfits = 'Plain E.T. overfits a 2-class subset (the sanity check)'

  def plain_2(*trains):
    return [_run('plain_2', [0.9], train_top1=t, classes=2, seed=s)
            for s, t in enumerate(trains)]

  assert _verdicts(plain_2(0.97, 0.99))[overfits] == (
      findings.AGREES, 'plain_2 best train top-1 0.980 ± 0.014 (agrees at >= 0.95)')
  assert _inside([0.93, 0.99], [0.95, 0.95])
  assert _verdicts(plain_2(0.93, 0.99))[overfits][0] == findings.WITHIN_NOISE
  assert _verdicts(plain_2(0.90, 0.91))[overfits][0] == findings.DISAGREES
  # Two comparisons: one within noise makes the finding so, one that
  # disagrees makes it disagree.
  beat = 'VGG16 and ResNet50 from scratch beat E.T. on 200 classes'
  et = _seeds('dropout_200', [[0.34], [0.36]], classes=200)
  vgg16 = _seeds('vgg16_200', [[0.44], [0.46]], classes=200)
  for resnet50, verdict in (([[0.50], [0.52]], findings.AGREES),
                            ([[0.33], [0.41]], findings.WITHIN_NOISE),
                            ([[0.20], [0.22]], findings.DISAGREES)):
    verdicts = _verdicts(et, vgg16, _seeds('resnet50_200', resnet50, classes=200))
    assert verdicts[beat][0] == verdict, resnet50
  # A seed not done leaves the finding incomplete, naming that seed's run.
  dropout = _seeds('dropout_5', [[0.7], [0.72]])
  dropout[1].status = 'failed'
  verdicts = _verdicts(dropout, _seeds('plain_5', [[0.6], [0.62]]))
  assert verdicts['Dropout 0.5 before the last Dense helps on 5 classes'] == (
      findings.INCOMPLETE, 'dropout_5_seed1 failed')
  counts = findings.verdict_counts(findings.check_claims(
      {'plain_2': plain_2(0.93, 0.99), 'dropout_5': dropout}))
  assert counts == '0 agrees, 0 disagrees, 1 within noise, 0 incomplete'


def test_the_table_of_seeds_is_their_mean_and_spread():
  """The seeds that finished, by NumPy; a seed still running is counted out."""
  dropout = _seeds('dropout_5', [[0.5, 0.72], [0.7, 0.6, 0.66], [0.4, 0.64], [0.9]],
                   seconds=11)
  dropout[3].status = 'running'
  plain = _seeds('plain_5', [[0.6], [0.64], [0.62], []])
  plain[3].status = 'pending'
  rows = {row['run']: row for row in findings.table_rows([*dropout, *plain])}
  row = rows['dropout_5']
  best = [0.72, 0.7, 0.64]  # each finished seed's best val top-1
  assert (row['status'], row['seeds']) == ('3 done, 1 running', 3)
  assert row['top1'] == np.mean(best) and row['top1_std'] == np.std(best, ddof=1)
  top5 = [min(1.0, t + 0.3) for t in best]
  assert row['top5'] == np.mean(top5) and row['top5_std'] == np.std(top5, ddof=1)
  assert row['gap_top1'] == pytest.approx(np.mean(best) - 0.72, abs=1e-12)
  assert row['best_epoch'] == np.mean([2, 1, 2]) and row['epochs'] == np.mean([2, 3, 2])
  assert row['seconds_per_epoch'] == np.mean([12, 12.5, 12])  # medians, first left out
  assert rows['plain_5']['top1'] == np.mean([0.6, 0.64, 0.62])
  markdown = findings.table_markdown(list(rows.values()))
  assert markdown.splitlines()[0].startswith('| run | experiment | status | seeds |')
  assert ('| dropout_5 | dropout 0.5, 5 classes | 3 done, 1 running | 3 | 5 | 2.3 | 1.7 '
          f'| {np.mean(best):.3f} ± {np.std(best, ddof=1):.3f} | 0.720 |') in markdown
  # One seed finished: no spread; none: no numbers.
  one, none = findings.table_rows([*_seeds('wide_5', [[0.7], []]),
                                   *_seeds('deep_5', [[], []], status='failed')])
  assert (one['seeds'], one['top1'], one['top1_std']) == (1, 0.7, None)
  assert (none['status'], none['seeds'], none['top1'], none['top5'], none['epochs']) == (
      'failed', 0, None, None, None)


def test_seeds_runs_are_named_after_their_experiment():
  experiments = [findings.BY_NAME[name] for name in RUNS]
  runs = reproduce.sweep_runs(experiments, 3)
  assert [run.name for run in runs] == ['plain_2', 'hinge_5', 'plain_2_seed1',
                                        'hinge_5_seed1', 'plain_2_seed2', 'hinge_5_seed2']
  configs = [reproduce.run_config(run, overrides={'seed': 7}) for run in runs]
  assert [config.seed for config in configs] == [7, 7, 8, 8, 9, 9]
  # The first seed's is the experiment's own config: a one-seed sweep's run.
  assert configs[0] == reproduce.experiment_config('plain_2', overrides={'seed': 7})


@pytest.mark.parametrize('seeds', ['0', '-2'])
def test_bad_seeds_is_one_error_line(run_command, tmp_path, seeds):
  code, _, stderr = run_command('et_flax.reproduce', f'--workdir={tmp_path / "w"}',
                                '--quick', f'--seeds={seeds}')
  assert code == 1 and stderr.startswith(
      f'error: --seeds={seeds}: give the number of seeds to train each experiment'), stderr
  assert len(stderr.splitlines()) == 1, stderr
  assert not (tmp_path / 'w').exists()


def test_estimate_counts_each_seeds_run(monkeypatch, caplog):
  """plain_2 and tanh_5, 1,000 epochs of steps timed at 0.5 s (the fake
  below), 3 seeds: the sweep's hours thrice one seed's, and over 2 workers
  the six runs longest first."""
  from et_flax.benchmark import steps as benchmark  # pylint: disable=import-outside-toplevel

  def fake_time_steps(config, settings, batch_size, image_size, num_classes, steps, warmup,
                      augment_config):
    del config, settings, image_size, num_classes, steps, warmup, augment_config
    return {'train_step_seconds': 0.5, 'train_images_per_second': batch_size / 0.5,
            'eval_images_per_second': 400.0}

  monkeypatch.setattr(benchmark, 'time_steps', fake_time_steps)
  monkeypatch.setattr(reproduce, 'FLAGS', types.SimpleNamespace(workdir=None))
  caplog.set_level(logging.INFO)
  environments = sweep_workers.worker_environments(2, gpus=[], cores=[0, 1])
  reproduce._estimate(  # pylint: disable=protected-access
      reproduce.select_experiments(['plain_2', 'tanh_5']), {'num_epochs': 1000},
      environments, seeds=3)
  # Batches of 128: 7 steps and 100 validation images an epoch on 2
  # classes, 19 and 250 on 5.
  plain_2 = (7 * 0.5 + 100 / 400) * 1000 / 3600
  tanh_5 = (19 * 0.5 + 250 / 400) * 1000 / 3600
  lines = caplog.messages
  total = next(line for line in lines if line.startswith('The sweep: '))
  assert total.startswith(f'The sweep: {3 * (plain_2 + tanh_5):.1f} h (')
  assert total.endswith(', 3 seeds of each run')
  # Longest first: a tanh_5 each, the third tanh_5 to one, the plain_2s to the other.
  wall = tanh_5 + 3 * plain_2
  assert wall > 2 * tanh_5
  assert any(line.startswith(f'With 2 workers, longest first: {wall:.1f} h (')
             for line in lines), lines


# ---------------------------------------------------------------------------
# A quick sweep of 2 seeds.

def _history(run_dir):
  path = pathlib.Path(run_dir) / 'history.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines()]


def _csv(sweep):
  return list(csv.DictReader((sweep / f'{reproduce.TABLE}.csv').open()))


def _markdown(sweep):
  """reproduction.md but its line with the time it was written."""
  lines = (sweep / f'{reproduce.TABLE}.md').read_text().splitlines()
  return [line for line in lines if not line.startswith(f'{sweep}, ')]


def _mtimes(sweep, names):
  return {name: (sweep / name / 'history.jsonl').stat().st_mtime_ns for name in names}


def _command(sweep, digits_data_dir, *extra):
  return [sys.executable, '-m', 'et_flax.reproduce', f'--workdir={sweep}', '--quick',
          f'--only={",".join(RUNS)}', '--evaluate=false', *extra,
          f'--config.data.data_dir={digits_data_dir}']


@pytest.mark.slow
def test_a_sweep_of_two_seeds(digits_data_dir, tmp_path):
  """One seed, then --seeds=2 on the same workdir (by two workers, where
  there are two cores), then --seeds=1 again; every run on one worker's
  share of the cores (a run's bits follow its team of threads)."""
  sweep = tmp_path / 'sweep'
  experiments = [findings.BY_NAME[name] for name in RUNS]
  cores = sorted(os.sched_getaffinity(0))
  workers = min(2, len(cores))
  share = sweep_workers.worker_environments(workers, gpus=[], cores=cores[:workers])[0]
  share = {k: v for k, v in share.items() if k != sweep_workers.WORKER_ENV}
  result = subprocess.run(_command(sweep, digits_data_dir), cwd=REPO, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False, env={**os.environ, **share})
  assert result.returncode == 0, result.stderr[-3000:]
  one_seed = _csv(sweep), _markdown(sweep)
  assert [list(row) for row in one_seed[0]] == [['mode', *BEFORE_SEEDS_COLUMNS]] * 2
  assert BEFORE_SEEDS_HEADER in one_seed[1] and not any('seeds' in l for l in one_seed[1])
  first = _mtimes(sweep, RUNS)

  command = _command(sweep, digits_data_dir, '--seeds=2', f'--workers={workers}')
  if workers == 2:
    command = ['taskset', '-c', ','.join(map(str, cores[:2])), *command]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  seeded = [f'{name}_seed1' for name in RUNS]
  assert _mtimes(sweep, RUNS) == first  # the first seed's runs were the one-seed sweep's
  status = json.loads((sweep / reproduce.STATUS_FILE).read_text())['runs']
  assert sorted(status) == sorted([*RUNS, *seeded])
  assert {status[name]['status'] for name in status} == {'done'}
  assert [status[name].get('seed') for name in [*RUNS, *seeded]] == [None, None, 1, 1]
  assert '4 of 4 runs done' in result.stderr.splitlines()[-1], result.stderr[-2000:]
  for name in RUNS:
    ours, other = _history(sweep / name), _history(sweep / f'{name}_seed1')
    assert len(ours) == len(other) == reproduce.QUICK_EPOCHS
    # Trained on the same share of the cores, the same seed would give the
    # same bits: another seed, other initial weights, data order and dropout.
    assert [e['train_loss'] for e in ours] != [e['train_loss'] for e in other], name

  # The table: each experiment's mean and spread over its seeds, by hand.
  rows = {row['run']: row for row in _csv(sweep)}
  assert list(rows) == list(RUNS)
  for name in RUNS:
    histories = [_history(sweep / name), _history(sweep / f'{name}_seed1')]
    best = [h[int(np.argmax([e['val_top1_accuracy'] for e in h]))] for h in histories]
    top1 = [e['val_top1_accuracy'] for e in best]
    top5 = [e['val_top5_accuracy'] for e in best]
    row = rows[name]
    assert (row['status'], row['seeds'], row['mode']) == ('done', '2', 'quick')
    assert float(row['top1']) == np.mean(top1) and float(row['top5']) == np.mean(top5)
    assert float(row['top1_std']) == np.std(top1, ddof=1)
    assert float(row['top5_std']) == np.std(top5, ddof=1)
    assert float(row['best_epoch']) == np.mean([e['epoch'] for e in best])
  markdown = (sweep / f'{reproduce.TABLE}.md').read_text()
  assert 'done of 4 runs.' in markdown and '**2 seeds** (`--seeds=2`)' in markdown
  assert (f'| plain_2 | plain E.T., 2 classes | done | 2 | 2 | 2.0 | '
          f'{float(rows["plain_2"]["best_epoch"]):.1f} | '
          f'{float(rows["plain_2"]["top1"]):.3f} ± {float(rows["plain_2"]["top1_std"]):.3f} |'
          ) in markdown
  assert (sweep / reproduce.FIGURE).stat().st_size > 0

  # --seeds=1: the first seed's runs, and the table the one-seed sweep wrote.
  trained = _mtimes(sweep, [*RUNS, *seeded])
  reproduce.run_sweep(sweep, experiments, quick=True, evaluate_runs=False,
                      overrides={'data.data_dir': str(digits_data_dir)})
  assert _mtimes(sweep, [*RUNS, *seeded]) == trained  # nothing trained
  assert (_csv(sweep), _markdown(sweep)) == one_seed
