"""The checkpoint meta's record (`run_files.RunMeta`) and its stored form.

The stored form is the JSON object earlier versions wrote and read: a
workdir they left resumes and evaluates, and theirs reads ours. A meta
without one of its fields is a damaged checkpoint, named as such.
"""

import contextlib
import json
import logging
import pathlib
import shutil

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import tiny_config
from et_flax import checkpoints
from et_flax import console
from et_flax import evaluate
from et_flax import run_files
from et_flax import train

RunMeta = run_files.RunMeta

SETTINGS = {'backend': 'cpu', 'conv_impl': 'xla', 'compute_dtype': 'float32',
            'micro_batch_size': 0, 'micro_batches': 1, 'device_resident': False,
            'preprocessing': 'rescale', 'deterministic': True, 'onednn_threads': 2}
HISTORY = [{'epoch': 1, 'step': 21, 'train_loss': 2.25, 'val_top1_accuracy': 0.25,
            'learning_rate': 0.001},
           {'epoch': 2, 'step': 42, 'train_loss': 1.5, 'val_top1_accuracy': 0.5,
            'learning_rate': 0.0005}]
STOPPED = {'global_step': 130, 'epoch': 3, 'steps_done': 46, 'learning_rate': 0.001,
           'train_metrics': [2.5, 46.0, 0.25, 46.0, 0.5, 46.0], 'seconds': 12.5,
           'wait_seconds': 0.75}
# The meta as this version and the versions before it store it, key for key
# and in this order.
EPOCH = {'epoch': 2, 'config': {'batch_size': 64, 'model': {'name': 'et', 'width': 1}},
         'settings': SETTINGS, 'history': HISTORY, 'best_val_top1_accuracy': 0.5}
INTERRUPTED = {**EPOCH, 'interrupted': STOPPED}
KERAS_IMPORT = {'epoch': 0, 'config': EPOCH['config'], 'settings': SETTINGS, 'history': [],
                'best_val_top1_accuracy': -1.0,
                'keras_import': {'keras_file': '/models/et.h5', 'num_classes': 10}}
# Written before the settings were recorded (2026-12-03), and before a
# stopped epoch's time was.
OLDER = {k: v for k, v in EPOCH.items() if k != 'settings'}
OLDER_STOPPED = {k: v for k, v in STOPPED.items() if k not in ('seconds', 'wait_seconds')}
OLDER_INTERRUPTED = {**OLDER, 'interrupted': OLDER_STOPPED}


@pytest.mark.parametrize('stored', [EPOCH, INTERRUPTED, KERAS_IMPORT, OLDER],
                         ids=['epoch', 'interrupted', 'keras_import', 'older'])
def test_a_stored_meta_round_trips_byte_for_byte(stored):
  assert json.dumps(RunMeta.from_dict(stored).to_dict()) == json.dumps(stored)


def test_the_record_reads_the_stored_fields():
  meta = RunMeta.from_dict(INTERRUPTED)
  assert (meta.epoch, meta.best_val_top1_accuracy) == (2, 0.5)
  assert meta.config == EPOCH['config'] and meta.settings == SETTINGS
  assert meta.history == HISTORY and meta.keras_import is None
  assert meta.interrupted == run_files.StoppedWithin(**STOPPED)
  assert meta.global_step == 130  # the interrupted checkpoint's index
  assert RunMeta.from_dict(EPOCH).global_step == 42  # the last epoch's step
  assert RunMeta.from_dict({**EPOCH, 'history': []}).global_step == 0
  assert RunMeta.from_dict(OLDER).settings is None
  assert RunMeta.from_dict(KERAS_IMPORT).keras_import['num_classes'] == 10


def test_a_stopped_run_is_stored_as_before():
  """The StoppedWithin record's stored form; an older one, without the
  epoch's time, counts none."""
  stopped = run_files.StoppedWithin.from_dict(STOPPED)
  assert (stopped.global_step, stopped.epoch, stopped.steps_done) == (130, 3, 46)
  assert list(stopped.to_dict().items()) == list(STOPPED.items())
  older = RunMeta.from_dict(OLDER_INTERRUPTED)
  assert (older.interrupted.seconds, older.interrupted.wait_seconds) == (0.0, 0.0)
  assert older.interrupted.learning_rate == 0.001
  assert older.to_dict() == {**OLDER, 'interrupted': {**OLDER_STOPPED, 'seconds': 0.0,
                                                      'wait_seconds': 0.0}}
  assert RunMeta.from_dict(EPOCH).interrupted is None


def test_run_meta_writes_the_stored_form():
  config = ml_collections.ConfigDict(EPOCH['config'])
  progress = checkpoints.RunProgress(history=HISTORY, best_top1=0.5, epoch=2)
  meta = checkpoints.run_meta(config, progress, SETTINGS,
                              run_files.StoppedWithin(**STOPPED))
  assert json.dumps(meta.to_dict()) == json.dumps(INTERRUPTED)
  meta = checkpoints.run_meta(config, checkpoints.RunProgress(), SETTINGS,
                              keras_import=KERAS_IMPORT['keras_import'])
  assert json.dumps(meta.to_dict()) == json.dumps(KERAS_IMPORT)


def test_to_dict_is_a_copy():
  """A running run's history grows after a save starts: the meta saved is
  the one of the save."""
  history = [dict(HISTORY[0])]
  stored = RunMeta(epoch=1, config={}, history=history).to_dict()
  history.append(HISTORY[1])
  assert stored['history'] == [HISTORY[0]]


def _without(key):
  return {k: v for k, v in EPOCH.items() if k != key}


@pytest.mark.parametrize('stored,message', [
    (_without('epoch'), "the meta has no 'epoch'"),
    (_without('config'), "the meta has no 'config'"),
    (_without('history'), "the meta has no 'history'"),
    (_without('best_val_top1_accuracy'), "the meta has no 'best_val_top1_accuracy'"),
    ({**EPOCH, 'epoch': '2'}, "the meta's 'epoch' is str, not int"),
    ({**EPOCH, 'epoch': True}, "the meta's 'epoch' is bool, not int"),
    ({**EPOCH, 'history': {}}, "the meta's 'history' is dict, not list"),
    ({**EPOCH, 'settings': []}, "the meta's 'settings' is list, not dict"),
    ({**EPOCH, 'best_val_top1_accuracy': None},
     "the meta's 'best_val_top1_accuracy' is NoneType, not int or float"),
    ({**EPOCH, 'interrupted': 130}, "the meta's 'interrupted' is int, not dict"),
    ({**EPOCH, 'interrupted': {'epoch': 3}}, "the meta has no 'interrupted.global_step'"),
    ({**EPOCH, 'interrupted': {**STOPPED, 'steps_done': 4.5}},
     "the meta's 'interrupted.steps_done' is float, not int"),
    ([EPOCH], 'the meta is list, not a JSON object'),
])
def test_a_damaged_meta_says_which_field(stored, message):
  with pytest.raises(ValueError) as error:
    RunMeta.from_dict(stored)
  assert str(error.value) == message


# ---------------------------------------------------------------------------
# Checkpoints whose meta was written as a JSON object, as earlier versions did.

def _write(folder, step, stored):
  """A checkpoint of `step` in `folder` whose meta is the JSON object `stored`."""
  manager = ocp.CheckpointManager(folder.absolute(), item_handlers=checkpoints._item_handlers())
  with contextlib.closing(manager):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({'params': {'w': np.full(3, step, np.float32)}}),
        meta=ocp.args.JsonSave(stored)))
    manager.wait_until_finished()


def _stored(folder, step):
  return json.loads((folder / str(step) / 'meta' / 'metadata').read_text())


@pytest.mark.parametrize('epoch_meta', [EPOCH, OLDER], ids=['today', 'older'])
def test_a_checkpoint_written_before_resumes_and_reads(tmp_path, epoch_meta):
  _write(tmp_path / checkpoints.LATEST, 2, epoch_meta)
  assert checkpoints.find_resume_point(tmp_path) == RunMeta.from_dict(epoch_meta)
  read = checkpoints.read_checkpoint(tmp_path, 'latest')
  assert read.meta.epoch == 2 and read.meta.history == HISTORY
  np.testing.assert_array_equal(read.variables['params']['w'], np.full(3, 2.0))
  # A run stopped within its third epoch, further on: resumed from there.
  stopped = {**epoch_meta, 'interrupted': STOPPED if epoch_meta is EPOCH else OLDER_STOPPED}
  _write(tmp_path / checkpoints.INTERRUPTED, 130, stopped)
  assert checkpoints.latest_meta(tmp_path).interrupted.steps_done == 46
  resumed = checkpoints.find_resume_point(tmp_path)
  assert resumed.interrupted.global_step == 130 and resumed.epoch == 2


def test_a_meta_without_a_field_is_a_damaged_checkpoint(tmp_path, caplog):
  """Passed over for the newest intact one, and moved aside, like a
  truncated one; with none intact, one error saying what is missing."""
  latest = tmp_path / checkpoints.LATEST
  _write(latest, 1, {**EPOCH, 'epoch': 1, 'history': HISTORY[:1]})
  _write(latest, 2, _without('history'))
  with caplog.at_level(logging.INFO):
    meta = checkpoints.find_resume_point(tmp_path)
  assert meta.epoch == 1
  warnings = [r.getMessage() for r in caplog.records
              if r.name == console.CONSOLE_LOGGER and r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert warnings[0].startswith(f"{latest / '2'} is damaged (the meta has no 'history'): "
                                f'moved to {tmp_path / checkpoints.DAMAGED / latest.name}')
  assert (tmp_path / checkpoints.DAMAGED / checkpoints.LATEST / '2').is_dir()

  only = tmp_path / 'only'
  _write(only / checkpoints.LATEST, 3, {**EPOCH, 'epoch': '3'})
  with pytest.raises(checkpoints.DamagedCheckpointError,
                     match=r"no intact checkpoint to resume .*: .*/3 is damaged \(the "
                           r"meta's 'epoch' is str, not int\)"):
    checkpoints.find_resume_point(only)
  with pytest.raises(checkpoints.DamagedCheckpointError,
                     match=r"no intact latest checkpoint .* is damaged \(the meta's"):
    checkpoints.read_checkpoint(only, 'latest')


def test_a_trained_workdir_of_the_older_form_evaluates_and_resumes(
    one_epoch_run, digits_data_dir, tmp_path):
  """A run's checkpoints store today's form; rewritten to the form before
  the settings were recorded, the workdir evaluates and trains on."""
  run = pathlib.Path(shutil.copytree(one_epoch_run, tmp_path / 'run'))
  folders = [run / checkpoints.LATEST, run / checkpoints.BEST]
  for folder in folders:
    stored = _stored(folder, 1)
    assert list(stored) == ['epoch', 'config', 'settings', 'history',
                            'best_val_top1_accuracy']
    assert json.dumps(RunMeta.from_dict(stored).to_dict()) == json.dumps(stored)
    older = {k: v for k, v in stored.items() if k != 'settings'}
    (folder / '1' / 'meta' / 'metadata').write_text(json.dumps(older))
  assert evaluate.load_run(run, 'best').epoch == 1
  summary = train.train_and_evaluate(tiny_config(digits_data_dir, num_epochs=2), str(run))
  assert summary['epoch'] == 2
  resumed = _stored(run / checkpoints.LATEST, 2)
  assert list(resumed) == ['epoch', 'config', 'settings', 'history',
                           'best_val_top1_accuracy']
  assert [entry['epoch'] for entry in resumed['history']] == [1, 2]
