"""Evaluation, figures, comparison table and submission from tiny runs."""

import csv
import errno
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as sk_metrics

from et_flax.report import analysis
from et_flax import compare
from et_flax import evaluate
from et_flax import predict
from et_flax.data import input_pipeline


@pytest.fixture(scope='module')
def run_dir(three_epoch_run, tmp_path_factory):
  """A 3-epoch run of one-module E.T. on the 8x8 digits, with a plateau halving
  (the session's, copied: these tests write reports and figures into it)."""
  workdir = tmp_path_factory.mktemp('evaluate') / 'run'
  shutil.copytree(three_epoch_run, workdir)
  return workdir


def test_jit_classification_report_equals_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(300, 7)).astype(np.float32)
  labels = rng.integers(0, 7, 300)
  wnids = [f'n{i}' for i in range(7)]
  report = evaluate.classification_report(logits, labels, wnids, wnids)
  ranking = np.argsort(-logits, axis=1)
  assert report['top1_accuracy'] == pytest.approx((ranking[:, 0] == labels).mean())
  assert report['top5_accuracy'] == pytest.approx(
      (ranking[:, :5] == labels[:, None]).any(axis=1).mean())
  log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  assert report['loss'] == pytest.approx(-log_probs[np.arange(300), labels].mean(),
                                         rel=1e-5)
  counts = np.zeros((7, 7), int)
  np.add.at(counts, (labels, ranking[:, 0]), 1)
  np.testing.assert_array_equal(report['confusion_matrix'], counts)
  np.testing.assert_array_equal(report['confusion_matrix'],
                                sk_metrics.confusion_matrix(labels, ranking[:, 0]))
  for c, entry in enumerate(report['per_class']):
    assert entry['count'] == (labels == c).sum()
    assert entry['accuracy'] == pytest.approx((ranking[labels == c, 0] == c).mean())


def test_evaluate_run_equals_numpy_on_the_model_logits(run_dir):
  report = evaluate.evaluate_run(run_dir, 'latest', 'val')
  saved = json.loads((run_dir / 'eval_val_latest.json').read_text())
  assert saved['top1_accuracy'] == report['top1_accuracy']
  run = evaluate.load_run(run_dir, 'latest')
  val = input_pipeline.load_split(run.info, 'val')
  logits = np.asarray(run.model.apply(run.variables, val.images / np.float32(255)))
  ranking = np.argsort(-logits, axis=1)
  assert report['num_images'] == len(val) == 270
  assert report['epoch'] == 3
  assert report['top1_accuracy'] == pytest.approx((ranking[:, 0] == val.labels).mean())
  assert report['top5_accuracy'] == pytest.approx(
      (ranking[:, :5] == val.labels[:, None]).any(axis=1).mean())
  per_class = [(ranking[val.labels == c, 0] == c).mean() for c in range(10)]
  np.testing.assert_allclose([e['accuracy'] for e in report['per_class']], per_class)
  # The history's last val accuracy is the same evaluation, done in training.
  history = evaluate.read_history(run_dir)
  assert history[-1]['val_top1_accuracy'] == pytest.approx(report['top1_accuracy'],
                                                           abs=1e-6)


def _png(path, size):
  image = Image.open(path)
  assert image.format == 'PNG' and image.size == size
  pixels = np.asarray(image.convert('L'), np.float32)
  return pixels


def test_figures_are_drawn(run_dir):
  evaluate.evaluate_run(run_dir, 'best', 'val')
  history = evaluate.read_history(run_dir)
  figure = analysis.training_curves(history)
  for axis in figure.axes:
    curves = [line for line in axis.get_lines() if len(line.get_xdata()) == 3]
    assert len(curves) == 2, 'train and validation curves, 3 epochs each'
  # The plateau halved the rate once at least: a marked change.
  assert any(line.get_linestyle() == '--' and len(line.get_xdata()) == 2
             for line in figure.axes[0].get_lines())
  curves = _png(run_dir / 'curves.png', (1100, 400))
  assert curves.std() > 10
  # 10 classes: a 6.5-inch matrix plus its colour bar, at 100 dpi.
  confusion = _png(run_dir / 'confusion_val.png', (800, 650))
  assert confusion.std() > 10
  gallery = _png(run_dir / 'misclassified_val.png', (1200, 1320))
  assert gallery.std() > 10


def test_confusion_figure_for_many_classes_and_confused_pairs():
  rng = np.random.default_rng(0)
  matrix = rng.integers(0, 3, (200, 200)) + np.diag(np.full(200, 40))
  matrix[5, 17] = 30
  names = [f'class {i}, synonym' for i in range(200)]
  pairs = analysis.most_confused_pairs(matrix, names, count=3)
  assert pairs[0] == {'true': 'class 5, synonym', 'predicted': 'class 17, synonym',
                      'count': 30, 'share_of_true': 30 / matrix[5].sum()}
  figure = analysis.confusion_figure(matrix, names)
  assert 'ordered' in figure.axes[0].get_title()
  assert figure.axes[0].get_images()[0].get_array().shape == (200, 200)


def test_submission_has_one_valid_line_per_test_image(run_dir, tmp_path):
  output = tmp_path / 'submission.csv'
  count = predict.write_submission(run_dir, output, 'test', 'latest', top5=True)
  run = evaluate.load_run(run_dir, 'latest')
  test = input_pipeline.load_split(run.info, 'test')
  assert count == len(test) == 180
  with output.open() as file:
    rows = list(csv.reader(file))
  assert rows[0] == ['file_name', 'wnid', 'top5']
  assert [r[0] for r in rows[1:11]] == [f'test_{i}.JPEG' for i in range(10)]
  submitted = predict.read_submission(output)
  assert set(submitted) == set(test.file_names)
  logits = evaluate.predict_logits(run, test)
  for name, logit in zip(test.file_names, logits):
    assert submitted[name][0] == run.info.wnids[int(np.argmax(logit))]
    assert len(submitted[name]) == 5 and set(submitted[name]) <= set(run.info.wnids)
  with pytest.raises(FileExistsError, match='submission.csv exists'):
    predict.write_submission(run_dir, output)


def test_a_submission_that_cannot_be_written_leaves_nothing_behind(tmp_path):
  output = tmp_path / 'submission.csv'

  def rows():
    yield ['test_0.JPEG', 'n01443537']
    raise OSError(errno.ENOSPC, 'No space left on device')

  with pytest.raises(OSError, match='No space left'):
    predict.write_csv(output, ['file_name', 'wnid'], rows())
  assert list(tmp_path.iterdir()) == []  # neither the submission nor its .tmp
  predict.write_csv(output, ['file_name', 'wnid'], [['test_0.JPEG', 'n01443537']])
  assert output.read_text().splitlines() == ['file_name,wnid', 'test_0.JPEG,n01443537']
  assert list(tmp_path.iterdir()) == [output]


def test_comparison_table_from_two_runs(run_dir, tmp_path):
  second = tmp_path / 'second'
  shutil.copytree(run_dir, second)
  report = json.loads((second / 'eval_val_best.json').read_text()) if (
      second / 'eval_val_best.json').exists() else evaluate.evaluate_run(
          second, 'best', 'val', figures=False)
  rows = compare.write_comparison([run_dir, second], tmp_path / 'table')
  ours = [r for r in rows if r['run'] != '(report only)']
  assert [r['run'] for r in ours] == [run_dir.name, 'second']
  assert all(r['model'] == 'et' and r['classes'] == 10 for r in ours)
  assert ours[1]['top1'] == report['top1_accuracy']
  assert ours[1]['report_top1'] is None  # the report has no 10-class E.T. row
  report_only = [r['report_model'] for r in rows if r['run'] == '(report only)']
  assert len(report_only) == 10 and 'VGG16 (pre-trained)' in report_only
  markdown = (tmp_path / 'table.md').read_text()
  assert f'| second | et | 10 | {report["epoch"]} | {report["top1_accuracy"]:.3f}' in markdown
  with (tmp_path / 'table.csv').open() as file:
    assert len(list(csv.DictReader(file))) == len(rows)
  assert compare.REPORT_RESULTS[('et', 20, False)][1:] == (0.525, 0.838)


def test_bad_inputs_are_clear_errors(run_dir, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='holds no best checkpoint'):
    evaluate.evaluate_run(empty, figures=False)
  with pytest.raises(FileNotFoundError, match='history.jsonl is missing'):
    evaluate.evaluate_run(empty)
  with pytest.raises(ValueError, match="Cannot evaluate split 'test'"):
    evaluate.evaluate_run(run_dir, split='test')
  with pytest.raises(ValueError, match="Unknown split 'holdout'"):
    predict.write_submission(run_dir, tmp_path / 'x.csv', split='holdout')
  with pytest.raises(ValueError, match="checkpoint must be 'best', 'latest' or an epoch"):
    evaluate.load_run(run_dir, 'newest')
  with pytest.raises(FileNotFoundError, match='is not a directory'):
    evaluate.load_run(tmp_path / 'nowhere')


def test_the_three_commands(run_dir, tmp_path):
  import os
  import pathlib
  import subprocess
  import sys

  repo = pathlib.Path(__file__).resolve().parent.parent
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}

  def run(*args):
    result = subprocess.run([sys.executable, '-m', *args], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout

  out = run('et_flax.evaluate', f'--workdir={run_dir}', '--checkpoint=latest',
            '--figures=false')
  report = json.loads((run_dir / 'eval_val_latest.json').read_text())
  assert f'top-1 {report["top1_accuracy"]:.4f}' in out and 'epoch 3' in out
  out = run('et_flax.compare', str(run_dir), f'--output={tmp_path / "cmp"}',
            '--checkpoint=latest')
  assert out.strip() == (tmp_path / 'cmp.md').read_text().strip()
  out = run('et_flax.predict', f'--workdir={run_dir}', f'--output={tmp_path / "s.csv"}',
            '--checkpoint=latest')
  assert out.strip() == f'Wrote 180 predictions to {tmp_path / "s.csv"}'
  assert len(predict.read_submission(tmp_path / 's.csv')) == 180
