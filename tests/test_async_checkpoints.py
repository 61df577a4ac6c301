"""Asynchronous checkpoint saves: what waits for them, and the lock they hold.

A gate in the state handler's `finalize` (run in Orbax's background thread,
before the checkpoint's folder gets its final name) holds a save pending for
as long as a test needs.
"""

import fcntl
import os
import pathlib
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import run_processes
from et_flax import checkpoints
from et_flax import run_files
from et_flax import workdir_lock

# How long a gated save waits at most: a save that blocks its caller (not
# asynchronous) goes on after this, and the test fails instead of hanging.
GATE_SECONDS = 20


class Gate:
  """Holds the finalization of saves until opened."""

  def __init__(self):
    self._open = threading.Event()
    self.reached = threading.Event()
    self.metas = []

  def open(self, after: float = 0.0) -> None:
    if after:
      threading.Timer(after, self._open.set).start()
    else:
      self._open.set()

  def close(self) -> None:
    self._open.clear()
    self.reached.clear()

  def wait(self) -> None:
    self.reached.set()
    self._open.wait(GATE_SECONDS)


@pytest.fixture
def gate(monkeypatch):
  gate = Gate()

  def item_handlers():
    # An instance's method, not a subclass: Orbax finds a handler's args by its class.
    handlers = item_handlers_of_module()
    finalize = handlers['state'].finalize

    def gated_finalize(directory):
      gate.wait()
      finalize(directory)

    handlers['state'].finalize = gated_finalize
    # The metas handed to Orbax, which writes them in the background.
    async_save = handlers['meta'].async_save

    async def recorded_async_save(directory, args):
      gate.metas.append(args.item)
      return await async_save(directory, args=args)

    handlers['meta'].async_save = recorded_async_save
    return handlers

  item_handlers_of_module = checkpoints._item_handlers
  monkeypatch.setattr(checkpoints, '_item_handlers', item_handlers)
  yield gate
  gate.open()


def _state(value):
  return {'w': jnp.full((3,), value, jnp.float32), 'step': jnp.int32(value)}


def _meta(epoch, **fields):
  return run_files.RunMeta(epoch=epoch, config={}, **fields)


def _abstract():
  return checkpoints.abstract_like(_state(0), jax.sharding.SingleDeviceSharding(
      jax.devices()[0]))


def _finalized(workdir, folder, step):
  return (workdir / folder / str(step)).is_dir()


def _lock_is_free(workdir):
  """Whether the checkpoint lock could be taken exclusively right now."""
  fd = os.open(workdir / workdir_lock.CHECKPOINT_LOCK_FILE, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False
  finally:
    os.close(fd)


def test_save_returns_before_the_checkpoint_is_written(tmp_path, gate):
  run = checkpoints.RunCheckpoints(tmp_path)
  started = time.perf_counter()
  run.save(1, _state(1), _meta(1), best=True)
  assert time.perf_counter() - started < GATE_SECONDS / 2
  assert gate.reached.wait(10)  # the write goes on in the background
  assert run.latest.is_saving_in_progress()
  assert not _finalized(tmp_path, checkpoints.LATEST, 1)
  assert list((tmp_path / checkpoints.LATEST).glob('1.orbax-checkpoint-tmp*'))
  assert not _lock_is_free(tmp_path)
  gate.open()
  run.close()
  assert _finalized(tmp_path, checkpoints.LATEST, 1)
  assert _finalized(tmp_path, checkpoints.BEST, 1)


def test_a_reader_waits_until_the_pending_save_is_finalized(tmp_path, gate):
  run = checkpoints.RunCheckpoints(tmp_path, max_to_keep=1)
  gate.open()
  run.save(1, _state(1), _meta(1), best=False)
  run.latest_epoch()  # written
  gate.close()
  run.save(2, _state(2), _meta(2), best=False)  # renames 2, then deletes 1
  read, seen = threading.Event(), []

  def reader():
    with workdir_lock.checkpoint_access(tmp_path, exclusive=False):
      seen.append(sorted(p.name for p in (tmp_path / checkpoints.LATEST).iterdir()))
      read.set()

  thread = threading.Thread(target=reader)
  thread.start()
  assert not read.wait(1)
  gate.open()
  # Released once finalized, without waiting for another call of `run`.
  assert read.wait(10)
  thread.join()
  assert seen == [['2']]
  run.close()


def test_restore_and_latest_epoch_see_the_pending_save(tmp_path, gate):
  run = checkpoints.RunCheckpoints(tmp_path)
  history = [{'epoch': 1}]
  run.save(1, _state(1), _meta(1, history=history), best=False)
  # The next epoch's entry, appended while the meta may still be unwritten:
  # Orbax was given a copy.
  history.append({'epoch': 2})
  assert [meta['history'] for meta in gate.metas] == [[{'epoch': 1}]]
  gate.open(after=0.5)
  assert run.latest_epoch() == 1
  assert _finalized(tmp_path, checkpoints.LATEST, 1)
  assert _lock_is_free(tmp_path)

  gate.close()
  run.save(2, _state(2), _meta(2), best=False)
  gate.open(after=0.5)
  state, meta = run.restore(2, _abstract())
  assert _finalized(tmp_path, checkpoints.LATEST, 2)
  assert _lock_is_free(tmp_path)
  np.testing.assert_array_equal(state['w'], np.full(3, 2.0))
  assert meta == _meta(2)
  assert run.restore(1, _abstract())[1] == _meta(1, history=[{'epoch': 1}])

  # An epoch saved again while its save is pending is not saved twice.
  gate.close()
  run.save(3, _state(3), _meta(3), best=True)
  gate.open(after=0.5)
  run.save(3, _state(3), _meta(3), best=True)
  assert run.latest_epoch() == 3
  assert run.latest.all_steps() == [1, 2, 3]
  assert run.best.all_steps() == [3]
  run.close()


def test_the_interrupted_checkpoint_goes_only_after_the_new_save_is_written(
    tmp_path, gate, monkeypatch):
  run = checkpoints.RunCheckpoints(tmp_path)
  gate.open(after=0.5)
  run.save_interrupted(5, _state(5), _meta(0, interrupted=run_files.StoppedWithin(5)))
  assert _finalized(tmp_path, checkpoints.INTERRUPTED, 5)  # synchronous
  assert _lock_is_free(tmp_path)
  run.close()

  deletions = []
  delete = ocp.CheckpointManager.delete

  def recorded_delete(manager, step):
    deletions.append((pathlib.Path(manager.directory).name, step,
                      _finalized(tmp_path, checkpoints.LATEST, 1)))
    delete(manager, step)

  monkeypatch.setattr(ocp.CheckpointManager, 'delete', recorded_delete)
  gate.close()
  run = checkpoints.RunCheckpoints(tmp_path)  # the resumed run
  meta = _meta(1, history=[{'epoch': 1, 'step': 9}])
  run.save(1, _state(1), meta, best=True)
  assert gate.reached.wait(10)
  assert _finalized(tmp_path, checkpoints.INTERRUPTED, 5)
  gate.open()
  run.close()
  assert deletions == [(checkpoints.INTERRUPTED, 5, True)]
  assert not _finalized(tmp_path, checkpoints.INTERRUPTED, 5)
  assert checkpoints.latest_meta(tmp_path) == meta


def test_close_and_leaving_a_with_block_wait_for_the_pending_save(tmp_path, gate):
  run = checkpoints.RunCheckpoints(tmp_path)
  run.save(1, _state(1), _meta(1), best=False)
  gate.open(after=0.5)
  run.close()
  assert _finalized(tmp_path, checkpoints.LATEST, 1)
  assert _lock_is_free(tmp_path)
  run.close()  # again: nothing to do

  gate.close()
  with pytest.raises(RuntimeError, match='the training loop failed'):
    with checkpoints.RunCheckpoints(tmp_path) as run:
      run.save(2, _state(2), _meta(2), best=False)
      gate.open(after=0.5)
      raise RuntimeError('the training loop failed')
  assert _finalized(tmp_path, checkpoints.LATEST, 2)
  assert _lock_is_free(tmp_path)


PROCESS_SCRIPT = textwrap.dedent('''
    import pathlib, sys
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    port, process_id, workdir = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                               process_id=process_id, initialization_timeout=60)
    from et_flax import checkpoints, run_files
    meta = lambda epoch, **fields: run_files.RunMeta(epoch=epoch, config={}, **fields)
    replicated = NamedSharding(jax.make_mesh((2,), ('d',), devices=jax.devices()), P())
    state = lambda value: {'w': jax.device_put(np.full(4, value, np.float32), replicated)}
    with checkpoints.RunCheckpoints(workdir, max_to_keep=2) as run:
      run.save_interrupted(7, state(0), meta(0, interrupted=run_files.StoppedWithin(7)))
      for epoch in range(1, 5):  # the latest and the best, finalized together
        run.save(epoch, state(epoch), meta(epoch), best=True)
      assert run.latest_epoch() == 4
      restored, saved = run.restore(4, checkpoints.abstract_like(state(0), replicated))
      assert saved == meta(4), saved
      np.testing.assert_array_equal(restored['w'].addressable_data(0), np.full(4, 4.0))
    print('done', flush=True)
''')


@pytest.mark.slow
def test_two_processes_save_together(tmp_path):
  """Each manager's background barriers are its own (else Orbax fails: 'already ongoing')."""
  workdir = tmp_path / 'run'
  codes, outputs = run_processes(PROCESS_SCRIPT, [workdir], tmp_path)
  assert codes == [0, 0], '\n'.join(output[-3000:] for output in outputs)
  assert all('done' in output for output in outputs)
  assert sorted(p.name for p in (workdir / checkpoints.LATEST).iterdir()) == ['3', '4']
  assert sorted(p.name for p in (workdir / checkpoints.BEST).iterdir()) == ['4']
  assert not list((workdir / checkpoints.INTERRUPTED).iterdir())
