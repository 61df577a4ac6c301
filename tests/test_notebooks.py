"""Each notebook runs top to bottom (on tiny settings) without an error."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / 'notebooks').glob('*.ipynb'))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv('ET_FLAX_NOTEBOOK_EPOCHS', '1')
  monkeypatch.setenv('ET_FLAX_NOTEBOOK_IMAGE_SIZE', '8')
  monkeypatch.setenv('ET_FLAX_NOTEBOOK_WORKDIR', str(tmp_path / 'workdir'))
  monkeypatch.setenv('HOME', str(tmp_path))  # the digits cache goes under ~
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': str(path.parent)}}).execute()
  outputs = [o for cell in notebook.cells for o in cell.get('outputs', [])]
  assert not [o for o in outputs if o.get('output_type') == 'error']
  assert list((tmp_path / 'workdir').glob('events.out.tfevents.*'))
