"""--host_memory: XLA:CPU's step buffers keep their pages between steps."""

import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest

from et_flax.cpu import host_memory

REPO = pathlib.Path(__file__).resolve().parent.parent

# A fresh process (JAX's backends not started): `configure(mode)`, then a jitted
# step whose temporary buffer is above glibc's 32 MB mmap threshold, run until
# steady; prints the buffer's size and the minor page faults of the next 6 calls.
STEPS = """
import json, resource, sys
from et_flax.cpu import host_memory
applied = host_memory.configure(sys.argv[1])
import jax, jax.numpy as jnp

@jax.jit
def step(x):
  # The sort's operand and result (64 MB each) cannot fuse into the
  # reduction: a 128 MB temp buffer, allocated on the calling thread.
  return jnp.sum(jnp.sort(x * 2.0, axis=0) * jnp.sin(x).T)

x = jnp.ones((4096, 4096), jnp.float32)
compiled = step.lower(x).compile()
temp = compiled.memory_analysis().temp_size_in_bytes
for _ in range(3):
  compiled(x).block_until_ready()
faults = []
for _ in range(6):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  compiled(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({'applied': applied, 'temp': temp, 'faults': faults}))
"""


def _transparent_huge_pages_always() -> bool:
  path = pathlib.Path('/sys/kernel/mm/transparent_hugepage/enabled')
  return path.exists() and '[always]' in path.read_text()


@pytest.mark.skipif(not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc',
                    reason='glibc on Linux')
@pytest.mark.parametrize('mode, xla_flags, applied', [
    ('auto', '', 'reuse'),
    ('reuse', '', 'reuse'),
    ('release', '', 'release'),
    # Several CPU devices: steps on worker threads, so 'auto' leaves it.
    ('auto', '--xla_force_host_platform_device_count=2', 'release'),
])
def test_reused_host_memory_faults_no_pages_per_step(mode, xla_flags, applied):
  # Without the suite's persistent compilation cache: these are the faults of
  # the steps alone, not of an executable read from or written to the cache.
  env = {key: value for key, value in os.environ.items()
         if not key.startswith('JAX_COMPILATION_CACHE')}
  env.update(XLA_FLAGS=xla_flags, JAX_PLATFORMS='')
  result = subprocess.run([sys.executable, '-c', STEPS, mode], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=True)
  out = json.loads(result.stdout.strip().splitlines()[-1])
  pages = out['temp'] // 4096
  assert out['temp'] > 48 << 20  # above glibc's largest mmap threshold (32 MB)
  assert out['applied'] == applied
  if applied == 'reuse':
    # No call maps its buffer afresh, but for at most one: a small allocation
    # that splits the freed buffer makes the heap grow once by a step-sized
    # region (host_memory's docstring), after which both are reused.
    faulting = [count for count in out['faults'] if count >= pages // 20]
    assert len(faulting) <= 1 and max(faulting, default=0) < pages * 1.1, out
  elif not xla_flags and not _transparent_huge_pages_always():
    # The system's defaults: each call maps (and faults) its buffer afresh
    # (in 4 KiB pages; with huge pages always on, in 2 MiB ones).
    assert min(out['faults']) > pages // 2, out


def test_configure_refuses_what_it_cannot_do():
  import jax
  jax.devices()  # this pytest process has started JAX's backends
  with pytest.raises(ValueError, match=r"--host_memory must be one of \['auto', "
                     r"'reuse', 'release'\], got 'keep'"):
    host_memory.configure('keep')
  with pytest.raises(ValueError, match="--host_memory=reuse JAX's backends have "
                     'already started'):
    host_memory.configure('reuse')
  assert host_memory.configure('auto') == 'release'  # and says why in the log
  assert host_memory.configure('release') == 'release'


# A fresh process: what `configure` did, restored by `preserved` but for 'reuse'.
PRESERVED = """
from et_flax.cpu import host_memory
print(host_memory.applied())
with host_memory.preserved():
  print(host_memory.configure('release'))
print(host_memory.applied())
with host_memory.preserved():
  print(host_memory.configure('reuse'))
print(host_memory.applied())
"""


@pytest.mark.skipif(not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc',
                    reason='glibc on Linux')
def test_preserved_restores_what_configure_did_but_reuse():
  result = subprocess.run([sys.executable, '-c', PRESERVED], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=True)
  assert result.stdout.split() == ['None', 'release', 'None', 'reuse', 'reuse']


def test_the_commands_refuse_an_unknown_value(tmp_path, run_command):
  code, _, stderr = run_command('et_flax.main', '--config=configs/quickstart.py',
                                f'--workdir={tmp_path / "run"}', '--host_memory=keep')
  assert code == 1
  assert stderr.splitlines()[0] == (
      'error: flag --host_memory=keep: value should be one of <auto|reuse|release>')
  assert 'Traceback' not in stderr
  assert not (tmp_path / 'run').exists()


def test_auto_leaves_runs_on_an_accelerator_to_the_defaults(monkeypatch):
  import jax
  monkeypatch.setattr(host_memory, '_accelerator_plugins', lambda: ['xla_cuda12'])
  reason = host_memory._no_gain_reason()
  if not jax.config.jax_platforms:
    assert reason == ('an accelerator plugin is installed (xla_cuda12), so the steps are '
                      'expected to run there')
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  monkeypatch.setattr(host_memory, '_accelerator_plugins', lambda: [])
  assert 'the CPU backend has 4 devices' in host_memory._no_gain_reason()
