"""Installs et_flax into a notebook's environment, keeping its jax and TensorFlow.

Colab, like most managed notebook environments, comes with jax, jaxlib (a CUDA
build) and tensorflow. A plain `pip install -e REPO` would install
`tensorflow-cpu` over `tensorflow` (another distribution of the same
`tensorflow` module) and could replace the CUDA jaxlib. This installer instead:

- keeps every installed distribution in `kept()` at its version, by asking
  pip for `name==version` in the same request, so that pip also honours their
  own requirements (numpy, protobuf, ml_dtypes...);
- installs et_flax's `tf` extra (`tensorflow-cpu`) only where no TensorFlow
  distribution provides the module;
- stops before installing anything when a kept version is older than
  et_flax's requirement, saying how to upgrade it;
- installs et_flax itself editable, without its dependencies (they come from
  the first request);
- runs `pip check` before and after, and fails on any new problem.

It imports only the standard library (and pip's copy of `packaging` where
`packaging` is not installed): it runs before et_flax's dependencies exist.
From a notebook cell (the notebooks' first cell does this):

    runpy.run_path(f'{REPO}/et_flax/notebook_install.py')['install'](REPO)

or from a shell: `python et_flax/notebook_install.py REPO`.
"""

import configparser
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys

try:
  from packaging.requirements import Requirement
except ImportError:  # A bare virtual environment: pip ships its own copy.
  from pip._vendor.packaging.requirements import Requirement

TENSORFLOW = ('tensorflow', 'tensorflow-cpu', 'tensorflow-gpu', 'tensorflow-intel',
              'tensorflow-macos', 'tf-nightly', 'tf-nightly-cpu')
JAX = ('jax', 'jaxlib', 'libtpu', 'libtpu-nightly')
JAX_PLUGIN_PREFIXES = ('jax-cuda', 'jax-rocm', 'jax-tpu')


class InstallError(RuntimeError):
  """The environment cannot take et_flax without replacing what it keeps."""


def normalize(name):
  return re.sub(r'[-_.]+', '-', name).lower()


def installed():
  """{normalized distribution name: version} of the running environment."""
  importlib.invalidate_caches()
  return {normalize(d.metadata['Name']): d.version
          for d in importlib.metadata.distributions() if d.metadata['Name']}


def kept(versions):
  """The installed distributions the installer never replaces."""
  return {name: version for name, version in versions.items()
          if name in TENSORFLOW or name in JAX or name.startswith(JAX_PLUGIN_PREFIXES)}


def requirements(repo):
  """et_flax's install_requires and its `tf` extra, read from `repo`/setup.cfg."""
  path = os.path.join(repo, 'setup.cfg')
  parser = configparser.ConfigParser()
  if not parser.read(path):
    raise InstallError(f'{path} does not exist: REPO must be the root of an et_flax clone')
  lines = (parser.get('options', 'install_requires').splitlines()
           + parser.get('options.extras_require', 'tf').splitlines())
  return [Requirement(line.strip()) for line in lines
          if line.strip() and not line.strip().startswith('#')]


def plan(requires, versions):
  """The pip request: et_flax's requirements with the kept distributions pinned.

  Returns the list of requirement strings. Raises InstallError, naming the
  distribution, its version and what et_flax needs, when a kept distribution
  is too old; nothing is installed then.
  """
  keep = kept(versions)
  tensorflow = [name for name in TENSORFLOW if name in keep]
  request, too_old = [], []
  for requirement in requires:
    if requirement.marker is not None and not requirement.marker.evaluate():
      continue
    name = normalize(requirement.name)
    # Any TensorFlow distribution provides the module et_flax imports.
    present = tensorflow[0] if name in TENSORFLOW and tensorflow else name
    if present in keep:
      if not requirement.specifier.contains(keep[present], prereleases=True):
        too_old.append(f'{present} {keep[present]} (et_flax needs {name}{requirement.specifier})')
      continue
    request.append(str(requirement))
  if too_old:
    raise InstallError(
        'this environment has ' + ', '.join(too_old) + '. The installer keeps the '
        "environment's jax, jaxlib and TensorFlow (replacing them can break its GPU "
        'support). Upgrade them yourself (in Colab: `pip install -U "jax[cuda12]"` or '
        '`pip install -U tensorflow`, then Runtime > Restart session) and run the cell '
        'again.')
  return request + [f'{name}=={version}' for name, version in sorted(keep.items())]


def _pip(*args, check=True):
  command = [sys.executable, '-m', 'pip', *args]
  result = subprocess.run(command, capture_output=True, text=True)
  if check and result.returncode:
    raise InstallError(f"`pip {' '.join(args)}` failed (exit {result.returncode}):\n"
                       f'{result.stdout[-3000:]}{result.stderr[-3000:]}')
  return result


def _problems():
  """`pip check`'s complaints, as a set of lines."""
  result = _pip('check', check=False)
  return {line for line in result.stdout.splitlines()
          if line.strip() and not line.startswith('No broken requirements')}


def install(repo):
  """Installs et_flax from the clone at `repo`; returns {name: (old, new)}."""
  repo = os.path.abspath(repo)
  before = installed()
  request = plan(requirements(repo), before)
  problems_before = _problems()
  print(f'installing et_flax from {repo}; keeping '
        + (', '.join(f'{n} {v}' for n, v in sorted(kept(before).items())) or 'nothing'))
  _pip('install', '-q', *request)
  _pip('install', '-q', '--no-deps', '-e', repo)
  after = installed()
  changed = {name: (before.get(name), version) for name, version in after.items()
             if before.get(name) != version}
  replaced = sorted(name for name in kept(before) if after.get(name) != before[name])
  if replaced:  # pip was asked for exactly these versions: this is a bug.
    raise AssertionError(f'the install replaced {replaced}: {changed}')
  new_problems = _problems() - problems_before
  if new_problems:
    raise InstallError('after the install, `pip check` reports:\n' + '\n'.join(sorted(new_problems)))
  upgraded = [name for name, (old, _) in changed.items() if old is not None]
  loaded = _loaded_modules(upgraded)
  print(f'installed or upgraded {len(changed)} distributions'
        + (f': {", ".join(sorted(changed))}' if changed else ''))
  if loaded:
    print(f'restart the runtime (Colab: Runtime > Restart session) and run again: '
          f'{", ".join(sorted(loaded))} were imported before their upgrade')
  return changed


def _loaded_modules(names):
  """The already imported top-level modules of the distributions `names`."""
  modules = importlib.metadata.packages_distributions()
  return {module for module, dists in modules.items()
          if module in sys.modules and any(normalize(d) in names for d in dists)}


if __name__ == '__main__':
  # Run as a script, its folder (et_flax/) comes first on sys.path, where
  # et_flax/keras/ would stand for Keras: the folder goes.
  _here = os.path.dirname(os.path.abspath(__file__))
  sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
  if len(sys.argv) != 2:
    sys.exit(f'usage: python {sys.argv[0]} REPO')
  try:
    install(sys.argv[1])
  except InstallError as error:
    sys.exit(f'error: {error}')
