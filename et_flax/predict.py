"""Writes a Kaggle-style submission: one predicted wnid per test image.

  python -m et_flax.predict --workdir=runs/dropout_200 --split=test \
      --output=submission.csv [--checkpoint=best] [--top5]

Format: CSV with a header, `file_name,wnid` (the top-1 prediction), plus a
`top5` column of five space-separated wnids, best first, with --top5. One
line per image of the split, in file-name order.
"""

from __future__ import annotations

import csv
import pathlib
from typing import Iterable

import numpy as np
from absl import flags

from et_flax import console
from et_flax import evaluate
from et_flax.data import input_pipeline
from et_flax.data import tiny_imagenet


def write_submission(workdir: str | pathlib.Path, output: str | pathlib.Path,
                     split: str = 'test', checkpoint: str = 'best', top5: bool = False,
                     data_dir: str | None = None) -> int:
  """Predicts every image of `split` and writes the CSV; returns the line count."""
  if split not in tiny_imagenet.SPLITS:
    raise ValueError(f'Unknown split {split!r}; valid splits: {list(tiny_imagenet.SPLITS)}')
  output = pathlib.Path(output)
  if output.exists():
    raise FileExistsError(f'{output} exists; remove it or choose another --output')
  run = evaluate.load_run(workdir, checkpoint, data_dir)
  data = input_pipeline.load_split(run.info, split)
  logits = evaluate.predict_logits(run, data)
  ranking = np.argsort(-logits, axis=1, kind='stable')[:, :min(5, run.info.num_classes)]
  order = sorted(range(len(data)), key=lambda i: _natural_key(data.file_names[i]))
  rows = ([data.file_names[i], run.info.wnids[ranking[i, 0]]]
          + ([' '.join(run.info.wnids[c] for c in ranking[i])] if top5 else [])
          for i in order)
  write_csv(output, ['file_name', 'wnid'] + (['top5'] if top5 else []), rows)
  return len(order)


def write_csv(output: pathlib.Path, header: list[str], rows: Iterable[list[str]]) -> None:
  """Writes `output` whole or not at all: the rows go to a .tmp file beside
  it, renamed when complete, and removed when writing fails (a full disk, an
  interrupt), so that no partial submission is left behind."""
  tmp = output.with_name(output.name + '.tmp')
  try:
    with tmp.open('w', newline='') as file:
      writer = csv.writer(file)
      writer.writerow(header)
      writer.writerows(rows)
    tmp.rename(output)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def read_submission(path: str | pathlib.Path) -> dict[str, list[str]]:
  """{file name: [wnid, ...best first]} from a submission CSV."""
  with pathlib.Path(path).open(newline='') as file:
    rows = list(csv.DictReader(file))
  return {row['file_name']: (row['top5'].split() if 'top5' in row else [row['wnid']])
          for row in rows}


def _natural_key(name: str):
  stem = name.split('.')[0]
  prefix, _, number = stem.rpartition('_')
  return (prefix, int(number)) if number.isdigit() else (stem, -1)


FLAGS = flags.FLAGS


def main(argv):
  del argv
  count = write_submission(FLAGS.workdir, FLAGS.output, FLAGS.split, FLAGS.checkpoint,
                           FLAGS.top5, FLAGS.data_dir)
  print(f'Wrote {count} predictions to {FLAGS.output}')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'A run workdir.')
  flags.DEFINE_string('output', None, 'The CSV to write.')
  flags.DEFINE_string('split', 'test', 'test (the Kaggle split), val or train.')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or an epoch number.")
  flags.DEFINE_bool('top5', False, 'Add a column with the five best wnids.')
  flags.DEFINE_string('data_dir', None, 'Override config.data.data_dir.')
  flags.mark_flags_as_required(['workdir', 'output'])
  console.run(main)
