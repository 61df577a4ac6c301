"""Evaluates a finished (or running) workdir and draws the report's figures.

  python -m et_flax.evaluate --workdir=runs/dropout_augment5_20 [--checkpoint=best]
      [--split=val]

Writes `eval_<split>_<checkpoint>.json` (top-1, top-5, loss, per-class
accuracy, the most confused pairs, the confusion matrix) and the figures
`curves.png`, `confusion_<split>.png` and `misclassified_<split>.png` to the
workdir, and prints the summary.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
from absl import flags

from et_flax.report import analysis
from et_flax import augment
from et_flax import checkpoints
from et_flax import console
from et_flax import optim
from et_flax import run_files
from et_flax import settings as settings_lib
from et_flax import train
from et_flax.data import input_pipeline

LABELED_SPLITS = ('train', 'val')


@dataclasses.dataclass
class Run:
  """A workdir's checkpoint, ready to predict."""
  workdir: pathlib.Path
  checkpoint: str
  epoch: int
  config: ml_collections.ConfigDict
  info: input_pipeline.DatasetInfo
  model: nn.Module
  variables: dict[str, Any]
  settings: settings_lib.Settings  # as resolved on this machine


def load_run(workdir: str | pathlib.Path, checkpoint: str = 'best',
             data_dir: str | None = None) -> Run:
  """The model, weights, config and data of a workdir's checkpoint."""
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise FileNotFoundError(f'{workdir} is not a directory (expected a run workdir)')
  # A damaged best checkpoint gives the latest (said on the console): named so.
  read = checkpoints.read_checkpoint(workdir, checkpoint)
  variables, meta, checkpoint = read.variables, read.meta, read.which
  config = ml_collections.ConfigDict(meta.config)
  if data_dir:
    config.data.data_dir = data_dir
  info = input_pipeline.get_dataset_info(config.data)
  run_files.check_classes(workdir, info.wnids)
  settings = settings_lib.resolve(config)
  model = settings_lib.build_model(config, settings, info.num_classes, info.image_size)
  return Run(workdir=workdir, checkpoint=str(checkpoint), epoch=meta.epoch,
             config=config, info=info, model=model, variables=variables,
             settings=settings)


def predict_logits(run: Run, split: input_pipeline.Split, batch_size: int = 256
                   ) -> np.ndarray:
  """Logits [N, classes] for every image of `split`, in its order."""
  mode = run.settings.preprocessing
  apply = jax.jit(lambda v, images: run.model.apply(v, augment.preprocess(images, mode)))
  outputs = []
  for batch in input_pipeline.eval_batches(split, batch_size):
    logits = np.asarray(apply(run.variables, batch['image']))
    outputs.append(logits[batch['mask']])
  return np.concatenate(outputs)


def classification_report(logits: np.ndarray, labels: np.ndarray,
                          wnids: Sequence[str], class_names: Sequence[str],
                          loss_name: str = 'categorical_crossentropy') -> dict[str, Any]:
  """Top-1, top-5, mean loss, per-class accuracy and the confusion matrix."""
  num_classes = len(wnids)
  k = min(train.TOP_K, num_classes)
  ranking = np.argsort(-logits, axis=1, kind='stable')
  predictions = ranking[:, 0]
  top5 = (ranking[:, :k] == labels[:, None]).any(axis=1)
  loss = np.asarray(optim.get_loss(loss_name)(jnp.asarray(logits), jnp.asarray(labels)))
  matrix = analysis.confusion_matrix(labels, predictions, num_classes)
  counts = matrix.sum(axis=1)
  per_class = [{'wnid': wnids[c], 'name': class_names[c], 'count': int(counts[c]),
                'accuracy': float(matrix[c, c] / counts[c]) if counts[c] else None}
               for c in range(num_classes)]
  return {
      'num_images': int(len(labels)),
      'top1_accuracy': float((predictions == labels).mean()),
      'top5_accuracy': float(top5.mean()),
      'loss': float(loss.mean()),
      'per_class': per_class,
      'most_confused': analysis.most_confused_pairs(matrix, class_names),
      'confusion_matrix': matrix.tolist(),
  }


def read_history(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """The run's epochs (`run_files.read_history`; the notebooks call it here)."""
  return run_files.read_history(workdir)


class ReportNotWrittenError(OSError):
  """The report was computed, but one of its files could not be written.

  `report` holds the computed report.
  """

  def __init__(self, message: str, report: dict[str, Any]):
    super().__init__(message)
    self.report = report


def print_summary(report: Mapping[str, Any]) -> None:
  """The report's headline numbers and most confused pairs, on stdout."""
  print(f'{report["workdir"]} ({report["model"]}, {report["num_classes"]} classes), '
        f'{report["checkpoint"]} checkpoint (epoch {report["epoch"]}), '
        f'{report["split"]} split, {report["num_images"]} images:')
  print(f'  top-1 {report["top1_accuracy"]:.4f}  top-5 {report["top5_accuracy"]:.4f}  '
        f'loss {report["loss"]:.4f}')
  for pair in report['most_confused'][:5]:
    print(f'  confused: {analysis.short_name(pair["true"])} -> '
          f'{analysis.short_name(pair["predicted"])} ({pair["count"]})')


def evaluate_run(workdir: str | pathlib.Path, checkpoint: str = 'best',
                 split: str = 'val', data_dir: str | None = None,
                 figures: bool = True, show_summary: bool = False) -> dict[str, Any]:
  """Evaluates and writes the JSON report (and figures) into the workdir.

  With `show_summary` the summary is printed first, so that a workdir that
  cannot be written (ReportNotWrittenError, naming the file) still shows it.
  """
  if split not in LABELED_SPLITS:
    raise ValueError(f'Cannot evaluate split {split!r}: valid splits are '
                     f'{list(LABELED_SPLITS)} (the test split has no labels; use '
                     'et_flax.predict for a submission)')
  workdir = pathlib.Path(workdir)
  history = read_history(workdir) if figures else None
  run = load_run(workdir, checkpoint, data_dir)
  data = input_pipeline.load_split(run.info, split)
  logits = predict_logits(run, data)
  report = {'workdir': str(workdir), 'checkpoint': run.checkpoint, 'epoch': run.epoch,
            'split': split, 'model': run.config.model.name,
            'pretrained': bool(run.config.get('pretrained_weights')),
            'num_classes': run.info.num_classes,
            **classification_report(logits, data.labels, run.info.wnids,
                                    run.info.class_names, run.config.loss)}
  if show_summary:
    print_summary(report)
  path = workdir / f'eval_{split}_{run.checkpoint}.json'
  try:
    path.write_text(json.dumps(report, indent=1))
  except OSError as error:
    raise ReportNotWrittenError(
        f'cannot write {path}: {error.strerror or error}; the metrics were computed but '
        f'not saved ({_remedy(error)})', report) from error
  if figures:
    try:
      _draw_figures(workdir, split, history, report, logits, data, run)
    except OSError as error:
      raise ReportNotWrittenError(
          f'cannot write {error.filename or "a figure in " + str(workdir)}: '
          f'{error.strerror or error}; {path.name} was written, the figures were not'
          + (f' ({_remedy(error)})' if console.storage_full(error) else ''),
          report) from error
  return report


def _remedy(error: OSError) -> str:
  if console.storage_full(error):
    return 'free space (or raise the quota) and run the same command again'
  return 'make the workdir writable, or evaluate a copy of it'


def _draw_figures(workdir: pathlib.Path, split: str, history: list[dict[str, Any]],
                  report: Mapping[str, Any], logits: np.ndarray,
                  data: input_pipeline.Split, run: Run) -> None:
  """curves.png, confusion_<split>.png and misclassified_<split>.png.

  No curves for a workdir without epochs (one made by et_flax.import_keras).
  """
  drawn = [analysis.confusion_figure(np.asarray(report['confusion_matrix']),
                                     run.info.class_names,
                                     workdir / f'confusion_{split}.png')]
  if history:
    drawn.append(analysis.training_curves(history, workdir / 'curves.png'))
  predictions = logits.argmax(axis=1)
  if (predictions != data.labels).any():
    drawn.append(analysis.misclassified_gallery(
        data.images, data.labels, predictions, run.info.class_names,
        workdir / f'misclassified_{split}.png'))
  for figure in drawn:  # saved: keep them out of a notebook's output
    plt.close(figure)


FLAGS = flags.FLAGS


def main(argv):
  del argv
  try:
    # Printed before the files are written: a read-only workdir still shows it.
    report = evaluate_run(FLAGS.workdir, FLAGS.checkpoint, FLAGS.split, FLAGS.data_dir,
                          FLAGS.figures, show_summary=True)
  except ReportNotWrittenError as error:
    raise SystemExit(f'error: {error}') from None
  console.info('Wrote eval_%s_%s.json and figures to %s', report['split'],
               report['checkpoint'], report['workdir'])


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'A run workdir.')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or an epoch number.")
  flags.DEFINE_string('split', 'val', 'train or val.')
  flags.DEFINE_string('data_dir', None, 'Override config.data.data_dir.')
  flags.DEFINE_bool('figures', True, 'Also draw curves, confusion matrix, gallery.')
  flags.mark_flag_as_required('workdir')
  console.run(main)
