"""A run workdir's own files: their names, reading and writing.

Beside its checkpoints (checkpoints.py, with the meta each one holds,
`checkpoint_meta` here) a workdir holds:

  history.jsonl  one JSON line per finished epoch: its metrics, rate and timing
  classes.json   the class of each label: {'wnids': [...], 'class_names': [...]}

Every other module reads and writes them through this one.
"""

from __future__ import annotations

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
# The checkpoint's meta: the JSON saved beside each checkpoint's arrays.

def checkpoint_meta(config: Mapping[str, Any], epoch: int, settings: Mapping[str, Any],
                    history: Sequence[Mapping[str, Any]], best_top1: float,
                    **more: Any) -> dict[str, Any]:
  """The meta of a checkpoint of epoch `epoch` (0: untrained).

  Keys: 'epoch', 'config' (`checkpoints.config_to_dict`), 'settings'
  (`settings.Settings.to_dict`), 'history' (history.jsonl's entries up to
  `epoch`), 'best_val_top1_accuracy', and `more` ('interrupted' for a run
  stopped within an epoch, `checkpoints.StoppedWithin`; 'keras_import' for
  one made from a Keras file).
  """
  return {'epoch': epoch, 'config': dict(config), 'settings': dict(settings),
          'history': history, 'best_val_top1_accuracy': best_top1, **more}
