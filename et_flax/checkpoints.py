"""Orbax checkpoints of a run, and the config comparison behind resuming.

A workdir holds `checkpoints/<epoch>/` (the latest `max_to_keep`) and
`checkpoints_best/<epoch>/` (the one with the best validation top-1: the
report's "best weights saved"). Each holds two items: `state` (params, batch
stats, optimizer state with the plateau state, step, RNG) and `meta` (JSON:
epoch, config, settings, history, best accuracy: `run_files.RunMeta`).
Orbax writes a checkpoint to a temporary folder and renames it when
complete, so a run killed during a save resumes from the previous one.

Every array is saved as a global array, by all processes of a multi-process
run together, and restored with shardings built for the devices at hand: a
checkpoint written by any number of devices and processes resumes, evaluates
and warm-starts on any other number (one CPU device included).

Saves are asynchronous: `RunCheckpoints.save` returns once the arrays are
copied off the devices, and the files are written while the next epoch
trains. A save takes the workdir's checkpoint lock exclusively and holds it
until the checkpoint is finalized (renamed, and the ones past `max_to_keep`
deleted); reads take it shared (`workdir_lock.checkpoint_access`), so
`evaluate` during training never reads a checkpoint that is being written or
deleted. Every other call of a `RunCheckpoints` first waits for a pending save.

A checkpoint is read whole (every array and the meta) before it is used: one
damaged on disk (a file missing, truncated or unreadable, as a broken copy
leaves it, or a meta without one of its fields) is passed over for the
newest intact one, with a console line. A resumed run moves the damaged ones
to `checkpoints_damaged/` (never deletes them); readers leave them in place.
A full disk or quota while writing is a `console.StorageFullError` saying
what was being written (`writing`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from et_flax import console
from et_flax import run_files
from et_flax import workdir_lock
from et_flax.keras import weights as keras_weights

LATEST = 'checkpoints'
BEST = 'checkpoints_best'
# The one checkpoint of a run stopped by SIGINT or SIGTERM within an epoch,
# indexed by optimizer step; removed by the next regular save.
INTERRUPTED = 'checkpoints_interrupted'
# Damaged checkpoints a resumed run found, moved out of the folders above:
# <workdir>/checkpoints_damaged/<folder>/<step>.
DAMAGED = 'checkpoints_damaged'

# Config fields a resumed run may change: run length, logging, data location.
RESUMABLE_CHANGES = frozenset({
    'num_epochs', 'checkpoint_every_epochs', 'max_to_keep', 'eval_batch_size',
    'data.data_dir', 'data.tfds_dir', 'data.download', 'data.verify_source', 'init_from',
    'init_from_checkpoint', 'distributed', 'pretrained_weights', 'data.device_resident',
    # The same model and maths on another kernel (float32 rounding aside).
    'conv_impl', 'onednn_threads',
})


def config_to_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict:
  """A JSON round trip, so saved and current configs compare alike."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config))


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       ignore: frozenset[str] = RESUMABLE_CHANGES) -> list[str]:
  """'field: saved -> current' for each field that differs (`ignore` aside)."""
  saved, current = _flatten(saved), _flatten(current)
  missing = object()
  return [f'{key}: {saved.get(key, "(absent)")!r} -> {current.get(key, "(absent)")!r}'
          for key in sorted(set(saved) | set(current))
          if key not in ignore and saved.get(key, missing) != current.get(key, missing)]


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
  # Named handlers let a manager read a checkpoint's metadata (shapes and
  # dtypes) before restoring it.
  return {'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}


def _manager(directory: pathlib.Path, max_to_keep: int | None) -> ocp.CheckpointManager:
  """A manager whose saves finish in background threads."""
  return ocp.CheckpointManager(
      directory.absolute(), item_handlers=_item_handlers(),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
          enable_async_checkpointing=True,
          # The background threads of a multi-process save meet at barriers
          # named after the step folder ('3') and the manager's state, the same
          # for every manager: the latest and the best checkpoints of one epoch
          # are finalized together, so each manager's barriers get its own name.
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              barrier_sync_key_prefix=f'et_flax_{directory.name}')))


def _read_only_manager(directory: pathlib.Path, local: bool = False
                       ) -> ocp.CheckpointManager:
  """A manager that reads; with `local`, this process alone (no barriers: in a
  multi-process run Orbax's reads are collectives, which a read that fails on
  one process leaves out of step)."""
  options = ocp.CheckpointManagerOptions(read_only=True, enable_async_checkpointing=False)
  if local:
    options.multiprocessing_options = ocp.options.MultiprocessingOptions(
        primary_host=jax.process_index(), active_processes={jax.process_index()})
  return ocp.CheckpointManager(directory.absolute(), item_handlers=_item_handlers(),
                               options=options)


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Shapes and dtypes of `tree`'s arrays, to be restored with `sharding`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def _local_sharding() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _wait_for(managers: Sequence[ocp.CheckpointManager]) -> None:
  """Waits for every manager's save, then raises the first one's error."""
  errors = []
  for manager in managers:
    try:
      manager.wait_until_finished()
    except Exception as error:  # the others' saves are waited for all the same
      errors.append(error)
  if errors:
    raise errors[0]


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
  """Turns a full disk or quota met while writing `what` into a StorageFullError."""
  try:
    yield
  except console.StorageFullError:
    raise
  except Exception as error:
    reason = console.storage_full(error)
    if reason is None:
      raise
    raise console.StorageFullError(f'{reason} while writing {what}') from error


def complete_epochs(workdir: pathlib.Path) -> list[int]:
  """The epochs whose checkpoints are complete (Orbax names a step's folder
  when it is written), oldest first."""
  directory = workdir / LATEST
  if not directory.is_dir():
    return []
  return sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit())


def storage_full_message(error: BaseException, workdir: pathlib.Path) -> str:
  """One line for a run stopped by a full disk: what was being written, what is saved."""
  what = next((str(cause) for cause in _causes(error)
               if isinstance(cause, console.StorageFullError)),
              f'{console.storage_full(error)} while writing in {workdir}')
  epochs = complete_epochs(workdir)
  saved = (f"epoch {epochs[-1]}'s checkpoint ({workdir / LATEST / str(epochs[-1])}) is "
           'the last complete one' if epochs else 'no checkpoint was completed yet')
  return (f'{what}; {saved}. Free space (or raise the quota) and run the same command '
          'to resume.')


def _causes(error: BaseException) -> Iterator[BaseException]:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


class DamagedCheckpointError(ValueError):
  """Checkpoints are there, but none that was asked for can be read."""


@dataclasses.dataclass(frozen=True)
class Damage:
  """A checkpoint that could not be read whole, and why."""
  path: pathlib.Path  # its step folder
  reason: str


def _read_failure(error: Exception) -> str | None:
  """Why a checkpoint's files could not be read (missing, truncated, not
  JSON...), on one line; None for an error that is not about its files.

  Orbax and TensorStore raise OSError or ValueError for those (the latter
  with TensorStore's status: DATA_LOSS, NOT_FOUND, OUT_OF_RANGE...), at times
  behind a plain Exception.
  """
  for cause in _causes(error):
    if isinstance(cause, (OSError, ValueError)):
      text = ' '.join(str(cause).split()) or type(cause).__name__
      return text if len(text) <= 200 else text[:197] + '...'
  return None


def _read_whole(manager: ocp.CheckpointManager, step: int,
                sharding: jax.sharding.Sharding) -> tuple[dict[str, Any], run_files.RunMeta]:
  """Every array (as saved, with `sharding`) and the meta of `step`."""
  abstract = abstract_like(manager.item_metadata(step)['state'], sharding)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  if restored['meta'] is None:
    raise FileNotFoundError(f'{manager.directory / str(step)} has no meta')
  return restored['state'], run_files.RunMeta.from_dict(restored['meta'])


def _read_meta(manager: ocp.CheckpointManager, step: int) -> run_files.RunMeta:
  """The meta of `step` alone."""
  return run_files.RunMeta.from_dict(manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))['meta'])


def _read_or_note(read: Callable[[], Any], manager: ocp.CheckpointManager, step: int,
                  damaged: list[Damage]) -> Any:
  """`read()`'s result; None, with the checkpoint added to `damaged`, when its
  files could not be read (any other error is raised)."""
  try:
    return read()
  except Exception as error:  # only a read failure is passed over
    reason = _read_failure(error)
    if reason is None:
      raise
    damaged.append(Damage(pathlib.Path(manager.directory) / str(step), reason))
    return None


def _newest_intact(candidates: Sequence[tuple[ocp.CheckpointManager, int]],
                   sharding: jax.sharding.Sharding, damaged: list[Damage]
                   ) -> tuple[int, dict[str, Any], run_files.RunMeta] | None:
  """(index, state, meta) of the first candidate that reads whole; the ones
  before it go to `damaged`. None if none does."""
  for index, (manager, step) in enumerate(candidates):
    read = _read_or_note(lambda: _read_whole(manager, step, sharding), manager, step, damaged)
    if read is not None:
      return index, *read
  return None


def _shown(path: str | os.PathLike, workdir: pathlib.Path) -> pathlib.Path:
  """`path` as the user names it: under `workdir` as given."""
  return workdir / os.path.relpath(path, workdir.absolute())


def _named(paths: Sequence[pathlib.Path], workdir: pathlib.Path) -> str:
  names = [str(_shown(path, workdir)) for path in paths]
  return names[0] if len(names) == 1 else ', '.join(names[:-1]) + ' and ' + names[-1]


def _damage_line(damaged: Sequence[Damage], workdir: pathlib.Path) -> str:
  verb = 'is' if len(damaged) == 1 else 'are'
  return (f'{_named([d.path for d in damaged], workdir)} {verb} damaged '
          f'({damaged[0].reason})')


def _no_intact_error(damaged: Sequence[Damage], workdir: pathlib.Path,
                     what: str, advice: str) -> DamagedCheckpointError:
  return DamagedCheckpointError(
      f'{what}: {_damage_line(damaged, workdir)}. '
      f'{"It is" if len(damaged) == 1 else "They are"} left in place. {advice}')


def _move_aside(damage: Damage, workdir: pathlib.Path) -> pathlib.Path:
  """Moves a damaged step folder to checkpoints_damaged/<folder>/ (a free name)."""
  folder = workdir / DAMAGED / damage.path.parent.name
  folder.mkdir(parents=True, exist_ok=True)
  target, copy = folder / damage.path.name, 1
  while target.exists():
    copy += 1
    target = folder / f'{damage.path.name}.{copy}'
  os.rename(damage.path, target)
  return target


class RunCheckpoints:
  """The latest and the best checkpoints of one workdir, indexed by epoch.

  In a multi-process run every process makes one and calls `save` and
  `restore` together, as Orbax expects. `save` returns before the files are
  written; every other method first waits for it. `close` (or leaving a
  `with` block) waits for everything.
  """

  def __init__(self, workdir: str | pathlib.Path, max_to_keep: int = 3):
    self.workdir = pathlib.Path(workdir)
    self._is_writer = jax.process_index() == 0
    self.latest = _manager(self.workdir / LATEST, max_to_keep)
    self.best = _manager(self.workdir / BEST, 1)
    self._interrupted: ocp.CheckpointManager | None = None
    # The managers whose save is under way, and (process 0) the thread that
    # releases the checkpoint lock once they are finalized, with its error.
    self._pending: list[ocp.CheckpointManager] = []
    self._releaser: threading.Thread | None = None
    self._releaser_error: Exception | None = None
    # What the pending save writes, for the message of a full disk.
    self._pending_what = ''
    # The interrupted checkpoint is older than a regular save under way; it
    # is removed once that save is finalized (by the next call that locks).
    self._interrupted_outdated = False
    self._closed = False

  def __enter__(self) -> RunCheckpoints:
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    # On an error, pending saves are still waited for, but the other
    # processes of a run may be gone: no removal, which meets them at a barrier.
    self._close(tidy=exc_type is None)

  def _interrupted_manager(self) -> ocp.CheckpointManager:
    # Made on first use: a run that is never interrupted has no such folder.
    if self._interrupted is None:
      self._interrupted = _manager(self.workdir / INTERRUPTED, 1)
    return self._interrupted

  def _exclusive_lock(self) -> contextlib.ExitStack:
    """The checkpoint lock taken exclusively (by process 0): closing releases it."""
    lock = contextlib.ExitStack()
    if self._is_writer:
      lock.enter_context(workdir_lock.checkpoint_access(self.workdir, exclusive=True))
    return lock

  def _release_when_finalized(self, lock: contextlib.ExitStack) -> None:
    """Releases `lock` from a thread once the pending saves are finalized.

    At once, not at the next call: readers wait for a save, not for an epoch.
    """
    managers = list(self._pending)

    def release() -> None:
      try:
        _wait_for(managers)
      except Exception as error:  # raised in the caller's thread by _finish_pending
        self._releaser_error = error
      finally:
        lock.close()

    self._releaser = threading.Thread(target=release, name='et_flax-checkpoint-lock')
    self._releaser.start()

  def _finish_pending(self) -> None:
    """Waits until the pending save is finalized and its lock released.

    Raises the save's error, if it failed.
    """
    releaser, self._releaser = self._releaser, None
    managers, self._pending = self._pending, []
    if releaser is not None:
      releaser.join()
    error, self._releaser_error = self._releaser_error, None
    with writing(self._pending_what):
      # Here too: Orbax raises a failed save's error once in each thread that
      # waits for it, and only process 0 has a releaser.
      _wait_for(managers)
      if error is not None:
        raise error

  def _remove_outdated_interrupted(self) -> None:
    """Removes an interrupted checkpoint older than a finalized regular one.

    Called with the lock held and no save pending; by every process.
    """
    if self._interrupted_outdated:
      interrupted = self._interrupted_manager()
      for step in interrupted.all_steps():
        interrupted.delete(step)
      self._interrupted_outdated = False

  def _checkpoint_of(self, which: int | run_files.RunMeta
                     ) -> tuple[ocp.CheckpointManager, int]:
    """The manager and step of epoch `which`'s checkpoint, or of the one the
    meta `which` describes (an epoch's, or the interrupted one)."""
    if isinstance(which, int):
      return self.latest, which
    if which.interrupted is not None:
      return self._interrupted_manager(), which.interrupted.global_step
    return self.latest, which.epoch

  def latest_epoch(self) -> int | None:
    self._finish_pending()
    return self.latest.latest_step()

  def check_fits(self, meta: run_files.RunMeta, abstract_state: Mapping[str, Any]) -> None:
    """Refuses, naming them, saved arrays whose shapes `abstract_state` changes.

    For the checkpoint `meta` describes, as `restore` chooses it; called
    before `restore`, whose own error is hundreds of lines from inside Orbax.
    """
    self._finish_pending()
    manager, step = self._checkpoint_of(meta)
    check_resumable_shapes(manager.item_metadata(step)['state'], abstract_state,
                           pathlib.Path(manager.directory) / str(step), self.workdir)

  @staticmethod
  def _save_args(state: Mapping[str, Any], meta: run_files.RunMeta) -> ocp.args.Composite:
    # The meta is written in the background: a copy of it, as it is now (the
    # caller's history list grows by the next epoch). Orbax copies the arrays.
    return ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(meta.to_dict()))

  def save(self, epoch: int, state: Mapping[str, Any], meta: run_files.RunMeta,
           *, best: bool) -> None:
    """Starts saving `state` (global arrays) and `meta` as `epoch`, and as best if `best`.

    Returns once the arrays are copied off the devices; the files are written
    in the background, under the exclusive checkpoint lock until finalized.
    """
    self._finish_pending()
    args = self._save_args(state, meta)
    self._pending_what = f'the checkpoint of epoch {epoch} in {self.workdir / LATEST}'
    lock = self._exclusive_lock()
    try:
      self._remove_outdated_interrupted()
      with writing(self._pending_what):
        if best and epoch not in self.best.all_steps():
          self.best.save(epoch, args=args)
          self._pending.append(self.best)
        # A run resumed from an older checkpoint redoes epochs bit for bit, so a
        # step that exists already holds the same values. (No save is pending
        # here: the steps listed are finalized ones.)
        if epoch not in self.latest.all_steps():
          self.latest.save(epoch, args=args)
          self._pending.append(self.latest)
      if (self.workdir / INTERRUPTED).is_dir():  # older than this one, once it is written
        self._interrupted_outdated = True
        if not self._pending:
          self._remove_outdated_interrupted()
    except BaseException:
      # What was started is finished before the lock goes (waiting for a
      # manager with nothing under way returns at once).
      self._pending = []
      try:
        _wait_for((self.best, self.latest))
      finally:
        lock.close()
      raise
    if self._pending and self._is_writer:
      self._release_when_finalized(lock)
    else:
      lock.close()

  def save_interrupted(self, step: int, state: Mapping[str, Any],
                       meta: run_files.RunMeta) -> None:
    """Saves a run stopped within an epoch, as optimizer step `step`; returns when written."""
    self._finish_pending()
    args = self._save_args(state, meta)
    with self._exclusive_lock():
      self._remove_outdated_interrupted()
      manager = self._interrupted_manager()
      if step not in manager.all_steps():
        with writing(f'the checkpoint of step {step} in {self.workdir / INTERRUPTED}'):
          manager.save(step, args=args)
          # The process is about to exit: written before the lock goes.
          manager.wait_until_finished()

  def restore(self, which: int | run_files.RunMeta, abstract_state: Mapping[str, Any]
              ) -> tuple[dict[str, Any], run_files.RunMeta]:
    """The state of an epoch's checkpoint, or of the one a meta describes.

    `which` is an epoch, or a meta from `latest_meta` (which may describe the
    interrupted checkpoint). Restored with the shapes, dtypes and shardings
    of `abstract_state`.
    """
    self._finish_pending()
    manager, step = self._checkpoint_of(which)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored['state'], run_files.RunMeta.from_dict(restored['meta'])

  def close(self) -> None:
    """Waits for the pending save (raising its error) and closes the managers."""
    self._close(tidy=True)

  def _close(self, tidy: bool) -> None:
    if self._closed:
      return
    self._closed = True
    try:
      self._finish_pending()
      if tidy and self._interrupted_outdated:
        with self._exclusive_lock():
          self._remove_outdated_interrupted()
    finally:
      for manager in (self.latest, self.best, self._interrupted):
        if manager is not None:
          manager.close()


def _newest_meta(directory: pathlib.Path) -> run_files.RunMeta | None:
  if not directory.is_dir():
    return None
  manager = _read_only_manager(directory)
  try:
    step = manager.latest_step()
    return None if step is None else _read_meta(manager, step)
  finally:
    manager.close()


def latest_meta(workdir: str | pathlib.Path) -> run_files.RunMeta | None:
  """The newest checkpoint's meta, or None; creates nothing.

  That is the latest epoch's, or the interrupted one's if it is further on
  (then its `interrupted` says the epoch under way, the steps done in it and
  its partial metrics). Only the meta is read: a run resumes from
  `find_resume_point`, which reads each checkpoint whole.

  Raises:
    ValueError: a meta without one of its fields (`run_files.RunMeta.from_dict`).
  """
  workdir = pathlib.Path(workdir)
  with workdir_lock.checkpoint_access(workdir, exclusive=False):
    metas = [meta for meta in (_newest_meta(workdir / LATEST),
                               _newest_meta(workdir / INTERRUPTED)) if meta is not None]
  return max(metas, key=lambda meta: meta.global_step, default=None)


@dataclasses.dataclass
class Checkpoint:
  """A checkpoint as a reader got it."""
  variables: dict[str, Any]  # params and batch stats
  meta: run_files.RunMeta
  which: str  # 'best', 'latest' or the epoch: the one read (latest if best was damaged)
  path: pathlib.Path


def read_checkpoint(workdir: str | pathlib.Path, which: str | int = 'latest',
                    sharding: jax.sharding.Sharding | None = None) -> Checkpoint:
  """Params, batch stats and meta of a run's checkpoint, read whole.

  `which` is 'latest', 'best' or an epoch number (of the latest checkpoints).
  A damaged 'latest' gives the newest intact epoch, a damaged 'best' the
  latest (with a console line saying so; they are left in place); an epoch
  asked for by number is that one or an error, as is a run whose every
  checkpoint is damaged (DamagedCheckpointError). The arrays are restored
  with `sharding` (default: this process's first device), whatever topology
  wrote them.
  """
  workdir = pathlib.Path(workdir).expanduser()
  which = str(which)
  if which not in ('latest', 'best') and not which.isdigit():
    raise ValueError(f"checkpoint must be 'best', 'latest' or an epoch number, got {which!r}")
  directory = workdir / (BEST if which == 'best' else LATEST)
  if not directory.is_dir():
    raise FileNotFoundError(f'{directory} does not exist: {workdir} holds no '
                            f'{which} checkpoint')
  damaged: list[Damage] = []
  with workdir_lock.checkpoint_access(workdir, exclusive=False), \
      contextlib.ExitStack() as managers:
    manager = managers.enter_context(contextlib.closing(_read_only_manager(directory)))
    steps = sorted(manager.all_steps(), reverse=True)
    if which.isdigit():
      if int(which) not in steps:
        raise FileNotFoundError(f'{directory} holds no checkpoint {which!r} (has '
                                f'{sorted(steps)})')
      candidates = [(manager, int(which))]
    else:
      candidates = [(manager, step) for step in steps[:1 if which == 'best' else None]]
    if which == 'best' and (workdir / LATEST).is_dir():
      latest = managers.enter_context(contextlib.closing(_read_only_manager(workdir / LATEST)))
      candidates += [(latest, step) for step in sorted(latest.all_steps(), reverse=True)]
    if not candidates:
      raise FileNotFoundError(f'{directory} holds no checkpoint {which!r} (has [])')
    found = _newest_intact(candidates, sharding or _local_sharding(), damaged)
  if found is None:
    raise _no_intact_error(
        damaged, workdir, f'no intact {which} checkpoint in {workdir}',
        'Copy an intact checkpoint back (from a backup), or ask for another with '
        '--checkpoint.' if which.isdigit() else
        'Copy intact checkpoints back (from a backup), or train the run again.')
  index, state, meta = found
  manager, step = candidates[index]
  path = pathlib.Path(manager.directory) / str(step)
  used = 'latest' if path.parent.name == LATEST and which == 'best' else which
  if damaged:
    console.warning('%s, left in place; using %s (epoch %d) instead',
                    _damage_line(damaged, workdir), _shown(path, workdir), meta.epoch)
  elif used != which:
    console.warning('%s holds no checkpoint; using %s (epoch %d) instead', directory,
                    _shown(path, workdir), meta.epoch)
  return Checkpoint({'params': state['params'], 'batch_stats': state.get('batch_stats', {})},
                    meta, used, path)


def load_checkpoint(workdir: str | pathlib.Path, which: str | int = 'latest',
                    sharding: jax.sharding.Sharding | None = None
                    ) -> tuple[dict[str, Any], run_files.RunMeta]:
  """Params, batch stats and meta of a run's checkpoint (`read_checkpoint`)."""
  checkpoint = read_checkpoint(workdir, which, sharding)
  return checkpoint.variables, checkpoint.meta


def load_variables(workdir: str | pathlib.Path, which: str | int = 'latest',
                   sharding: jax.sharding.Sharding | None = None) -> dict[str, Any]:
  """Params and batch stats of another run's checkpoint (for warm starts)."""
  return load_checkpoint(workdir, which, sharding)[0]


def check_same_shapes(loaded: Mapping[str, Any], expected: Mapping[str, Any],
                      source: str) -> None:
  """A clear error listing missing, extra and mismatched arrays."""
  flat_loaded = {'/'.join(str(getattr(k, 'key', k)) for k in path): np.shape(v)
                 for path, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  flat_expected = {'/'.join(str(getattr(k, 'key', k)) for k in path): np.shape(v)
                   for path, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  missing = sorted(set(flat_expected) - set(flat_loaded))
  extra = sorted(set(flat_loaded) - set(flat_expected))
  mismatched = [f'{k}: {flat_loaded[k]} vs {flat_expected[k]}'
                for k in sorted(set(flat_loaded) & set(flat_expected))
                if flat_loaded[k] != flat_expected[k]]
  if missing or extra or mismatched:
    raise ValueError(f'{source} does not fit this model: missing {missing}, '
                     f'unexpected {extra}, shapes differing {mismatched}')


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
  # Orbax's metadata holds dicts where the live state may hold named tuples or
  # lists: the key names alone compare alike.
  def name(key: Any) -> str:
    for attribute in ('key', 'name', 'idx'):
      if hasattr(key, attribute):
        return str(getattr(key, attribute))
    return str(key)
  return {'/'.join(name(k) for k in path): tuple(np.shape(v))
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_resumable_shapes(saved: Any, expected: Any, source: str | pathlib.Path,
                           workdir: str | pathlib.Path, limit: int = 12) -> None:
  """A ValueError listing 'path: saved shape -> new shape' where they differ.

  `saved` is a checkpoint's state metadata (or arrays), `expected` the state
  a resumed run would restore it into. The model's params and batch stats
  are listed when they differ, else the rest (an optimizer's state).
  """
  saved, expected = _shapes_by_path(saved), _shapes_by_path(expected)
  missing = '(absent)'
  differences = {path: f'{path}: {saved.get(path, missing)} -> {expected.get(path, missing)}'
                 for path in sorted(saved.keys() | expected.keys())
                 if saved.get(path) != expected.get(path)}
  if not differences:
    return
  model = [line for path, line in differences.items()
           if path.startswith(('params/', 'batch_stats/'))]
  shown = model or list(differences.values())
  if len(shown) > limit:
    shown = shown[:limit] + [f'... and {len(shown) - limit} more']
  if model:
    advice = ('The model changed shape, so this run cannot resume, even with '
              '--allow_config_change: train this config in another workdir.')
  else:
    advice = ("The optimizer's state changed shape, so this run cannot resume, even "
              'with --allow_config_change: use another workdir, warm-started from '
              f"this run's params with --config.init_from={workdir}.")
  raise ValueError(f'{source} does not fit this config; arrays whose shapes differ '
                   '(saved -> now):\n  ' + '\n  '.join(shown) + '\n' + advice)


# ---------------------------------------------------------------------------
# A run's start: resumed, warm-started, from Keras weights, or fresh.

HISTORY_FILE = run_files.HISTORY_FILE  # the file is run_files.py's


@dataclasses.dataclass
class RunProgress:
  """Where a run stands, as its checkpoints record it."""
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  best_top1: float = -1.0
  epoch: int = 0  # the last finished epoch
  # A run stopped within epoch `epoch + 1`; None otherwise.
  within: run_files.StoppedWithin | None = None
  # The finished epoch whose checkpoint is the latest (None: only the
  # interrupted one is newer).
  saved_epoch: int | None = 0


def _resume_candidates(managers: Mapping[str, ocp.CheckpointManager],
                       damaged: list[Damage]) -> list[tuple[ocp.CheckpointManager, int]]:
  """The interrupted and latest checkpoints, newest first (by global step, a
  latest epoch before an interrupted one of the same step); those whose meta
  cannot be read go to `damaged`."""
  ranked = []
  for folder in (LATEST, INTERRUPTED):
    manager = managers.get(folder)
    for step in [] if manager is None else manager.all_steps():
      global_step = _read_or_note(lambda: _read_meta(manager, step).global_step,
                                  manager, step, damaged)
      if global_step is not None:
        ranked.append((global_step, folder == LATEST, manager, step))
  ranked.sort(key=lambda entry: entry[:2], reverse=True)
  return [(manager, step) for _, _, manager, step in ranked]


def find_resume_point(workdir: pathlib.Path) -> run_files.RunMeta | None:
  """The meta of the checkpoint a run in `workdir` resumes from; None for a new run.

  That is the newest one (interrupted or of an epoch) that reads whole. The
  damaged ones are moved to checkpoints_damaged/ (by process 0, under the
  exclusive checkpoint lock) and named on one console line; so is a damaged
  best checkpoint, which is written again from its epoch's checkpoint where
  that is intact. Raises DamagedCheckpointError, moving nothing, when there
  are checkpoints and none reads whole.

  In a multi-process run every process reads them, and they agree: a
  checkpoint damaged on any process (or not listed by one) counts as damaged,
  so every process resumes from the same one, or raises the same error.
  """
  folders = [folder for folder in (LATEST, INTERRUPTED, BEST) if (workdir / folder).is_dir()]
  multiprocess = jax.process_count() > 1
  if not folders and not multiprocess:  # the processes agree on a new run too
    return None
  is_writer = jax.process_index() == 0
  damaged: list[Damage] = []
  with contextlib.ExitStack() as stack:
    if is_writer:
      stack.enter_context(workdir_lock.checkpoint_access(workdir, exclusive=True))
    # Several processes read apart, then agree (_agreed_newest_intact).
    managers = {folder: stack.enter_context(contextlib.closing(
        _read_only_manager(workdir / folder, local=multiprocess))) for folder in folders}
    candidates = _resume_candidates(managers, damaged)
    # Read whole on this process's first device; restored again for the run.
    if multiprocess:
      found, damaged = _agreed_newest_intact(candidates, damaged, workdir)
    else:
      found = _newest_intact(candidates, _local_sharding(), damaged)
    if found is None:
      if not damaged:
        return None
      raise _no_intact_error(
          damaged, workdir, f'no intact checkpoint to resume {workdir} from',
          f'Move {" and ".join(str(workdir / f) for f in folders if f != BEST)} '
          'elsewhere to train this run from the start, or copy intact checkpoints back '
          'from a backup.')
    _, _, meta = found
    best_copy = _check_best(managers, damaged, meta, workdir if multiprocess else None)
    if multiprocess:  # every process has read before any folder moves
      multihost_utils.sync_global_devices('et_flax_checkpoints_read')
    moved = [_move_aside(damage, workdir) for damage in damaged] if is_writer else []
    if best_copy is not None and is_writer:
      _copy_step(*best_copy)
  if multiprocess:
    multihost_utils.sync_global_devices('et_flax_checkpoints_moved')
  if damaged:
    where = (f'interrupted, step {meta.interrupted.global_step}'
             if meta.interrupted is not None else f'epoch {meta.epoch}')
    console.warning(
        '%s: moved to %s (kept, not deleted); resuming from the newest intact checkpoint '
        '(%s)%s', _damage_line(damaged, workdir),
        _named(moved, workdir) if moved else workdir / DAMAGED, where,
        f'; {BEST}/{best_copy[1].name} written again from {_shown(best_copy[0], workdir)}'
        if best_copy is not None else '')
  return meta


def _check_best(managers: Mapping[str, ocp.CheckpointManager], damaged: list[Damage],
                meta: run_files.RunMeta, workdir: pathlib.Path | None = None
                ) -> tuple[pathlib.Path, pathlib.Path] | None:
  """Reads the best checkpoint whole; if damaged, adds it to `damaged` and
  returns (source, target) to write it again from its epoch's intact checkpoint.

  With `workdir` (a multi-process run: every process calls it) the processes
  agree: the best is damaged if it is on any process, and written again if
  its epoch's checkpoint is intact on every one.
  """
  best = managers.get(BEST)
  steps = [] if best is None else sorted(best.all_steps(), reverse=True)
  best_damage: list[Damage] = []
  if steps:
    _newest_intact([(best, steps[0])], _local_sharding(), best_damage)
  if workdir is not None:
    agreed: dict[str, Damage] = {}
    _agreed_damage(_gather({'damaged': [[_name(d.path), d.reason] for d in best_damage]}),
                   workdir, agreed)
    best_damage = list(agreed.values())
  if not best_damage:
    return None
  damaged += best_damage
  target = best_damage[0].path
  epoch, latest = int(target.name), managers.get(LATEST)
  intact = latest is not None and epoch in latest.all_steps()
  if intact and (epoch != meta.epoch or meta.interrupted is not None):  # else read whole
    intact = _newest_intact([(latest, epoch)], _local_sharding(), []) is not None
  if workdir is not None:  # intact on every process, and not moved aside
    source = f'{LATEST}/{epoch}'
    intact = all(_gather(intact)) and all(_name(d.path) != source for d in damaged)
  if not intact:
    return None
  return pathlib.Path(latest.directory) / str(epoch), target


def _gather(value: Any) -> list[Any]:
  """`value` (JSON) as each process gave it, in process order; called by all."""
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(data.size))
  # Padded to a multiple of 1 KiB: few shapes, so few programs to compile.
  padded = np.zeros(-(-int(sizes.max()) // 1024) * 1024, np.uint8)
  padded[:data.size] = data
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:size])) for row, size in zip(rows, sizes)]


def _name(path: pathlib.Path) -> str:
  """'<folder>/<step>' of a step folder: the same on every process."""
  return f'{path.parent.name}/{path.name}'


def _agreed_damage(verdicts: Sequence[Mapping[str, Any]], workdir: pathlib.Path,
                   agreed: dict[str, Damage]) -> None:
  """Adds to `agreed` what any process found damaged (naming the process)."""
  for process, verdict in enumerate(verdicts):
    for name, reason in verdict['damaged']:
      agreed.setdefault(name, Damage(workdir.absolute() / name,
                                     f'on process {process}: {reason}'))


def _agreed_newest_intact(candidates: Sequence[tuple[ocp.CheckpointManager, int]],
                          damaged: Sequence[Damage], workdir: pathlib.Path
                          ) -> tuple[tuple[int, dict[str, Any], run_files.RunMeta] | None,
                                     list[Damage]]:
  """`_newest_intact`, agreed by every process (all call it), and the damaged
  ones, the same on every process.

  That is the newest candidate every process read whole: one damaged on any
  process, or not listed by one (`damaged` holds this process's unreadable
  metas), is damaged. Each process reads on past the ones another found
  damaged, in rounds, until they name the same one (or none).
  """
  sharding = _local_sharding()
  names = [_name(pathlib.Path(manager.directory) / str(step)) for manager, step in candidates]
  listed = names + [_name(damage.path) for damage in damaged]
  own = list(damaged)
  agreed: dict[str, Damage] = {}
  index, found = -1, None
  while True:
    if found is None or names[index] in agreed:
      found = None
      for index in range(index + 1, len(candidates)):
        if names[index] not in agreed:
          manager, step = candidates[index]
          found = _read_or_note(lambda: _read_whole(manager, step, sharding),
                                manager, step, own)
          if found is not None:
            break
    verdicts = _gather({'listed': listed, 'intact': None if found is None else names[index],
                        'damaged': [[_name(d.path), d.reason] for d in own]})
    before = len(agreed)
    _agreed_damage(verdicts, workdir, agreed)
    anywhere = {name for verdict in verdicts for name in verdict['listed']}
    for process, verdict in enumerate(verdicts):
      for name in sorted(anywhere - set(verdict['listed'])):
        agreed.setdefault(name, Damage(workdir.absolute() / name,
                                       f'not listed on process {process}'))
    intact = {verdict['intact'] for verdict in verdicts}
    if len(intact) == 1:
      break
    if len(agreed) == before:  # their metas order them differently: none is trusted
      for name in intact - {None}:
        agreed.setdefault(name, Damage(workdir.absolute() / name,
                                       'read differently by the processes'))
  return (None if found is None else (index, *found)), list(agreed.values())


def _copy_step(source: pathlib.Path, target: pathlib.Path) -> None:
  """Copies a step folder (a best checkpoint holds what its epoch's does), under
  Orbax's temporary name until complete."""
  partial = target.with_name(target.name + '.orbax-checkpoint-tmp-copy')
  if partial.exists():
    shutil.rmtree(partial)  # an earlier copy that did not complete
  shutil.copytree(source, partial)
  os.rename(partial, target)


def check_resumable(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                    allow_config_change: bool) -> run_files.RunMeta | None:
  """The meta a run in `workdir` resumes from (None: a new run), from
  `find_resume_point`.

  Raises ValueError listing the differences when the saved config differs
  from `config` in more than RESUMABLE_CHANGES and `allow_config_change` is
  not given.
  """
  saved = find_resume_point(workdir)
  if saved is None:
    return None
  differences = config_differences(saved.config, config_to_dict(config))
  if differences and not allow_config_change:
    raise ValueError(
        f'{workdir} holds a run with another config; refusing to resume it. '
        'Differences (saved -> now):\n  ' + '\n  '.join(differences) +
        '\nUse another workdir, or pass --allow_config_change to resume anyway.')
  return saved


def run_meta(config: ml_collections.ConfigDict, progress: RunProgress,
             settings: Mapping[str, Any],
             interrupted: run_files.StoppedWithin | None = None,
             keras_import: Mapping[str, Any] | None = None) -> run_files.RunMeta:
  """The meta saved beside a checkpoint's arrays, for a run at `progress`.

  `settings` is `settings.Settings.to_dict()`, `interrupted` a run stopped
  within an epoch, `keras_import` the record of a run made from a Keras file.
  """
  return run_files.RunMeta(
      epoch=progress.epoch, config=config_to_dict(config), settings=dict(settings),
      history=progress.history, best_val_top1_accuracy=progress.best_top1,
      interrupted=interrupted,
      keras_import=None if keras_import is None else dict(keras_import))


def state_dict(state: Any, rng: jax.Array) -> dict[str, Any]:
  """The arrays of a checkpoint: a TrainState's and the run's RNG key."""
  return {'params': state.params, 'batch_stats': state.batch_stats,
          'opt_state': state.opt_state, 'step': state.step,
          'rng': jax.random.key_data(rng)}


def starting_variables(config: ml_collections.ConfigDict,
                       init_variables: Callable[[], dict[str, Any]],
                       sharding: jax.sharding.Sharding) -> dict[str, Any] | None:
  """A new run's starting weights, if not the model's init.

  Keras weights (`config.pretrained_weights`: a pretrained backbone, a new
  head) or another run's checkpoint (`config.init_from`: a warm start, the
  optimizer state fresh), checked against `init_variables()`.
  """
  if config.get('pretrained_weights'):
    return keras_weights.import_keras_weights(config.pretrained_weights, init_variables(),
                                             keep_head=True)
  if config.get('init_from'):
    variables = load_variables(config.init_from, config.get('init_from_checkpoint', 'latest'),
                               sharding)
    check_same_shapes(variables, init_variables(), f'The checkpoint in {config.init_from}')
    console.info('Warm start: params from %s (optimizer state fresh)', config.init_from)
    return variables
  return None


def restore_or_init(run_checkpoints: RunCheckpoints, saved_meta: run_files.RunMeta | None,
                    state: Any, rng: jax.Array, sharding: jax.sharding.Sharding
                    ) -> tuple[Any, jax.Array, RunProgress]:
  """`state` and `rng` as the checkpoint `saved_meta` describes, or as given.

  The arrays are restored with `sharding` (a checkpoint of any topology
  restores on this one). A shape change (allowed through
  --allow_config_change) is refused with the arrays that differ.
  """
  if saved_meta is None:
    return state, rng, RunProgress()
  abstract = abstract_like(state_dict(state, rng), sharding)
  run_checkpoints.check_fits(saved_meta, abstract)
  restored, meta = run_checkpoints.restore(saved_meta, abstract)
  state = state.replace(params=restored['params'], batch_stats=restored['batch_stats'],
                        opt_state=restored['opt_state'], step=restored['step'])
  within = saved_meta.interrupted
  progress = RunProgress(history=meta.history, best_top1=meta.best_val_top1_accuracy,
                         epoch=meta.epoch, within=within,
                         saved_epoch=meta.epoch if within is None else None)
  workdir = run_checkpoints.workdir
  if within is not None and within.steps_done:
    console.info('Resuming %s within epoch %d, after its step %d (global step %d)',
                 workdir, within.epoch, within.steps_done, int(state.step))
  else:
    console.info('Resuming %s after epoch %d (global step %d)', workdir, meta.epoch,
                 int(state.step))
  return state, jax.random.wrap_key_data(restored['rng']), progress


def last_good_checkpoint(workdir: pathlib.Path, epoch: int | None) -> str:
  """Where a run stopped on a non-finite loss resumes from, truthfully."""
  if epoch is None:
    return 'No checkpoint of a finished epoch was written yet'
  return (f'The last good checkpoint, of epoch {epoch}, stays in '
          f'{workdir / LATEST / str(epoch)}')


def finished_run_summary(workdir: pathlib.Path, meta: run_files.RunMeta,
                         num_epochs: int) -> dict[str, float]:
  """Says that a rerun has nothing left to train, and how to go on.

  Returns the last epoch's summary, as a run that trained it would.
  """
  history = meta.history
  best = max(history, key=lambda entry: entry['val_top1_accuracy'], default=None)
  console.info(
      '%s is complete: %d epochs trained (config.num_epochs=%d)%s. Checkpoints: %s '
      '(latest) and %s (best). To train on, rerun with a larger --config.num_epochs '
      '(e.g. --config.num_epochs=%d).', workdir, meta.epoch, num_epochs,
      '' if best is None else (f'; best val top-1 {best["val_top1_accuracy"]:.4f} '
                               f'at epoch {best["epoch"]}'),
      workdir / LATEST, workdir / BEST, 2 * meta.epoch)
  return history[-1] if history else {}
