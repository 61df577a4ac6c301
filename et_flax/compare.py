"""The report's comparison table from your runs, with the report's numbers.

  python -m et_flax.compare runs/dropout_augment5_20 runs/vgg16_20 ... \
      [--output=comparison] [--checkpoint=best]

For each workdir: its validation top-1 and top-5 (from eval_val_<ckpt>.json,
evaluating first where it is missing) beside the report's result for the same
model and class count (pretrained or not); the report's rows that no run
matches follow for reference.
Writes <output>.md and <output>.csv and prints the Markdown.
"""

from __future__ import annotations

import csv
import json
import pathlib
from collections.abc import Sequence
from typing import Any

from absl import app
from absl import flags

from et_flax import console
from et_flax import evaluate
from et_flax.report import report_numbers

# The report's table 5.1: (model, classes, pretrained) -> (row, top-1, top-5).
REPORT_RESULTS = report_numbers.TABLE_5_1
COLUMNS = ['run', 'model', 'classes', 'epoch', 'top1', 'top5', 'report_model',
           'report_top1', 'report_top5']


def comparison_rows(workdirs: Sequence[str | pathlib.Path], checkpoint: str = 'best'
                    ) -> list[dict[str, Any]]:
  rows, matched = [], set()
  for workdir in workdirs:
    workdir = pathlib.Path(workdir)
    path = workdir / f'eval_val_{checkpoint}.json'
    if path.exists():
      report = json.loads(path.read_text())
    else:
      report = evaluate.evaluate_run(workdir, checkpoint, 'val', figures=False)
    key = (report['model'], report['num_classes'], report.get('pretrained', False))
    reference = REPORT_RESULTS.get(key)
    matched.add(key)
    rows.append({
        'run': workdir.name, 'model': report['model'], 'classes': report['num_classes'],
        'epoch': report['epoch'], 'top1': report['top1_accuracy'],
        'top5': report['top5_accuracy'],
        'report_model': reference[0] if reference else '',
        'report_top1': reference[1] if reference else None,
        'report_top5': reference[2] if reference else None})
  for key, (name, top1, top5) in REPORT_RESULTS.items():
    if key not in matched:
      rows.append({'run': '(report only)', 'model': key[0], 'classes': key[1],
                   'epoch': None, 'top1': None, 'top5': None, 'report_model': name,
                   'report_top1': top1, 'report_top5': top5})
  return rows


def _cell(value: Any) -> str:
  if value is None:
    return '-'
  return f'{value:.3f}' if isinstance(value, float) else str(value)


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  lines += ['| ' + ' | '.join(_cell(row[c]) for c in COLUMNS) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def write_comparison(workdirs: Sequence[str | pathlib.Path], output: str | pathlib.Path,
                     checkpoint: str = 'best') -> list[dict[str, Any]]:
  rows = comparison_rows(workdirs, checkpoint)
  output = pathlib.Path(output)
  output.with_suffix('.md').write_text(to_markdown(rows))
  with output.with_suffix('.csv').open('w', newline='') as file:
    writer = csv.DictWriter(file, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  return rows


FLAGS = flags.FLAGS


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError('Name one or more run workdirs to compare.')
  rows = write_comparison(workdirs, FLAGS.output, FLAGS.checkpoint)
  print(to_markdown(rows))


if __name__ == '__main__':
  flags.DEFINE_string('output', 'comparison', 'Writes <output>.md and <output>.csv.')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or an epoch number.")
  console.run(main)
