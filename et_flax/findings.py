"""The report's results and findings set beside a sweep's runs.

`EXPERIMENTS` lists every experiment config with what the report got;
`run_result` reads a finished (or partial) run from its workdir's history;
`table_rows` puts our numbers beside the report's; `CLAIMS` are the report's
qualitative findings, each checked against our runs (`check_claims`);
`claims_figure` draws the report's pairwise comparisons side by side.
The numbers of the report's table 5.1 are compare.REPORT_RESULTS's.
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt

from et_flax import compare
from et_flax import run_files

REPORT, FUTURE_WORK, PRETRAINED = 'report', 'future work', 'pretrained'


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One config of the report, and what the report says it got."""
  name: str  # configs/<name>.py, and the run's sub-workdir
  what: str
  group: str = REPORT
  top1: float | None = None  # validation top-1 as the report gives it
  top5: float | None = None
  said: str = ''  # the report's words, where it gives no single number
  seconds_per_epoch: float | None = None  # the report's, on its GTX 1080
  table_key: tuple[str, int, bool] | None = None  # its row in table 5.1

  @property
  def report_top1(self) -> float | None:
    return compare.REPORT_RESULTS[self.table_key][1] if self.table_key else self.top1

  @property
  def report_top5(self) -> float | None:
    return compare.REPORT_RESULTS[self.table_key][2] if self.table_key else self.top5


# In the report's order (section 4, then table 5.1, then section 7).
EXPERIMENTS = (
    Experiment('plain_2', 'plain E.T., 2 classes', said='overfits'),
    Experiment('optimizer_adam_10', 'Adam 1e-3 + plateau halving, 10 classes', top1=0.55),
    Experiment('optimizer_sgd_10', 'SGD 0.01, momentum 0.9, 10 classes', top1=0.22,
               said='0.22 after 800 epochs'),
    Experiment('optimizer_rmsprop_10', 'RMSprop 1e-3, 10 classes', top1=0.05,
               said='chance'),
    Experiment('plain_5', 'plain E.T., 5 classes', top1=0.66, seconds_per_epoch=11),
    Experiment('dropout_5', 'dropout 0.5, 5 classes', top1=0.72, seconds_per_epoch=11),
    Experiment('augment8_5', '8 augmentations, 5 classes', top1=0.705, said='0.70-0.71',
               seconds_per_epoch=17),
    Experiment('dropout_augment5_20', 'dropout + 5 augmentations, 20 classes',
               table_key=('et', 20, False)),
    Experiment('dropout_augment5_200', 'dropout + 5 augmentations, 200 classes', top1=0.29,
               said='~0.29', seconds_per_epoch=580),
    Experiment('dropout_200', 'dropout, 200 classes (the Kaggle model)',
               table_key=('et', 200, False), seconds_per_epoch=505),
    Experiment('wide_5', 'k=2, 5 classes', top1=0.70, said='0.70 at ~20 epochs',
               seconds_per_epoch=13),
    Experiment('wide_200', 'k=2 + dropout + 5 augmentations, 200 classes',
               said='+0.01 over dropout_augment5_200 in 50 epochs'),
    Experiment('deep_5', '8 modules, 5 classes', top1=0.68, seconds_per_epoch=22),
    Experiment('stride2_5', 'stride-2 max-pool after the stem, 5 classes', top1=0.38),
    Experiment('hinge_5', 'categorical hinge, 5 classes', top1=0.60),
    Experiment('tanh_5', 'tanh, 5 classes', top1=0.65),
    Experiment('vgg16_20', 'VGG16 from scratch, 20 classes', table_key=('vgg16', 20, False)),
    Experiment('resnet50_20', 'ResNet50 from scratch, 20 classes',
               table_key=('resnet50', 20, False)),
    Experiment('vgg16_200', 'VGG16 from scratch, 200 classes',
               table_key=('vgg16', 200, False)),
    Experiment('resnet50_200', 'ResNet50 from scratch, 200 classes',
               table_key=('resnet50', 200, False)),
    Experiment('vgg16_pretrained_20', 'VGG16 from ImageNet weights, 20 classes',
               PRETRAINED, table_key=('vgg16', 20, True)),
    Experiment('resnet50_pretrained_20', 'ResNet50 from ImageNet weights, 20 classes',
               PRETRAINED, table_key=('resnet50', 20, True)),
    Experiment('vgg16_pretrained_200', 'VGG16 from ImageNet weights, 200 classes',
               PRETRAINED, table_key=('vgg16', 200, True)),
    Experiment('resnet50_pretrained_200', 'ResNet50 from ImageNet weights, 200 classes',
               PRETRAINED, table_key=('resnet50', 200, True)),
    Experiment('inblock_dropout_200', 'dropout 0.1 inside the blocks, 200 classes',
               FUTURE_WORK),
    Experiment('wide4_heavy_200', 'k=4 + heavy augmentation, 200 classes', FUTURE_WORK),
    Experiment('kernels135_5', '1x1, 3x3, 5x5 kernels in turn, 5 classes', FUTURE_WORK),
    Experiment('tanh_200', 'tanh + dropout, 200 classes', FUTURE_WORK),
)
BY_NAME = {experiment.name: experiment for experiment in EXPERIMENTS}


# ---------------------------------------------------------------------------
# A run, as its workdir records it.

@dataclasses.dataclass
class RunResult:
  """A run's status (from the sweep) and its history (from its workdir)."""
  name: str
  status: str  # pending | running | done | failed | interrupted
  message: str = ''
  num_classes: int | None = None
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

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
               message: str = '') -> RunResult:
  """The run in `workdir` (which may not exist yet)."""
  workdir = pathlib.Path(workdir)
  return RunResult(name, status, message, run_files.num_classes(workdir),
                   run_files.read_history(workdir, missing_ok=True))


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


def table_rows(results: Sequence[RunResult], quick: bool = False) -> list[dict[str, Any]]:
  """One row per run: ours (best val epoch) beside the report's; no gap in quick mode."""
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


def _cell(column: str, value: Any) -> str:
  if value is None or value == '':
    return '-'
  if column.startswith('gap'):
    return f'{value:+.3f}'
  if 'seconds' in column:
    return f'{value:.1f}' if value < 100 else f'{value:.0f}'
  return f'{value:.3f}' if isinstance(value, float) else str(value)


def table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  lines = ['| ' + ' | '.join(_HEADERS) + ' |', '|' + '---|' * len(_HEADERS)]
  lines += ['| ' + ' | '.join(_cell(c, row[c]) for c in COLUMNS) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------
# The report's findings.

Results = Mapping[str, RunResult]


@dataclasses.dataclass(frozen=True)
class Claim:
  """A qualitative finding of the report, and how our runs test it.

  `test` returns whether our runs agree and our numbers, in words.
  """
  finding: str
  report: str  # the report's numbers
  runs: tuple[str, ...]
  test: Callable[[Results], tuple[bool, str]]


def _top1s(results: Results, *names: str) -> str:
  return ', '.join(f'{name} {results[name].top1:.3f}' for name in names)


def _higher(better: str, worse: str) -> Callable[[Results], tuple[bool, str]]:
  return lambda r: (r[better].top1 > r[worse].top1, _top1s(r, better, worse))


def _slower(slow: str, fast: str) -> Callable[[Results], tuple[bool, str]]:
  return lambda r: (r[slow].seconds_per_epoch > r[fast].seconds_per_epoch,
                    f'{slow} {r[slow].seconds_per_epoch:.2f} s/epoch, '
                    f'{fast} {r[fast].seconds_per_epoch:.2f}')


def _overfits_two_classes(r: Results) -> tuple[bool, str]:
  train = max(e['train_top1_accuracy'] for e in r['plain_2'].history)
  return train >= 0.95, f'plain_2 best train top-1 {train:.3f} (agrees at >= 0.95)'


def _rmsprop_at_chance(r: Results) -> tuple[bool, str]:
  run = r['optimizer_rmsprop_10']
  train = run.history[-1]['train_top1_accuracy']
  return run.top1 <= 1.5 * run.chance, (
      f'best val top-1 {run.top1:.3f} (chance {run.chance:.3f}; agrees at <= 1.5x chance), '
      f'last train top-1 {train:.3f}')


def _adam_best(r: Results) -> tuple[bool, str]:
  adam, sgd, rmsprop = 'optimizer_adam_10', 'optimizer_sgd_10', 'optimizer_rmsprop_10'
  return (r[adam].top1 > max(r[sgd].top1, r[rmsprop].top1),
          _top1s(r, adam, sgd, rmsprop))


def _sgd_slow(r: Results) -> tuple[bool, str]:
  adam, sgd = r['optimizer_adam_10'], r['optimizer_sgd_10']
  level = min(adam.top1, sgd.top1)
  reached = {run.name: next(e['epoch'] for e in run.history
                            if e['val_top1_accuracy'] >= level) for run in (adam, sgd)}
  return sgd.top1 < adam.top1, (
      f'{_top1s(r, sgd.name, adam.name)}; val top-1 {level:.3f} first at epoch '
      f'{reached[sgd.name]} (SGD) and {reached[adam.name]} (Adam)')


def _later(late: str, early: str) -> Callable[[Results], tuple[bool, str]]:
  return lambda r: (r[late].best['epoch'] > r[early].best['epoch'],
                    f'best val epoch: {late} {r[late].best["epoch"]}, '
                    f'{early} {r[early].best["epoch"]}')


def _plain_overfits(r: Results) -> tuple[bool, str]:
  run = r['plain_5']
  last = run.history[-1]
  gap = last['train_top1_accuracy'] - last['val_top1_accuracy']
  return run.best['epoch'] <= run.epochs / 2 and gap > 0.1, (
      f'best val epoch {run.best["epoch"]} of {run.epochs}; last epoch train top-1 '
      f'{last["train_top1_accuracy"]:.3f}, val {last["val_top1_accuracy"]:.3f} '
      '(agrees: best in the first half, train above val by > 0.1)')


def _wide_over_deep(r: Results) -> tuple[bool, str]:
  wide, deep = r['wide_5'], r['deep_5']
  return (wide.top1 >= deep.top1 and wide.seconds_per_epoch < deep.seconds_per_epoch,
          f'{_top1s(r, "wide_5", "deep_5")}; {wide.seconds_per_epoch:.2f} vs '
          f'{deep.seconds_per_epoch:.2f} s/epoch')


def _tanh_sooner(r: Results) -> tuple[bool, str]:
  tanh, relu = r['tanh_5'].converged_epoch(), r['plain_5'].converged_epoch()
  return tanh < relu, (f'95% of the best val top-1 first at epoch {tanh} (tanh), '
                       f'{relu} (relu)')


def _unsteadiness(run: RunResult) -> float:
  values = [e['val_top1_accuracy'] for e in run.history]
  steps = [abs(b - a) for a, b in zip(values, values[1:])]
  return statistics.mean(steps) if steps else 0.0


def _tanh_unsteady(r: Results) -> tuple[bool, str]:
  tanh, relu = _unsteadiness(r['tanh_5']), _unsteadiness(r['plain_5'])
  return tanh > relu, (f'mean change of val top-1 between epochs: tanh {tanh:.3f}, '
                       f'relu {relu:.3f}')


def _wide_200_early(r: Results) -> tuple[bool, str]:
  wide, plain = r['wide_200'], r['dropout_augment5_200']
  epoch = min(50, wide.epochs, plain.epochs)
  ours, theirs = wide.top1_until(epoch), plain.top1_until(epoch)
  return ours > theirs, (f'best val top-1 in the first {epoch} epochs: wide_200 '
                         f'{ours:.3f}, dropout_augment5_200 {theirs:.3f}')


def _highest(best: str, *others: str) -> Callable[[Results], tuple[bool, str]]:
  return lambda r: (r[best].top1 > max(r[o].top1 for o in others),
                    _top1s(r, best, *others))


def _all(*tests: Callable[[Results], tuple[bool, str]]
         ) -> Callable[[Results], tuple[bool, str]]:
  def test(r: Results) -> tuple[bool, str]:
    outcomes = [t(r) for t in tests]
    return all(agrees for agrees, _ in outcomes), '; '.join(words for _, words in outcomes)
  return test


CLAIMS = (
    Claim('Plain E.T. overfits a 2-class subset (the sanity check)', 'overfits',
          ('plain_2',), _overfits_two_classes),
    Claim('RMSprop 1e-3 cannot train E.T.: validation accuracy stays at chance',
          'val 0.05 (chance), train 0.49', ('optimizer_rmsprop_10',), _rmsprop_at_chance),
    Claim('SGD (momentum 0.9, decay 1e-6) trains E.T. slowly, below Adam',
          '0.22 after 800 epochs vs 0.55', ('optimizer_sgd_10', 'optimizer_adam_10'),
          _sgd_slow),
    Claim('Adam 1e-3 with plateau halving is the best of the three optimizers',
          '0.55 vs 0.22 (SGD) and chance (RMSprop)',
          ('optimizer_adam_10', 'optimizer_sgd_10', 'optimizer_rmsprop_10'), _adam_best),
    Claim('Plain E.T. overfits early on 5 classes', 'overfits after ~15 epochs at 0.66',
          ('plain_5',), _plain_overfits),
    Claim('Dropout 0.5 before the last Dense helps on 5 classes', '0.72 vs 0.66',
          ('dropout_5', 'plain_5'), _higher('dropout_5', 'plain_5')),
    Claim('With dropout the model converges later', '~400 epochs later',
          ('dropout_5', 'plain_5'), _later('dropout_5', 'plain_5')),
    Claim('The 8 augmentations help on 5 classes', '0.70-0.71 vs 0.66',
          ('augment8_5', 'plain_5'), _higher('augment8_5', 'plain_5')),
    Claim('Augmentation ends slightly below dropout', '0.70-0.71 vs 0.72',
          ('dropout_5', 'augment8_5'), _higher('dropout_5', 'augment8_5')),
    Claim('Augmentation costs time per epoch', '17 s vs 11 s (dropout)',
          ('augment8_5', 'dropout_5'), _slower('augment8_5', 'dropout_5')),
    Claim('Width (k=2) helps on 5 classes', '0.70 vs 0.66', ('wide_5', 'plain_5'),
          _higher('wide_5', 'plain_5')),
    Claim('Width costs a little time per epoch', '13 s vs 11 s', ('wide_5', 'plain_5'),
          _slower('wide_5', 'plain_5')),
    Claim('Width helps on 200 classes early on', '+0.01 in the first 50 epochs',
          ('wide_200', 'dropout_augment5_200'), _wide_200_early),
    Claim('Depth (8 modules) helps slightly on 5 classes', '0.68 vs 0.66',
          ('deep_5', 'plain_5'), _higher('deep_5', 'plain_5')),
    Claim('Width is more effective than depth', '0.70 at 13 s/epoch vs 0.68 at 22 s',
          ('wide_5', 'deep_5'), _wide_over_deep),
    Claim('A stride-2 max-pool after the stem hurts', '0.38 vs 0.66',
          ('stride2_5', 'plain_5'), _higher('plain_5', 'stride2_5')),
    Claim('Categorical hinge is worse than cross-entropy', '0.60 vs 0.66',
          ('hinge_5', 'plain_5'), _higher('plain_5', 'hinge_5')),
    Claim('tanh ends slightly below ReLU', '0.65 vs 0.66', ('tanh_5', 'plain_5'),
          _higher('plain_5', 'tanh_5')),
    Claim('tanh converges sooner than ReLU', '~5 epochs sooner', ('tanh_5', 'plain_5'),
          _tanh_sooner),
    Claim('tanh is less steady than ReLU', '"seems more unsteady"', ('tanh_5', 'plain_5'),
          _tanh_unsteady),
    Claim('VGG16 from scratch beats E.T. on 20 classes', '0.531 vs 0.525',
          ('vgg16_20', 'dropout_augment5_20'), _higher('vgg16_20', 'dropout_augment5_20')),
    Claim('ResNet50 from scratch beats E.T. on 20 classes', '0.562 vs 0.525',
          ('resnet50_20', 'dropout_augment5_20'),
          _higher('resnet50_20', 'dropout_augment5_20')),
    Claim('VGG16 and ResNet50 from scratch beat E.T. on 200 classes',
          '0.442 and 0.541 vs 0.347', ('vgg16_200', 'resnet50_200', 'dropout_200'),
          _all(_higher('vgg16_200', 'dropout_200'), _higher('resnet50_200', 'dropout_200'))),
    Claim('Pretrained ResNet50 is the best model on 20 and 200 classes',
          '0.663 and 0.623',
          ('resnet50_pretrained_20', 'resnet50_20', 'vgg16_pretrained_20', 'vgg16_20',
           'dropout_augment5_20', 'resnet50_pretrained_200', 'resnet50_200',
           'vgg16_pretrained_200', 'vgg16_200', 'dropout_200'),
          _all(_highest('resnet50_pretrained_20', 'resnet50_20', 'vgg16_pretrained_20',
                        'vgg16_20', 'dropout_augment5_20'),
               _highest('resnet50_pretrained_200', 'resnet50_200', 'vgg16_pretrained_200',
                        'vgg16_200', 'dropout_200'))),
    Claim('Pretrained VGG16 is below retrained on 20 classes, above on 200',
          '0.456 vs 0.531; 0.520 vs 0.442',
          ('vgg16_pretrained_20', 'vgg16_20', 'vgg16_pretrained_200', 'vgg16_200'),
          _all(_higher('vgg16_20', 'vgg16_pretrained_20'),
               _higher('vgg16_pretrained_200', 'vgg16_200'))),
)
AGREES, DISAGREES, INCOMPLETE = 'agrees', 'disagrees', 'incomplete'


def check_claims(results: Results) -> list[dict[str, str]]:
  """Each claim whose runs are all in `results`: agrees, disagrees or incomplete.

  A claim is tested on finished runs only; with one that is not done, it is
  incomplete and says which.
  """
  checked = []
  for claim in CLAIMS:
    if not all(name in results for name in claim.runs):
      continue
    unfinished = [f'{name} {results[name].status}' for name in claim.runs
                  if results[name].status != 'done' or not results[name].history]
    if unfinished:
      verdict, ours = INCOMPLETE, ', '.join(unfinished)
    else:
      agrees, ours = claim.test(results)
      verdict = AGREES if agrees else DISAGREES
    checked.append({'finding': claim.finding, 'report': claim.report, 'ours': ours,
                    'verdict': verdict})
  return checked


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


def claims_figure(results: Results, path: str | pathlib.Path | None = None,
                  title: str = '') -> plt.Figure:
  """Val top-1, ours beside the report's, for each of the report's comparisons.

  A panel shows the runs of `results` it names; panels without any are left
  out. A run without a finished epoch has no bar of ours.
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
    ours = [results[run].top1 for run in runs]
    axis.bar([p - 0.2 for p in positions], [v or 0 for v in report], 0.4,
             color='lightgray', edgecolor='gray', label='report')
    axis.bar([p + 0.2 for p in positions], [v or 0 for v in ours], 0.4,
             color='tab:blue', label='ours')
    for position, (theirs, mine) in enumerate(zip(report, ours)):
      for offset, value in ((-0.2, theirs), (0.2, mine)):
        axis.text(position + offset, (value or 0) + 0.01,
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
