"""The report's numbers have one owner: et_flax/report/report_numbers.py.

Every figure of the report that a config docstring or README.md quotes is
read back and checked against that table; compare.py and findings.py read it.
"""

import ast
import dataclasses
import pathlib
import re

import pytest

from et_flax import compare
from et_flax.report import findings
from et_flax.report import report_numbers

REPO = pathlib.Path(__file__).resolve().parent.parent
FIGURES = report_numbers.FIGURES
DECIMAL = r'(\d\.\d+)'
_NAMES = '|'.join(sorted(FIGURES, key=len, reverse=True))

# What a docstring says that is a setting of ours or the report's, not a
# result: left out before the figures are read.
SETTINGS = (r'Report \([^)]*\)', r'(?:dropout|momentum) \d\.\d+', r'(?:from )?0\.1 to 1e-6',
            r'0\.01 is our choice', r'not improved for \d+ epochs')
# (field, pattern): a figure and the words that name it, in the order tried.
# A `<name>: 0.66` or `<name> (0.66)` is the top-1 of experiment <name>.
LABELS = (
    ('top1_range', rf'~?{DECIMAL}-{DECIMAL}'),
    ('top5', rf'top-5 {DECIMAL}'),
    ('train_top1', rf'training accuracy (?:rose to |of )?{DECIMAL}'),
    ('loss', rf'loss (?:of )?{DECIMAL}'),
    ('top1_gain', rf'\+?{DECIMAL} (?:more validation accuracy|over)'),
    ('top1', rf'\b(?:{_NAMES})\b:? \(?~?{DECIMAL}'),
    ('top1', rf'(?:top-1|validation accuracy)(?: reached| of| at)? ~?{DECIMAL}'),
    ('top1', rf'^~?{DECIMAL}'),  # a README cell's first number
    ('seconds_per_epoch', r'(\d+(?:\.\d+)?) ?s(?:/epoch)?\b'),
    ('epochs', r'~?(\d+) epochs\b'),
    ('epochs', r'\bepoch (\d+)\b'),
)
UNREAD = r'\d\.\d+|\d+ epochs?\b|\bepoch \d+'


@dataclasses.dataclass(frozen=True)
class Quote:
  """A figure of the report as a file quotes it."""
  where: str
  name: str  # the experiment
  field: str
  number: str  # as written


def _read(where: str, name: str, text: str) -> tuple[list[Quote], str]:
  """The figures `text` quotes for experiment `name`, and what is left unread."""
  text = ' '.join(text.split())
  for setting in SETTINGS:
    text = re.sub(setting, ' ', text)
  quotes = []
  for field, pattern in LABELS:
    for match in re.finditer(pattern, text):
      other = re.match(rf'\b({_NAMES})\b', match.group(0))
      owner = other.group(1) if other else name
      if field == 'top1_range':
        quotes += [Quote(where, owner, 'top1_range_low', match.group(1)),
                   Quote(where, owner, 'top1_range_high', match.group(2))]
      else:
        quotes.append(Quote(where, owner, field, match.group(1)))
    text = re.sub(pattern, ' ', text)
  return quotes, text


def _decimals(number: str) -> int:
  return len(number.partition('.')[2])


def _agrees(number: str, value: float | None) -> bool:
  """`number` is `value` as written, or with more zeros (0.70 for 0.7)."""
  if value is None:
    return False
  decimals = _decimals(str(value))
  return (_decimals(number) >= decimals
          and round(float(number), decimals) == round(value, decimals))


def _field(quote: Quote) -> str:
  """The table's field for `quote`: <field>_precise where the table has one
  and the quote gives four decimals (0.5509), else <field> (0.551)."""
  precise = FIGURES[quote.name].numbers.get(f'{quote.field}_precise')
  if precise is not None and _decimals(quote.number) >= 4:
    return f'{quote.field}_precise'
  return quote.field


def _problems(quotes: list[Quote]) -> list[str]:
  problems = []
  for quote in quotes:
    field = _field(quote)
    value = FIGURES[quote.name].numbers.get(field)
    if not _agrees(quote.number, value):
      has = 'has none' if value is None else f'is {value}'
      problems.append(f'{quote.where} quotes {quote.field} {quote.number} for {quote.name}; '
                      f'report_numbers.FIGURES[{quote.name!r}].{field} {has}')
  return problems


def _docstring(name: str) -> str:
  """configs/<name>.py's docstring without its command."""
  doc = ast.get_docstring(ast.parse((REPO / 'configs' / f'{name}.py').read_text()))
  return '\n'.join(line for line in doc.splitlines() if 'python -m' not in line)


def docstring_problems(name: str, doc: str | None = None) -> list[str]:
  where = f'configs/{name}.py'
  quotes, unread = _read(where, name, _docstring(name) if doc is None else doc)
  problems = _problems(quotes)
  problems += [f'{where} quotes {left!r} with no words the test reads as a figure'
               for left in re.findall(UNREAD, unread)]
  return problems


def _readme_rows(readme: str) -> list[tuple[str, str, str]]:
  """(config, experiment, report) per config of README.md's config table."""
  lines = readme.split('| config | experiment |', 1)[1]
  rows = []
  for line in lines.splitlines()[2:]:
    if not line.startswith('|'):
      break
    names, experiment, report = (cell.strip() for cell in line.strip('|').split('|'))
    names = [name.strip().strip('`') for name in names.split(',')]
    cells = report.split(', ') if len(names) > 1 else [report]
    assert len(cells) == len(names), f'README.md: one report cell per config in {line}'
    rows += [(name, experiment, cell) for name, cell in zip(names, cells)]
  return rows


def readme_problems(readme: str | None = None) -> list[str]:
  problems = []
  readme = (REPO / 'README.md').read_text() if readme is None else readme
  for name, experiment, report in _readme_rows(readme):
    where = f"README.md's config table ({name})"
    figures = FIGURES.get(name)
    if figures is None or report == '-':
      if report != '-' or (figures and (figures.top1 or figures.said)):
        problems.append(f'{where} says {report!r}; report_numbers.FIGURES has '
                        f'{figures and (figures.top1 or figures.said)!r}')
      continue
    if not re.search(r'\d', report):
      if report != figures.said:
        problems.append(f'{where} says {report!r}; report_numbers.FIGURES[{name!r}].said '
                        f'is {figures.said!r}')
      continue
    report = report.replace(' / ', ' top-5 ')
    quotes, unread = _read(where, name, report)
    quotes += [Quote(where, name, 'epochs', epochs)
               for epochs in re.findall(r'(\d+) epochs', experiment)]
    problems += _problems(quotes)
    problems += [f'{where} quotes {left!r} with no words the test reads as a figure'
                 for left in re.findall(UNREAD, unread)]
  return problems


def docs_problems() -> list[str]:
  """A top-1 / top-5 pair on a docs/ page that is not a row of table 5.1."""
  rows = {(top1, top5) for _, top1, top5 in report_numbers.TABLE_5_1.values()}
  problems = []
  for page in sorted((REPO / 'docs').glob('*.md')):
    for top1, top5 in re.findall(rf'{DECIMAL} / {DECIMAL}', page.read_text()):
      if (float(top1), float(top5)) not in rows:
        problems.append(f'docs/{page.name} quotes {top1} / {top5}, not a row of '
                        'report_numbers.TABLE_5_1')
  return problems


CONFIGS_WITH_FIGURES = sorted(FIGURES)


@pytest.mark.parametrize('name', CONFIGS_WITH_FIGURES)
def test_a_config_docstring_quotes_the_report_as_the_table_has_it(name):
  assert not docstring_problems(name), '\n'.join(docstring_problems(name))


def test_the_readme_quotes_the_report_as_the_table_has_it():
  assert not readme_problems(), '\n'.join(readme_problems())


def test_the_docs_quote_table_5_1_as_the_table_has_it():
  assert not docs_problems(), '\n'.join(docs_problems())


def test_the_docstrings_quote_every_figure_they_are_meant_to():
  quoted = {(q.name, q.field) for name in FIGURES
            for q in _read(name, name, _docstring(name))[0]}
  for name in ('dropout_200', 'vgg16_20', 'resnet50_pretrained_200'):
    assert {(name, 'top1'), (name, 'top5')} <= quoted
  assert ('augment8_5', 'top1_range_low') in quoted and ('dropout_5', 'loss') in quoted
  assert ('optimizer_sgd_10', 'train_top1') in quoted and ('deep_5', 'epochs') in quoted


def test_a_changed_number_fails_naming_the_file_the_number_and_the_table():
  doc = _docstring('dropout_200').replace('0.5509', '0.5511')
  assert docstring_problems('dropout_200', doc) == [
      'configs/dropout_200.py quotes top5 0.5511 for dropout_200; '
      "report_numbers.FIGURES['dropout_200'].top5_precise is 0.5509"]
  doc = _docstring('stride2_5').replace('0.66', '0.65')
  assert docstring_problems('stride2_5', doc) == [
      'configs/stride2_5.py quotes top1 0.65 for plain_5; '
      "report_numbers.FIGURES['plain_5'].top1 is 0.66"]
  doc = _docstring('plain_5') + ' It reached 0.67 later.'
  assert docstring_problems('plain_5', doc) == [
      "configs/plain_5.py quotes '0.67' with no words the test reads as a figure"]
  readme = (REPO / 'README.md').read_text().replace('| 0.562 / 0.873, 0.541 / 0.801 |',
                                                     '| 0.562 / 0.873, 0.541 / 0.810 |')
  assert readme_problems(readme) == [
      "README.md's config table (resnet50_200) quotes top5 0.810 for resnet50_200; "
      "report_numbers.FIGURES['resnet50_200'].top5 is 0.801"]
  readme = readme.replace('| `plain_5` | plain E.T., 5 classes | 0.66 |',
                          '| `plain_5` | plain E.T., 5 classes | about 0.7 |')
  assert readme_problems(readme)[0] == (
      "README.md's config table (plain_5) quotes '0.7' with no words the test reads as a "
      'figure')


def test_every_number_the_table_words_hold_is_one_of_its_figures():
  for name, figures in FIGURES.items():
    said = re.sub(rf'\b({_NAMES})\b', '', figures.said)
    for number in re.findall(r'\d+(?:\.\d+)?', said):
      assert any(_agrees(number, value) for value in figures.numbers.values()), (name, number)
    bounds = [float(n) for n in re.findall(r'\d+', figures.seconds_said)]
    if bounds:
      assert min(bounds) <= figures.seconds_per_epoch <= max(bounds), name


def test_compare_and_findings_read_the_table():
  assert compare.REPORT_RESULTS is report_numbers.TABLE_5_1
  assert len(report_numbers.TABLE_5_1) == 10
  assert sorted(FIGURES) == sorted(e.name for e in findings.EXPERIMENTS)
  for experiment in findings.EXPERIMENTS:
    figures = FIGURES[experiment.name]
    assert (experiment.report_top1, experiment.report_top5) == (figures.top1, figures.top5)
    if figures.table_key:
      assert compare.REPORT_RESULTS[figures.table_key][1:] == (figures.top1, figures.top5)
