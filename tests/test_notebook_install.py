"""The notebooks' installer keeps an environment's jax, jaxlib and TensorFlow.

The plan (what pip is asked for) is tested on made-up environments. The whole
path, as Colab takes it, runs only with ET_FLAX_TEST_COLAB=1: it builds a
virtual environment with `tensorflow` (not -cpu), jax, ipykernel and
ipywidgets installed first, runs the quickstart notebook there from a folder
outside any clone (the first cell clones the tree under test and installs it),
then checks that those distributions are unchanged and that `pip check`
passes. It downloads about 1 GB and took 6 minutes on the 2-core
development machine, which is why CI leaves it out.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from et_flax import notebook_install

ROOT = pathlib.Path(__file__).parent.parent


def _plan(versions, requires=('jax>=0.10.2', 'flax>=0.12.8', 'tensorflow-cpu>=2.21.0')):
  return notebook_install.plan(
      [notebook_install.Requirement(r) for r in requires], versions)


def test_colab_tensorflow_and_jax_are_pinned_and_tensorflow_cpu_left_out():
  request = _plan({'tensorflow': '2.21.0', 'jax': '0.10.2', 'jaxlib': '0.10.2',
                   'jax-cuda12-plugin': '0.10.2', 'numpy': '2.0.0'})
  assert request == ['flax>=0.12.8', 'jax==0.10.2', 'jax-cuda12-plugin==0.10.2',
                     'jaxlib==0.10.2', 'tensorflow==2.21.0']


def test_a_bare_environment_gets_the_requirements_as_they_are():
  assert _plan({'numpy': '2.0.0'}) == ['jax>=0.10.2', 'flax>=0.12.8', 'tensorflow-cpu>=2.21.0']


def test_an_older_kept_distribution_stops_before_anything_is_installed():
  with pytest.raises(notebook_install.InstallError,
                     match=r'jax 0\.7\.2 \(et_flax needs jax>=0\.10\.2\).*Restart session'):
    _plan({'jax': '0.7.2', 'jaxlib': '0.7.2'})
  with pytest.raises(notebook_install.InstallError,
                     match=r'tensorflow 2\.19\.0 \(et_flax needs tensorflow-cpu>=2\.21\.0\)'):
    _plan({'tensorflow': '2.19.0'})


def test_requirements_are_setup_cfgs_with_the_tf_extra_and_markers_apply(tmp_path):
  requires = notebook_install.requirements(ROOT)
  names = [r.name for r in requires]
  assert {'jax', 'flax', 'tensorflow-cpu', 'orbax-checkpoint', 'clu'} <= set(names)
  request = _plan({}, ['onednn-cpu-gomp>=1; platform_system == "Nowhere"', 'optax>=0.2'])
  assert request == ['optax>=0.2']
  with pytest.raises(notebook_install.InstallError, match='not-a-clone.*setup.cfg'):
    notebook_install.requirements(tmp_path / 'not-a-clone')


def _run(command, **kwargs):
  result = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)
  assert result.returncode == 0, f'{command[:4]}: {result.stdout[-3000:]}{result.stderr[-6000:]}'
  return result


@pytest.mark.skipif(os.environ.get('ET_FLAX_TEST_COLAB') != '1',
                    reason='downloads about 1 GB: set ET_FLAX_TEST_COLAB=1 to run it')
def test_quickstart_notebook_in_a_colab_like_environment(tmp_path):
  env = tmp_path / 'env'
  _run([sys.executable, '-m', 'venv', str(env)])
  python = str(env / 'bin' / 'python')
  _run([python, '-m', 'pip', 'install', '-q', 'tensorflow', 'jax', 'ipykernel', 'ipywidgets',
        'nbclient', 'nbformat'])

  def distributions():
    listed = _run([python, '-m', 'pip', 'list', '--format=json']).stdout
    return {notebook_install.normalize(d['name']): d['version'] for d in json.loads(listed)}

  before = distributions()
  # The tree under test, committed as it is, is what the notebook clones.
  clone = tmp_path / 'origin'
  shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(
      '.venv', '.git', 'runs', '*.egg-info', '__pycache__', '.pytest_cache'))
  for command in (['git', 'init', '-q'], ['git', 'add', '-A'],
                  ['git', '-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'x']):
    _run(command, cwd=clone)
  content = tmp_path / 'content'  # Colab's working folder, outside any clone
  content.mkdir()
  shutil.copy(ROOT / 'notebooks' / 'quickstart.ipynb', content)
  script = f'''
import nbformat
from nbclient import NotebookClient
notebook = nbformat.read('quickstart.ipynb', as_version=4)
NotebookClient(notebook, timeout=900, kernel_name='python3',
               resources={{'metadata': {{'path': {str(content)!r}}}}}).execute()
nbformat.write(notebook, 'executed.ipynb')
'''
  environment = dict(os.environ, ET_FLAX_GIT_URL=str(clone), ET_FLAX_NOTEBOOK_EPOCHS='2',
                     ET_FLAX_NOTEBOOK_IMAGE_SIZE='8', HOME=str(tmp_path),
                     ET_FLAX_NOTEBOOK_WORKDIR=str(tmp_path / 'workdir'))
  for name in ('ET_FLAX_REPO', 'PYTHONPATH', 'VIRTUAL_ENV'):
    environment.pop(name, None)
  _run([python, '-c', script], cwd=content, env=environment)

  after = distributions()
  for name in ('tensorflow', 'jax', 'jaxlib', 'numpy', 'keras'):
    assert after[name] == before[name], name
  assert 'tensorflow-cpu' not in after
  assert after['et-flax'] == '0.1.0'
  _run([python, '-m', 'pip', 'check'])
  notebook = json.loads((content / 'executed.ipynb').read_text())
  outputs = [o for cell in notebook['cells'] for o in cell.get('outputs', [])]
  text = ''.join(''.join(o.get('text', '')) for o in outputs)
  assert f'et_flax from {content / "et_flax" / "et_flax"}' in text
  assert 'keeping jax 0' in text and 'tensorflow 2' in text
  # The notebook bar (ipywidgets is there, as in Colab), then the epoch lines.
  assert any('application/vnd.jupyter.widget-view+json' in o.get('data', {}) for o in outputs)
  assert 'epoch 2/2' in text
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 2
