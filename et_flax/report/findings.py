"""The report's results and findings set beside a sweep's runs.

`EXPERIMENTS` lists every experiment config with what the report got;
`run_result` reads a finished (or partial) run from its workdir's history;
`table_rows` puts our numbers beside the report's; `CLAIMS` are the report's
qualitative findings, each checked against our runs (`check_claims`);
`claims_figure` draws the report's pairwise comparisons side by side.
The report's numbers, here and in the findings' words, are
report_numbers.FIGURES's.

An experiment trained with several seeds (reproduce --seeds=N) has a run per
seed: the table gives their mean and standard deviation, and a finding
agrees or disagrees only where the numbers it compares differ by more than
their seeds' spread (`WITHIN_NOISE` otherwise). With one seed, everything is
as the single run has it.
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from et_flax import run_files
from et_flax.report import report_numbers

REPORT, FUTURE_WORK, PRETRAINED = 'report', 'future work', 'pretrained'


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One config of the report; what the report got is report_numbers.FIGURES's."""
  name: str  # configs/<name>.py, and the run's sub-workdir
  what: str
  group: str = REPORT

  @property
  def figures(self) -> report_numbers.Figures:
    return report_numbers.FIGURES[self.name]

  @property
  def report_top1(self) -> float | None:
    """Validation top-1 as the report gives it (table 5.1's where it has a row)."""
    return self.figures.top1

  @property
  def report_top5(self) -> float | None:
    return self.figures.top5

  @property
  def said(self) -> str:
    """The report's words, where it gives no single number."""
    return self.figures.said

  @property
  def seconds_per_epoch(self) -> float | None:
    """The report's, on its GTX 1080."""
    return self.figures.seconds_per_epoch

  @property
  def table_key(self) -> tuple[str, int, bool] | None:
    """Its row in table 5.1: compare.REPORT_RESULTS's key."""
    return self.figures.table_key


# In the report's order (section 4, then table 5.1, then section 7).
EXPERIMENTS = (
    Experiment('plain_2', 'plain E.T., 2 classes'),
    Experiment('optimizer_adam_10', 'Adam 1e-3 + plateau halving, 10 classes'),
    Experiment('optimizer_sgd_10', 'SGD 0.01, momentum 0.9, 10 classes'),
    Experiment('optimizer_rmsprop_10', 'RMSprop 1e-3, 10 classes'),
    Experiment('plain_5', 'plain E.T., 5 classes'),
    Experiment('dropout_5', 'dropout 0.5, 5 classes'),
    Experiment('augment8_5', '8 augmentations, 5 classes'),
    Experiment('dropout_augment5_20', 'dropout + 5 augmentations, 20 classes'),
    Experiment('dropout_augment5_200', 'dropout + 5 augmentations, 200 classes'),
    Experiment('dropout_200', 'dropout, 200 classes (the Kaggle model)'),
    Experiment('wide_5', 'k=2, 5 classes'),
    Experiment('wide_200', 'k=2 + dropout + 5 augmentations, 200 classes'),
    Experiment('deep_5', '8 modules, 5 classes'),
    Experiment('stride2_5', 'stride-2 max-pool after the stem, 5 classes'),
    Experiment('hinge_5', 'categorical hinge, 5 classes'),
    Experiment('tanh_5', 'tanh, 5 classes'),
    Experiment('vgg16_20', 'VGG16 from scratch, 20 classes'),
    Experiment('resnet50_20', 'ResNet50 from scratch, 20 classes'),
    Experiment('vgg16_200', 'VGG16 from scratch, 200 classes'),
    Experiment('resnet50_200', 'ResNet50 from scratch, 200 classes'),
    Experiment('vgg16_pretrained_20', 'VGG16 from ImageNet weights, 20 classes', PRETRAINED),
    Experiment('resnet50_pretrained_20', 'ResNet50 from ImageNet weights, 20 classes',
               PRETRAINED),
    Experiment('vgg16_pretrained_200', 'VGG16 from ImageNet weights, 200 classes',
               PRETRAINED),
    Experiment('resnet50_pretrained_200', 'ResNet50 from ImageNet weights, 200 classes',
               PRETRAINED),
    Experiment('inblock_dropout_200', 'dropout 0.1 inside the blocks, 200 classes',
               FUTURE_WORK),
    Experiment('wide4_heavy_200', 'k=4 + heavy augmentation, 200 classes', FUTURE_WORK),
    Experiment('kernels135_5', '1x1, 3x3, 5x5 kernels in turn, 5 classes', FUTURE_WORK),
    Experiment('tanh_200', 'tanh + dropout, 200 classes', FUTURE_WORK),
)
BY_NAME = {experiment.name: experiment for experiment in EXPERIMENTS}


# ---------------------------------------------------------------------------
# A run, as its workdir records it.

def run_name(name: str, seed: int = 0) -> str:
  """The run of experiment `name` with its `seed`-th seed: its sub-workdir of
  the sweep, its key in status.json and its claim. Seed 0 is the experiment's
  own name (the run of a one-seed sweep)."""
  return name if seed == 0 else f'{name}_seed{seed}'


@dataclasses.dataclass
class RunResult:
  """A run's status (from the sweep) and its history (from its workdir)."""
  name: str  # the experiment's
  status: str  # pending | running | done | failed | interrupted
  message: str = ''
  num_classes: int | None = None
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  seed: int = 0  # which of the experiment's seeds (run_name)

  @property
  def run(self) -> str:
    return run_name(self.name, self.seed)

  @property
  def finished(self) -> bool:
    return self.status == 'done' and bool(self.history)

  @property
  def best(self) -> dict[str, Any] | None:
    """The epoch checkpoints_best/ keeps: the first with the best val top-1."""
    return max(self.history, key=lambda entry: entry['val_top1_accuracy'], default=None)

  @property
  def top1(self) -> float | None:
    return self.best['val_top1_accuracy'] if self.history else None

  @property
  def top5(self) -> float | None:
    return self.best['val_top5_accuracy'] if self.history else None

  @property
  def epochs(self) -> int:
    return self.history[-1]['epoch'] if self.history else 0

  @property
  def seconds_per_epoch(self) -> float | None:
    """Median epoch time, the first epoch (compiling) left out where there are more."""
    times = [entry['epoch_seconds'] for entry in self.history]
    return statistics.median(times[1:] or times) if times else None

  def top1_until(self, epoch: int) -> float:
    """The best val top-1 of the epochs up to `epoch`."""
    return max(e['val_top1_accuracy'] for e in self.history if e['epoch'] <= epoch)

  def converged_epoch(self, share: float = 0.95) -> int:
    """The first epoch whose val top-1 reached `share` of the run's best."""
    return next(e['epoch'] for e in self.history
                if e['val_top1_accuracy'] >= share * self.top1)

  @property
  def chance(self) -> float:
    return 1 / self.num_classes


def run_result(workdir: str | pathlib.Path, name: str, status: str,
               message: str = '', seed: int = 0) -> RunResult:
  """The run in `workdir` (which may not exist yet)."""
  workdir = pathlib.Path(workdir)
  return RunResult(name, status, message, run_files.num_classes(workdir),
                   run_files.read_history(workdir, missing_ok=True), seed)


def by_experiment(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
  """The runs of each experiment (its seeds), in the order of `results`."""
  grouped: dict[str, list[RunResult]] = {}
  for result in results:
    grouped.setdefault(result.name, []).append(result)
  return grouped


@dataclasses.dataclass(frozen=True)
class Measure:
  """A number of an experiment's runs: one value per seed."""
  values: tuple[float, ...]

  @property
  def mean(self) -> float:
    return float(np.mean(self.values))

  @property
  def std(self) -> float:
    """The sample standard deviation (ddof=1); 0 for one value."""
    return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0

  def __format__(self, spec: str) -> str:
    if len(self.values) == 1:
      return format(self.values[0], spec)
    spec = spec or '.1f'
    return f'{self.mean:{spec}} ± {self.std:{spec}}'


def _measure(value: Measure | float) -> Measure:
  return value if isinstance(value, Measure) else Measure((value,))


def above(high: Measure | float, low: Measure | float, or_equal: bool = False
          ) -> bool | None:
  """Whether `high` is above `low` (or level with it, `or_equal`).

  With one value each (one seed), as the numbers are. With more, only where
  the means differ by more than the seeds' spread, the sum of the two
  standard deviations (their mean ± std ranges are apart): True or False by
  the sign, None (within noise) where they are not, ties included.
  """
  high, low = _measure(high), _measure(low)
  if len(high.values) == len(low.values) == 1:
    a, b = high.values[0], low.values[0]
    return bool(a >= b if or_equal else a > b)
  difference, spread = high.mean - low.mean, high.std + low.std
  if abs(difference) > spread:
    return difference > 0
  return None


# ---------------------------------------------------------------------------
# The table.

COLUMNS = ['run', 'experiment', 'status', 'classes', 'epochs', 'best_epoch', 'top1',
           'report_top1', 'gap_top1', 'top5', 'report_top5', 'gap_top5',
           'seconds_per_epoch', 'report_seconds_per_epoch', 'report_says']
_HEADERS = ['run', 'experiment', 'status', 'classes', 'epochs', 'best epoch', 'top-1',
            'report top-1', 'gap', 'top-5', 'report top-5', 'gap', 's/epoch',
            'report s/epoch', 'report says']


def _gap(ours: float | None, theirs: float | None, quick: bool) -> float | None:
  return None if quick or ours is None or theirs is None else ours - theirs


# With several seeds: a row per experiment, the means over its seeds that
# finished (n in 'seeds'), top-1 and top-5 with their standard deviation.
SEED_COLUMNS = ['run', 'experiment', 'status', 'seeds', 'classes', 'epochs', 'best_epoch',
                'top1', 'top1_std', 'report_top1', 'gap_top1', 'top5', 'top5_std',
                'report_top5', 'gap_top5', 'seconds_per_epoch', 'report_seconds_per_epoch',
                'report_says']
_SEED_HEADERS = ['run', 'experiment', 'status', 'seeds', 'classes', 'epochs', 'best epoch',
                 'top-1', 'report top-1', 'gap', 'top-5', 'report top-5', 'gap', 's/epoch',
                 'report s/epoch', 'report says']
STATUSES = ('done', 'failed', 'running', 'interrupted', 'pending')


def table_rows(results: Sequence[RunResult], quick: bool = False) -> list[dict[str, Any]]:
  """One row per run: ours (best val epoch) beside the report's; no gap in quick mode.

  Where an experiment has runs of several seeds, one row per experiment
  instead (SEED_COLUMNS): the mean and standard deviation over its seeds
  that finished.
  """
  grouped = by_experiment(results)
  if any(len(runs) > 1 for runs in grouped.values()):
    return [_seeds_row(runs, quick) for runs in grouped.values()]
  rows = []
  for result in results:
    experiment = BY_NAME[result.name]
    top1, top5 = experiment.report_top1, experiment.report_top5
    best = result.best
    rows.append({
        'run': result.name, 'experiment': experiment.what, 'status': result.status,
        'classes': result.num_classes, 'epochs': result.epochs,
        'best_epoch': best['epoch'] if best else None,
        'top1': result.top1, 'report_top1': top1, 'gap_top1': _gap(result.top1, top1, quick),
        'top5': result.top5, 'report_top5': top5, 'gap_top5': _gap(result.top5, top5, quick),
        'seconds_per_epoch': result.seconds_per_epoch,
        'report_seconds_per_epoch': experiment.seconds_per_epoch,
        'report_says': experiment.said})
  return rows


def _seeds_row(runs: Sequence[RunResult], quick: bool) -> dict[str, Any]:
  experiment = BY_NAME[runs[0].name]
  finished = [run for run in runs if run.finished]

  def mean(value: Callable[[RunResult], float]) -> float | None:
    return Measure(tuple(value(run) for run in finished)).mean if finished else None

  def std(value: Callable[[RunResult], float]) -> float | None:
    return Measure(tuple(value(run) for run in finished)).std if len(finished) > 1 else None

  statuses = [run.status for run in runs]
  top1, top5 = mean(lambda run: run.top1), mean(lambda run: run.top5)
  return {
      'run': experiment.name, 'experiment': experiment.what,
      'status': statuses[0] if len(set(statuses)) == 1 else ', '.join(
          f'{statuses.count(s)} {s}' for s in STATUSES if s in statuses),
      'seeds': len(finished),
      'classes': next((run.num_classes for run in runs if run.num_classes), None),
      'epochs': mean(lambda run: run.epochs),
      'best_epoch': mean(lambda run: run.best['epoch']),
      'top1': top1, 'top1_std': std(lambda run: run.top1),
      'report_top1': experiment.report_top1,
      'gap_top1': _gap(top1, experiment.report_top1, quick),
      'top5': top5, 'top5_std': std(lambda run: run.top5),
      'report_top5': experiment.report_top5,
      'gap_top5': _gap(top5, experiment.report_top5, quick),
      'seconds_per_epoch': mean(lambda run: run.seconds_per_epoch),
      'report_seconds_per_epoch': experiment.seconds_per_epoch,
      'report_says': experiment.said}


def table_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """The CSV's columns for `rows`: COLUMNS, or SEED_COLUMNS for several seeds."""
  return SEED_COLUMNS if rows and 'seeds' in rows[0] else COLUMNS


def _cell(column: str, value: Any) -> str:
  if value is None or value == '':
    return '-'
  if column.startswith('gap'):
    return f'{value:+.3f}'
  if 'seconds' in column:
    return f'{value:.1f}' if value < 100 else f'{value:.0f}'
  if 'epoch' in column and isinstance(value, float):  # a mean over seeds
    return f'{value:.1f}'
  return f'{value:.3f}' if isinstance(value, float) else str(value)


def _seed_cells(row: Mapping[str, Any]) -> list[str]:
  cells = []
  for column in SEED_COLUMNS:
    if column.endswith('_std'):
      continue
    cell = _cell(column, row[column])
    if row.get(f'{column}_std') is not None:
      cell += f' ± {row[f"{column}_std"]:.3f}'
    cells.append(cell)
  return cells


def table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  seeds = table_columns(rows) is SEED_COLUMNS
  headers = _SEED_HEADERS if seeds else _HEADERS
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
  lines += ['| ' + ' | '.join(_seed_cells(row) if seeds else
                              [_cell(c, row[c]) for c in COLUMNS]) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------
# The report's findings.

Results = Mapping[str, Sequence[RunResult]]  # each experiment's runs, one per seed
Outcome = bool | None  # None: within the seeds' noise


@dataclasses.dataclass(frozen=True)
class Claim:
  """A qualitative finding of the report, and how our runs test it.

  `test` returns whether our runs agree (None: within the seeds' noise) and
  our numbers, in words.
  """
  finding: str
  report: str  # the report's numbers
  runs: tuple[str, ...]
  test: Callable[[Results], tuple[Outcome, str]]


def _each(r: Results, name: str, value: Callable[[RunResult], float]) -> Measure:
  """`value` of each seed's run of `name`."""
  return Measure(tuple(value(run) for run in r[name]))


def _paired(r: Results, names: Sequence[str], value: Callable[..., float]) -> Measure:
  """`value` of the runs of `names` with the same seed, for each seed."""
  return Measure(tuple(value(*runs) for runs in zip(*(r[name] for name in names))))


def _top1(r: Results, name: str) -> Measure:
  return _each(r, name, lambda run: run.top1)


def _seconds(r: Results, name: str) -> Measure:
  return _each(r, name, lambda run: run.seconds_per_epoch)


def _both(*outcomes: Outcome) -> Outcome:
  """All of `outcomes`: False where one disagrees, else None where one is
  within noise."""
  if any(outcome is False for outcome in outcomes):
    return False
  return None if any(outcome is None for outcome in outcomes) else True


def _top1s(results: Results, *names: str) -> str:
  return ', '.join(f'{name} {_top1(results, name):.3f}' for name in names)


def _higher(better: str, worse: str) -> Callable[[Results], tuple[Outcome, str]]:
  return lambda r: (above(_top1(r, better), _top1(r, worse)), _top1s(r, better, worse))


def _slower(slow: str, fast: str) -> Callable[[Results], tuple[Outcome, str]]:
  return lambda r: (above(_seconds(r, slow), _seconds(r, fast)),
                    f'{slow} {_seconds(r, slow):.2f} s/epoch, '
                    f'{fast} {_seconds(r, fast):.2f}')


def _overfits_two_classes(r: Results) -> tuple[Outcome, str]:
  train = _each(r, 'plain_2',
                lambda run: max(e['train_top1_accuracy'] for e in run.history))
  return (above(train, 0.95, or_equal=True),
          f'plain_2 best train top-1 {train:.3f} (agrees at >= 0.95)')


def _rmsprop_at_chance(r: Results) -> tuple[Outcome, str]:
  name = 'optimizer_rmsprop_10'
  top1, chance = _top1(r, name), r[name][0].chance
  train = _each(r, name, lambda run: run.history[-1]['train_top1_accuracy'])
  return above(1.5 * chance, top1, or_equal=True), (
      f'best val top-1 {top1:.3f} (chance {chance:.3f}; agrees at <= 1.5x chance), '
      f'last train top-1 {train:.3f}')


def _adam_best(r: Results) -> tuple[Outcome, str]:
  adam, sgd, rmsprop = 'optimizer_adam_10', 'optimizer_sgd_10', 'optimizer_rmsprop_10'
  return (_both(above(_top1(r, adam), _top1(r, sgd)), above(_top1(r, adam), _top1(r, rmsprop))),
          _top1s(r, adam, sgd, rmsprop))


def _first_reaching(run: RunResult, level: float) -> int:
  return next(e['epoch'] for e in run.history if e['val_top1_accuracy'] >= level)


def _sgd_slow(r: Results) -> tuple[Outcome, str]:
  adam, sgd = 'optimizer_adam_10', 'optimizer_sgd_10'
  level = _paired(r, (adam, sgd), lambda a, s: min(a.top1, s.top1))
  adam_at = _paired(r, (adam, sgd), lambda a, s: _first_reaching(a, min(a.top1, s.top1)))
  sgd_at = _paired(r, (adam, sgd), lambda a, s: _first_reaching(s, min(a.top1, s.top1)))
  return above(_top1(r, adam), _top1(r, sgd)), (
      f'{_top1s(r, sgd, adam)}; val top-1 {level:.3f} first at epoch {sgd_at} (SGD) and '
      f'{adam_at} (Adam)')


def _later(late: str, early: str) -> Callable[[Results], tuple[Outcome, str]]:
  def test(r: Results) -> tuple[Outcome, str]:
    best = {name: _each(r, name, lambda run: run.best['epoch']) for name in (late, early)}
    return (above(best[late], best[early]),
            f'best val epoch: {late} {best[late]}, {early} {best[early]}')
  return test


def _plain_overfits(r: Results) -> tuple[Outcome, str]:
  plain = lambda value: _each(r, 'plain_5', value)
  train = plain(lambda run: run.history[-1]['train_top1_accuracy'])
  val = plain(lambda run: run.history[-1]['val_top1_accuracy'])
  gap = plain(lambda run: (run.history[-1]['train_top1_accuracy']
                           - run.history[-1]['val_top1_accuracy']))
  best, epochs = plain(lambda run: run.best['epoch']), plain(lambda run: run.epochs)
  return _both(above(plain(lambda run: run.epochs / 2), best, or_equal=True),
               above(gap, 0.1)), (
      f'best val epoch {best} of {epochs}; last epoch train top-1 {train:.3f}, val '
      f'{val:.3f} (agrees: best in the first half, train above val by > 0.1)')


def _wide_over_deep(r: Results) -> tuple[Outcome, str]:
  wide, deep = _seconds(r, 'wide_5'), _seconds(r, 'deep_5')
  return (_both(above(_top1(r, 'wide_5'), _top1(r, 'deep_5'), or_equal=True),
                above(deep, wide)),
          f'{_top1s(r, "wide_5", "deep_5")}; {wide:.2f} vs {deep:.2f} s/epoch')


def _tanh_sooner(r: Results) -> tuple[Outcome, str]:
  tanh = _each(r, 'tanh_5', lambda run: run.converged_epoch())
  relu = _each(r, 'plain_5', lambda run: run.converged_epoch())
  return above(relu, tanh), (f'95% of the best val top-1 first at epoch {tanh} (tanh), '
                             f'{relu} (relu)')


def _unsteadiness(run: RunResult) -> float:
  values = [e['val_top1_accuracy'] for e in run.history]
  steps = [abs(b - a) for a, b in zip(values, values[1:])]
  return statistics.mean(steps) if steps else 0.0


def _tanh_unsteady(r: Results) -> tuple[Outcome, str]:
  tanh, relu = _each(r, 'tanh_5', _unsteadiness), _each(r, 'plain_5', _unsteadiness)
  return above(tanh, relu), (f'mean change of val top-1 between epochs: tanh {tanh:.3f}, '
                             f'relu {relu:.3f}')


def _wide_200_early(r: Results) -> tuple[Outcome, str]:
  names = ('wide_200', 'dropout_augment5_200')
  epoch = lambda wide, plain: min(50, wide.epochs, plain.epochs)
  ours = _paired(r, names, lambda wide, plain: wide.top1_until(epoch(wide, plain)))
  theirs = _paired(r, names, lambda wide, plain: plain.top1_until(epoch(wide, plain)))
  return above(ours, theirs), (f'best val top-1 in the first {_paired(r, names, epoch)} '
                               f'epochs: wide_200 {ours:.3f}, dropout_augment5_200 '
                               f'{theirs:.3f}')


def _highest(best: str, *others: str) -> Callable[[Results], tuple[Outcome, str]]:
  return lambda r: (_both(*(above(_top1(r, best), _top1(r, o)) for o in others)),
                    _top1s(r, best, *others))


def _all(*tests: Callable[[Results], tuple[Outcome, str]]
         ) -> Callable[[Results], tuple[Outcome, str]]:
  def test(r: Results) -> tuple[Outcome, str]:
    outcomes = [t(r) for t in tests]
    return _both(*(agrees for agrees, _ in outcomes)), '; '.join(
        words for _, words in outcomes)
  return test


# The report's side of a claim, in its words, with report_numbers's figures.
_FIGURES, _text, _said_top1 = (report_numbers.FIGURES, report_numbers.text,
                               report_numbers.top1)


def _vs(*names: str) -> str:
  """'0.72 vs 0.66': the report's top-1s of `names`."""
  return ' vs '.join(_said_top1(name) for name in names)


def _said_seconds(name: str) -> str:
  return f'{_FIGURES[name].seconds_per_epoch:g}'


def _seconds_vs(slow: str, fast: str) -> str:
  return f'{_said_seconds(slow)} s vs {_said_seconds(fast)} s'


def _said_epochs(name: str) -> int:
  return _FIGURES[name].epochs


_RMSPROP, _SGD, _ADAM = (_FIGURES[f'optimizer_{name}_10'] for name in ('rmsprop', 'sgd', 'adam'))

CLAIMS = (
    Claim('Plain E.T. overfits a 2-class subset (the sanity check)', _FIGURES['plain_2'].said,
          ('plain_2',), _overfits_two_classes),
    Claim('RMSprop 1e-3 cannot train E.T.: validation accuracy stays at chance',
          f'val {_text(_RMSPROP.top1)} (chance), train {_text(_RMSPROP.train_top1)}',
          ('optimizer_rmsprop_10',), _rmsprop_at_chance),
    Claim('SGD (momentum 0.9, decay 1e-6) trains E.T. slowly, below Adam',
          f'{_text(_SGD.top1)} after {_SGD.epochs} epochs vs {_text(_ADAM.top1)}',
          ('optimizer_sgd_10', 'optimizer_adam_10'), _sgd_slow),
    Claim('Adam 1e-3 with plateau halving is the best of the three optimizers',
          f'{_text(_ADAM.top1)} vs {_text(_SGD.top1)} (SGD) and {_RMSPROP.said} (RMSprop)',
          ('optimizer_adam_10', 'optimizer_sgd_10', 'optimizer_rmsprop_10'), _adam_best),
    Claim('Plain E.T. overfits early on 5 classes',
          f'overfits after ~{_said_epochs("plain_5")} epochs at {_said_top1("plain_5")}',
          ('plain_5',), _plain_overfits),
    Claim('Dropout 0.5 before the last Dense helps on 5 classes', _vs('dropout_5', 'plain_5'),
          ('dropout_5', 'plain_5'), _higher('dropout_5', 'plain_5')),
    Claim('With dropout the model converges later', f'~{_said_epochs("dropout_5")} epochs later',
          ('dropout_5', 'plain_5'), _later('dropout_5', 'plain_5')),
    Claim('The 8 augmentations help on 5 classes', _vs('augment8_5', 'plain_5'),
          ('augment8_5', 'plain_5'), _higher('augment8_5', 'plain_5')),
    Claim('Augmentation ends slightly below dropout', _vs('augment8_5', 'dropout_5'),
          ('dropout_5', 'augment8_5'), _higher('dropout_5', 'augment8_5')),
    Claim('Augmentation costs time per epoch',
          f'{_seconds_vs("augment8_5", "dropout_5")} (dropout)',
          ('augment8_5', 'dropout_5'), _slower('augment8_5', 'dropout_5')),
    Claim('Width (k=2) helps on 5 classes', _vs('wide_5', 'plain_5'), ('wide_5', 'plain_5'),
          _higher('wide_5', 'plain_5')),
    Claim('Width costs a little time per epoch', _seconds_vs('wide_5', 'plain_5'),
          ('wide_5', 'plain_5'), _slower('wide_5', 'plain_5')),
    Claim('Width helps on 200 classes early on',
          f'+{_text(_FIGURES["wide_200"].top1_gain)} in the first '
          f'{_said_epochs("wide_200")} epochs',
          ('wide_200', 'dropout_augment5_200'), _wide_200_early),
    Claim('Depth (8 modules) helps slightly on 5 classes', _vs('deep_5', 'plain_5'),
          ('deep_5', 'plain_5'), _higher('deep_5', 'plain_5')),
    Claim('Width is more effective than depth',
          f'{_said_top1("wide_5")} at {_said_seconds("wide_5")} s/epoch vs '
          f'{_said_top1("deep_5")} at {_said_seconds("deep_5")} s',
          ('wide_5', 'deep_5'), _wide_over_deep),
    Claim('A stride-2 max-pool after the stem hurts', _vs('stride2_5', 'plain_5'),
          ('stride2_5', 'plain_5'), _higher('plain_5', 'stride2_5')),
    Claim('Categorical hinge is worse than cross-entropy', _vs('hinge_5', 'plain_5'),
          ('hinge_5', 'plain_5'), _higher('plain_5', 'hinge_5')),
    Claim('tanh ends slightly below ReLU', _vs('tanh_5', 'plain_5'), ('tanh_5', 'plain_5'),
          _higher('plain_5', 'tanh_5')),
    Claim('tanh converges sooner than ReLU', f'~{_said_epochs("tanh_5")} epochs sooner',
          ('tanh_5', 'plain_5'), _tanh_sooner),
    Claim('tanh is less steady than ReLU', '"seems more unsteady"', ('tanh_5', 'plain_5'),
          _tanh_unsteady),
    Claim('VGG16 from scratch beats E.T. on 20 classes', _vs('vgg16_20', 'dropout_augment5_20'),
          ('vgg16_20', 'dropout_augment5_20'), _higher('vgg16_20', 'dropout_augment5_20')),
    Claim('ResNet50 from scratch beats E.T. on 20 classes',
          _vs('resnet50_20', 'dropout_augment5_20'), ('resnet50_20', 'dropout_augment5_20'),
          _higher('resnet50_20', 'dropout_augment5_20')),
    Claim('VGG16 and ResNet50 from scratch beat E.T. on 200 classes',
          f'{_said_top1("vgg16_200")} and {_vs("resnet50_200", "dropout_200")}',
          ('vgg16_200', 'resnet50_200', 'dropout_200'),
          _all(_higher('vgg16_200', 'dropout_200'), _higher('resnet50_200', 'dropout_200'))),
    Claim('Pretrained ResNet50 is the best model on 20 and 200 classes',
          f'{_said_top1("resnet50_pretrained_20")} and {_said_top1("resnet50_pretrained_200")}',
          ('resnet50_pretrained_20', 'resnet50_20', 'vgg16_pretrained_20', 'vgg16_20',
           'dropout_augment5_20', 'resnet50_pretrained_200', 'resnet50_200',
           'vgg16_pretrained_200', 'vgg16_200', 'dropout_200'),
          _all(_highest('resnet50_pretrained_20', 'resnet50_20', 'vgg16_pretrained_20',
                        'vgg16_20', 'dropout_augment5_20'),
               _highest('resnet50_pretrained_200', 'resnet50_200', 'vgg16_pretrained_200',
                        'vgg16_200', 'dropout_200'))),
    Claim('Pretrained VGG16 is below retrained on 20 classes, above on 200',
          f'{_vs("vgg16_pretrained_20", "vgg16_20")}; '
          f'{_vs("vgg16_pretrained_200", "vgg16_200")}',
          ('vgg16_pretrained_20', 'vgg16_20', 'vgg16_pretrained_200', 'vgg16_200'),
          _all(_higher('vgg16_20', 'vgg16_pretrained_20'),
               _higher('vgg16_pretrained_200', 'vgg16_200'))),
)
AGREES, DISAGREES, INCOMPLETE = 'agrees', 'disagrees', 'incomplete'
WITHIN_NOISE = 'within noise'  # several seeds: a difference inside their spread
_VERDICTS = {True: AGREES, False: DISAGREES, None: WITHIN_NOISE}


def _seed_runs(runs: RunResult | Sequence[RunResult]) -> list[RunResult]:
  return [runs] if isinstance(runs, RunResult) else list(runs)


def check_claims(results: Mapping[str, RunResult | Sequence[RunResult]]
                 ) -> list[dict[str, str]]:
  """Each claim whose runs are all in `results`: agrees, disagrees, within
  noise or incomplete.

  `results` gives each experiment's run, or its runs of several seeds. A
  claim is tested on finished runs only; with one that is not done, it is
  incomplete and says which. With several seeds a claim agrees or disagrees
  only where the numbers it compares differ by more than their spread
  (`above`), and is within noise otherwise.
  """
  seeds = {name: _seed_runs(runs) for name, runs in results.items()}
  checked = []
  for claim in CLAIMS:
    if not all(name in seeds for name in claim.runs):
      continue
    unfinished = [f'{run.run} {run.status}' for name in claim.runs for run in seeds[name]
                  if not run.finished]
    if unfinished:
      verdict, ours = INCOMPLETE, ', '.join(unfinished)
    else:
      agrees, ours = claim.test(seeds)
      verdict = _VERDICTS[agrees]
    checked.append({'finding': claim.finding, 'report': claim.report, 'ours': ours,
                    'verdict': verdict})
  return checked


def verdict_counts(checked: Sequence[Mapping[str, str]]) -> str:
  """'3 agrees, 1 disagrees, 2 incomplete', with 'within noise' where some are."""
  verdicts = [claim['verdict'] for claim in checked]
  shown = [AGREES, DISAGREES, *([WITHIN_NOISE] if WITHIN_NOISE in verdicts else []),
           INCOMPLETE]
  return ', '.join(f'{verdicts.count(v)} {v}' for v in shown)


def claims_markdown(checked: Sequence[Mapping[str, str]]) -> str:
  lines = ['| the report finds | report | ours | verdict |', '|---|---|---|---|']
  lines += [f'| {c["finding"]} | {c["report"]} | {c["ours"]} | **{c["verdict"]}** |'
            for c in checked]
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------
# The figure.

# The report's pairwise comparisons (and its table 5.1), one panel each.
PANELS = (
    ('dropout vs none', ('plain_5', 'dropout_5')),
    ('augmentation vs none', ('plain_5', 'augment8_5')),
    ('wide vs plain', ('plain_5', 'wide_5')),
    ('deep vs plain', ('plain_5', 'deep_5')),
    ('stride 2 vs 1', ('plain_5', 'stride2_5')),
    ('hinge vs cross-entropy', ('plain_5', 'hinge_5')),
    ('tanh vs relu', ('plain_5', 'tanh_5')),
    ('optimizers', ('optimizer_adam_10', 'optimizer_sgd_10', 'optimizer_rmsprop_10')),
    ('20 classes', ('dropout_augment5_20', 'vgg16_20', 'resnet50_20',
                    'vgg16_pretrained_20', 'resnet50_pretrained_20')),
    ('200 classes', ('dropout_200', 'vgg16_200', 'resnet50_200', 'vgg16_pretrained_200',
                     'resnet50_pretrained_200')),
)


def _ours(runs: RunResult | Sequence[RunResult]) -> tuple[float | None, float | None]:
  """Our val top-1 and its spread: the run's as far as it got, or with
  several seeds the mean and standard deviation of those that finished."""
  runs = _seed_runs(runs)
  if len(runs) == 1:
    return runs[0].top1, None
  finished = Measure(tuple(run.top1 for run in runs if run.finished))
  return (finished.mean, finished.std) if finished.values else (None, None)


def claims_figure(results: Mapping[str, RunResult | Sequence[RunResult]],
                  path: str | pathlib.Path | None = None, title: str = '') -> plt.Figure:
  """Val top-1, ours beside the report's, for each of the report's comparisons.

  A panel shows the runs of `results` it names; panels without any are left
  out. A run without a finished epoch has no bar of ours; with several
  seeds, ours is their mean with its standard deviation as an error bar.
  """
  panels = [(name, [run for run in runs if run in results]) for name, runs in PANELS]
  panels = [(name, runs) for name, runs in panels if runs]
  columns = min(5, max(1, len(panels)))
  rows = max(1, -(-len(panels) // columns))
  figure, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.6 * rows),
                              squeeze=False)
  for axis in axes.flat[len(panels):]:
    axis.set_visible(False)
  for axis, (name, runs) in zip(axes.flat, panels):
    positions = range(len(runs))
    report = [BY_NAME[run].report_top1 for run in runs]
    ours, spreads = zip(*(_ours(results[run]) for run in runs))
    axis.bar([p - 0.2 for p in positions], [v or 0 for v in report], 0.4,
             color='lightgray', edgecolor='gray', label='report')
    axis.bar([p + 0.2 for p in positions], [v or 0 for v in ours], 0.4,
             color='tab:blue', label='ours', capsize=3,
             yerr=([s or 0 for s in spreads]
                   if any(s is not None for s in spreads) else None))
    for position, (theirs, mine, spread) in enumerate(zip(report, ours, spreads)):
      for offset, value, above_bar in ((-0.2, theirs, 0), (0.2, mine, spread or 0)):
        axis.text(position + offset, (value or 0) + above_bar + 0.01,
                  '-' if value is None else f'{value:.2f}', ha='center', fontsize=7)
    axis.set_xticks(list(positions), [run.replace('optimizer_', '') for run in runs],
                    rotation=30, ha='right', fontsize=8)
    axis.set_ylim(0, 1.1)
    axis.set_title(name, fontsize=10)
    axis.set_ylabel('val top-1', fontsize=8)
  axes.flat[0].legend(fontsize=7, loc='upper right')
  if title:
    figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  if path is not None:
    figure.savefig(path, dpi=100)
  return figure
