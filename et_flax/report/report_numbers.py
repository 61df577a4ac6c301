"""The report's numbers: every figure it gives for each of its experiments.

The one place they live. `compare.REPORT_RESULTS` (table 5.1) and
`findings.EXPERIMENTS` and `findings.CLAIMS` (section 4) read them here, and
tests/test_report_numbers.py checks the copies that the config docstrings,
README.md and docs/ quote against them. Values are as the report prints them
(shared/seed/000_a22e51c30431948a.txt), validation accuracies as fractions.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Figures:
  """What the report gives for one experiment; None or '' where it gives nothing."""
  section: str  # where the report gives them
  top1: float | None = None  # validation top-1 (the report's "validation accuracy")
  top5: float | None = None  # validation top-5
  top1_precise: float | None = None  # where the report also gives more decimals
  top5_precise: float | None = None
  said: str = ''  # the report's words, where it gives no single number
  top1_range: tuple[float, float] | None = None  # where it gives top-1 as a range
  top1_gain: float | None = None  # top-1 over the experiment `said` names
  loss: float | None = None  # validation loss, with top1
  train_top1: float | None = None  # training accuracy, with top1
  seconds_per_epoch: float | None = None  # on its GTX 1080
  seconds_said: str = ''  # where seconds_per_epoch stands for a range or a bound
  epochs: int | None = None  # an epoch count the report gives, in `epochs_are`'s sense
  epochs_are: str = ''
  table_row: str = ''  # its row of table 5.1
  table_key: tuple[str, int, bool] | None = None  # that row's (model, classes, pretrained)

  @property
  def numbers(self) -> dict[str, float]:
    """The figures that are numbers, by field (a range as `<field>_low`, `_high`)."""
    numbers = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, tuple) and field.name.endswith('_range'):
        numbers[f'{field.name}_low'], numbers[f'{field.name}_high'] = value
      elif isinstance(value, (int, float)) and not isinstance(value, bool):
        numbers[field.name] = value
    return numbers


def _table(row: str, model: str, classes: int, pretrained: bool, top1: float,
           top5: float, section: str = 'table 5.1', **figures) -> Figures:
  return Figures(section, top1, top5, table_row=row,
                 table_key=(model, classes, pretrained), **figures)


_FUTURE_WORK = Figures('7')  # proposed, no result

# By experiment (configs/<name>.py), in the report's order.
FIGURES = {
    'plain_2': Figures('4', said='overfits'),
    'optimizer_adam_10': Figures('4.1', top1=0.55),
    'optimizer_sgd_10': Figures('4.1', top1=0.22, train_top1=0.18, said='0.22 after 800 epochs',
                                epochs=800, epochs_are='trained'),
    'optimizer_rmsprop_10': Figures('4.1', top1=0.05, train_top1=0.49, said='chance'),
    'plain_5': Figures('4.2, Fig. 4', top1=0.66, seconds_per_epoch=11, epochs=15,
                       epochs_are='overfitting from'),
    'dropout_5': Figures('4.2, Fig. 5', top1=0.72, loss=0.8, seconds_per_epoch=11,
                         epochs=400, epochs_are='converging later than plain_5 by'),
    'augment8_5': Figures('4.2, Fig. 6', top1=0.705, top1_range=(0.70, 0.71),
                          said='0.70-0.71', loss=0.68, seconds_per_epoch=17, epochs=900,
                          epochs_are='converged after'),
    'dropout_augment5_20': _table('E.T. (with dropout)', 'et', 20, False, 0.525, 0.838,
                                  '4.2, Fig. 7; table 5.1'),
    'dropout_augment5_200': Figures('4.2, Fig. 8', top1=0.29, said='~0.29',
                                    seconds_per_epoch=580, seconds_said='at least 580 s'),
    # The Kaggle model: table 5.1 gives 0.347 and 0.551, section 5.1's text
    # 0.3470 and 0.5509, section 4.2 "ca. 0.34". Seconds: the middle of the
    # 481-530 s section 4.2 gives.
    'dropout_200': _table('E.T. (with dropout)', 'et', 200, False, 0.347, 0.551,
                          '4.2, Fig. 9; table 5.1', top1_precise=0.3470,
                          top5_precise=0.5509, seconds_per_epoch=505,
                          seconds_said='481-530 s', epochs=172, epochs_are='trained'),
    'wide_5': Figures('4.3, Fig. 10', top1=0.70, said='0.70 at ~20 epochs',
                      seconds_per_epoch=13, epochs=20, epochs_are='reaching top1 at'),
    'wide_200': Figures('4.3', said='+0.01 over dropout_augment5_200 in 50 epochs',
                        top1_gain=0.01, epochs=50, epochs_are='the gain in the first'),
    'deep_5': Figures('4.3, Fig. 11', top1=0.68, seconds_per_epoch=22, epochs=23,
                      epochs_are='reaching top1 at'),
    'stride2_5': Figures('4.3, Fig. 12', top1=0.38),
    'hinge_5': Figures('4.4, Fig. 13', top1=0.60),
    'tanh_5': Figures('4.5, Fig. 14', top1=0.65, epochs=5,
                      epochs_are='converging sooner than plain_5 by'),
    'vgg16_20': _table('VGG16 (retrained)', 'vgg16', 20, False, 0.531, 0.854),
    'resnet50_20': _table('ResNet50 (retrained)', 'resnet50', 20, False, 0.562, 0.873),
    'vgg16_200': _table('VGG16 (retrained)', 'vgg16', 200, False, 0.442, 0.782),
    'resnet50_200': _table('ResNet50 (retrained)', 'resnet50', 200, False, 0.541, 0.801),
    'vgg16_pretrained_20': _table('VGG16 (pre-trained)', 'vgg16', 20, True, 0.456, 0.892),
    'resnet50_pretrained_20': _table('ResNet50 (pre-trained)', 'resnet50', 20, True,
                                     0.663, 0.909),
    'vgg16_pretrained_200': _table('VGG16 (pre-trained)', 'vgg16', 200, True, 0.520, 0.794),
    'resnet50_pretrained_200': _table('ResNet50 (pre-trained)', 'resnet50', 200, True,
                                      0.623, 0.821),
    'inblock_dropout_200': _FUTURE_WORK,
    'wide4_heavy_200': _FUTURE_WORK,
    'kernels135_5': _FUTURE_WORK,
    'tanh_200': _FUTURE_WORK,
}

# Table 5.1, in its order: (model, classes, pretrained) -> (row, top-1, top-5).
_TABLE_ORDER = ('dropout_augment5_20', 'dropout_200', 'vgg16_pretrained_20',
                'vgg16_pretrained_200', 'vgg16_20', 'vgg16_200', 'resnet50_pretrained_20',
                'resnet50_pretrained_200', 'resnet50_20', 'resnet50_200')
TABLE_5_1 = {FIGURES[name].table_key: (FIGURES[name].table_row, FIGURES[name].top1,
                                       FIGURES[name].top5) for name in _TABLE_ORDER}


def text(value: float, decimals: int | None = None) -> str:
  """A figure as the report writes it: with `decimals`, or two where three
  would end in 0."""
  if decimals is None:
    decimals = 2 if round(value, 2) == value else 3
  return f'{value:.{decimals}f}'


def top1(name: str) -> str:
  """Experiment `name`'s top-1 as the report writes it: table 5.1's with
  three decimals, a range as one."""
  figures = FIGURES[name]
  if figures.top1_range:
    return '-'.join(text(value) for value in figures.top1_range)
  return text(figures.top1, 3 if figures.table_key else None)
