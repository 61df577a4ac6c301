"""Each notebook runs top to bottom (on tiny settings) against the tree under test.

Each test checks that the notebook imported this tree's et_flax, and a number
the notebook printed against the same number computed here.
"""

import pathlib
import re
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import make_tiny_imagenet_tree
from et_flax import evaluate

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = ROOT / 'notebooks'


def _execute(name, monkeypatch):
  monkeypatch.setenv('ET_FLAX_REPO', str(ROOT))
  path = NOTEBOOKS / name
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': str(path.parent)}}).execute()
  outputs = [o for cell in notebook.cells for o in cell.get('outputs', [])]
  assert not [o for o in outputs if o.get('output_type') == 'error']
  text = _text(outputs)
  assert f'et_flax from {ROOT / "et_flax"}\n' in text
  return outputs


def _text(outputs):
  return ''.join(''.join(o.get('text', '')) for o in outputs) + ''.join(
      ''.join(o.get('data', {}).get('text/plain', '')) for o in outputs)


def test_every_notebook_is_tested():
  assert sorted(p.name for p in NOTEBOOKS.glob('*.ipynb')) == [
      'analysis.ipynb', 'quickstart.ipynb', 'reproduce_report.ipynb']


@pytest.mark.slow
def test_quickstart_notebook(tmp_path, monkeypatch):
  monkeypatch.setenv('ET_FLAX_NOTEBOOK_EPOCHS', '1')
  monkeypatch.setenv('ET_FLAX_NOTEBOOK_IMAGE_SIZE', '8')
  monkeypatch.setenv('ET_FLAX_NOTEBOOK_WORKDIR', str(tmp_path / 'workdir'))
  monkeypatch.setenv('HOME', str(tmp_path))  # the digits cache goes under ~
  outputs = _execute('quickstart.ipynb', monkeypatch)
  assert list((tmp_path / 'workdir').glob('events.out.tfevents.*'))
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 2
  report = evaluate.evaluate_run(str(tmp_path / 'workdir'), 'best', 'val', figures=False)
  assert (f"best checkpoint (epoch 1): top-1 {report['top1_accuracy']:.4f}, "
          f"top-5 {report['top5_accuracy']:.4f}") in _text(outputs)


@pytest.mark.slow
def test_reproduce_report_notebook(tmp_path, monkeypatch):
  root = make_tiny_imagenet_tree(tmp_path / 'tiny-imagenet-200', train_per_class=8)
  monkeypatch.setenv('ET_FLAX_NOTEBOOK_ONLY', 'dropout_200')
  monkeypatch.setenv('ET_FLAX_NOTEBOOK_DATA', str(root))
  monkeypatch.setenv('ET_FLAX_NOTEBOOK_TFDS_DIR', str(tmp_path / 'tfds'))
  monkeypatch.setenv('ET_FLAX_NOTEBOOK_WORKDIR', str(tmp_path / 'workdir'))
  monkeypatch.setenv('ET_FLAX_NOTEBOOK_EPOCHS', '1')
  monkeypatch.setenv('ET_FLAX_NOTEBOOK_IMAGE_SIZE', '16')
  monkeypatch.setenv('ET_FLAX_NOTEBOOK_BATCH_SIZE', '8')
  outputs = _execute('reproduce_report.ipynb', monkeypatch)
  assert (tmp_path / 'workdir' / 'reproduction.md').exists()
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 1  # claims.png
  markdown = ''.join(''.join(o['data']['text/markdown']) for o in outputs
                     if 'text/markdown' in o.get('data', {}))
  report = evaluate.evaluate_run(str(tmp_path / 'workdir' / 'dropout_200'), 'best', 'val',
                                 figures=False)
  assert (f"| dropout_200 | dropout, 200 classes (the Kaggle model) | done | 3 | 1 | 1 | "
          f"{report['top1_accuracy']:.3f} | 0.347 |") in markdown


@pytest.mark.slow
def test_analysis_notebook(three_epoch_run, tmp_path, monkeypatch):
  workdir = tmp_path / 'workdir'
  shutil.copytree(three_epoch_run, workdir)  # the notebook writes its reports there
  monkeypatch.setenv('ET_FLAX_NOTEBOOK_WORKDIR', str(workdir))
  outputs = _execute('analysis.ipynb', monkeypatch)
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 3
  report = evaluate.evaluate_run(str(workdir), 'best', 'val', figures=False)
  printed = re.search(r'epoch (\d+): top-1 ([0-9.]+), top-5 ([0-9.]+)', _text(outputs))
  assert printed.groups() == (str(report['epoch']), f"{report['top1_accuracy']:.4f}",
                              f"{report['top5_accuracy']:.4f}")
