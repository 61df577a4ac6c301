"""A run workdir's own files: their names, reading and writing.

Beside its checkpoints (checkpoints.py, with the meta each one holds:
`RunMeta` here) a workdir holds:

  history.jsonl  one JSON line per finished epoch: its metrics, rate and timing
  classes.json   the class of each label: {'wnids': [...], 'class_names': [...]}

Every other module reads and writes them through this one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

HISTORY_FILE = 'history.jsonl'
CLASSES_FILE = 'classes.json'

Workdir = str | os.PathLike


def history_path(workdir: Workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / HISTORY_FILE


def classes_path(workdir: Workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / CLASSES_FILE


# ---------------------------------------------------------------------------
# history.jsonl

def read_history(workdir: Workdir, missing_ok: bool = False) -> list[dict[str, Any]]:
  """The epochs' entries, oldest first.

  Raises:
    FileNotFoundError: the workdir has no history (unless `missing_ok`: then []).
  """
  path = history_path(workdir)
  if not path.exists():
    if missing_ok:
      return []
    raise FileNotFoundError(f'{path} is missing: {workdir} has no training history '
                            '(was it trained by et_flax.main?)')
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_history(workdir: Workdir, history: Sequence[Mapping[str, Any]]) -> None:
  """Rewrites the history (atomically) with `history`, one JSON line per epoch."""
  path = history_path(workdir)
  tmp = path.with_suffix('.tmp')
  tmp.write_text(''.join(json.dumps(entry) + '\n' for entry in history))
  os.replace(tmp, path)


def append_history(workdir: Workdir, entry: Mapping[str, Any]) -> None:
  """Adds a finished epoch's entry."""
  with history_path(workdir).open('a') as history_file:
    history_file.write(json.dumps(entry) + '\n')


# ---------------------------------------------------------------------------
# classes.json

def read_classes(workdir: Workdir) -> dict[str, Any] | None:
  """The workdir's class mapping ({'wnids', 'class_names'}), or None if it has none."""
  path = classes_path(workdir)
  return json.loads(path.read_text()) if path.exists() else None


def write_classes(workdir: Workdir, mapping: Mapping[str, Any]) -> pathlib.Path:
  """Writes the class mapping `mapping` ({'wnids', 'class_names'}); returns its path.

  A workdir that already maps labels differently is refused: its
  checkpoints and results would name the wrong classes.

  Raises:
    ValueError: the workdir maps labels to other classes.
  """
  path, found = classes_path(workdir), read_classes(workdir)
  if found is not None:
    if found != mapping:
      raise ValueError(f'{path} maps labels to other classes ({len(found["wnids"])} '
                       f'classes, first {found["wnids"][:3]}) than this config '
                       f'({len(mapping["wnids"])}, first {list(mapping["wnids"][:3])}); '
                       'use another workdir')
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(mapping, indent=1))
  return path


def check_classes(workdir: Workdir, wnids: Sequence[str]) -> None:
  """Refuses a workdir whose classes.json names other classes than `wnids`.

  Raises:
    ValueError: they differ (a workdir without classes.json passes).
  """
  saved = read_classes(workdir)
  if saved is not None and saved['wnids'] != list(wnids):
    raise ValueError(f'{classes_path(workdir)} names other classes than the dataset gives '
                     f'for this config: {saved["wnids"][:3]}... vs {list(wnids[:3])}...')


def num_classes(workdir: Workdir) -> int | None:
  """How many classes the workdir's run has (None without classes.json)."""
  saved = read_classes(workdir)
  return None if saved is None else len(saved['wnids'])


# ---------------------------------------------------------------------------
# The checkpoint's meta: the JSON saved beside each checkpoint's arrays. Its
# records below are the only code that names its keys.

def _field(saved: Mapping[str, Any], key: str, kinds: type | tuple[type, ...],
           optional: bool = False, within: str = '') -> Any:
  """saved[key] (None when absent or null and `optional`), checked to be of `kinds`.

  `within` names the field `saved` is ('interrupted'), for the messages.

  Raises:
    ValueError: it is absent (and not `optional`) or of another type.
  """
  name = f'{within}.{key}' if within else key
  if optional and saved.get(key) is None:
    return None
  if key not in saved:
    raise ValueError(f'the meta has no {name!r}')
  value, kinds = saved[key], kinds if isinstance(kinds, tuple) else (kinds,)
  if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
    names = ' or '.join(kind.__name__ for kind in kinds)
    raise ValueError(f"the meta's {name!r} is {type(value).__name__}, not {names}")
  return value


@dataclasses.dataclass(frozen=True)
class StoppedWithin:
  """A run stopped by a signal within an epoch, where it stood.

  Saved in its interrupted checkpoint's meta (`RunMeta.interrupted`) as a
  JSON object of these fields (`to_dict`, `from_dict`); a resumed run takes
  the epoch up at the next step, with the same rate and running metrics.
  """
  global_step: int  # the optimizer step: the checkpoint's index
  epoch: int = 0  # the epoch under way
  steps_done: int = 0  # its steps done
  learning_rate: float = 0.0  # its learning rate
  # Its running metrics, exactly (train._metrics_to_json); None before a step.
  train_metrics: list[float] | None = None
  # The epoch's time, and time waiting for input, before the stop (every
  # stopped part of it); 0 in checkpoints written before they were recorded.
  seconds: float = 0.0
  wait_seconds: float = 0.0

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, saved: Mapping[str, Any]) -> StoppedWithin:
    """The record as stored; a field older versions did not write takes its default.

    Raises:
      ValueError: no global step, or a field of another type (a damaged meta).
    """
    if not isinstance(saved, Mapping):
      raise ValueError(f"the meta's 'interrupted' is {type(saved).__name__}, not dict")
    number = (int, float)
    kinds = {'global_step': int, 'epoch': int, 'steps_done': int, 'learning_rate': number,
             'train_metrics': (list, type(None)), 'seconds': number, 'wait_seconds': number}
    return cls(**{field.name: _field(saved, field.name, kinds[field.name],
                                     within='interrupted')
                  for field in dataclasses.fields(cls)
                  if field.name in saved or field.name == 'global_step'})


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunMeta:
  """Where a run stood at a checkpoint: the meta saved beside its arrays.

  Stored as a JSON object whose keys are these fields, in this order, each
  optional one only when set (`to_dict`, `from_dict`: the only writer and
  reader of the stored form). Checkpoints written before the settings were
  recorded have none; every other field they have.
  """
  epoch: int  # the last finished epoch (0: untrained)
  config: dict[str, Any]  # the run's config, as `checkpoints.config_to_dict` gives it
  settings: dict[str, Any] | None = None  # `settings.Settings.to_dict`
  # history.jsonl's entries up to `epoch` (the list a running run grows).
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  best_val_top1_accuracy: float = -1.0  # -1.0 before any epoch
  interrupted: StoppedWithin | None = None  # a run stopped within epoch `epoch + 1`
  keras_import: dict[str, Any] | None = None  # a run made from a Keras file: its record

  @property
  def global_step(self) -> int:
    """The optimizer step the checkpoint holds."""
    if self.interrupted is not None:
      return self.interrupted.global_step
    return self.history[-1]['step'] if self.history else 0

  def to_dict(self) -> dict[str, Any]:
    """The stored form, a copy: what the meta holds now, JSON's types only."""
    stored = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value is not None:
        stored[field.name] = value.to_dict() if field.name == 'interrupted' else value
    return json.loads(json.dumps(stored))

  @classmethod
  def from_dict(cls, saved: Mapping[str, Any]) -> RunMeta:
    """The record of a stored meta, of this version or an older one.

    Raises:
      ValueError: a field missing or of another type (a damaged meta).
    """
    if not isinstance(saved, Mapping):
      raise ValueError(f'the meta is {type(saved).__name__}, not a JSON object')
    interrupted = _field(saved, 'interrupted', dict, optional=True)
    return cls(
        epoch=_field(saved, 'epoch', int), config=_field(saved, 'config', dict),
        settings=_field(saved, 'settings', dict, optional=True),
        history=_field(saved, 'history', list),
        best_val_top1_accuracy=_field(saved, 'best_val_top1_accuracy', (int, float)),
        interrupted=None if interrupted is None else StoppedWithin.from_dict(interrupted),
        keras_import=_field(saved, 'keras_import', dict, optional=True))
