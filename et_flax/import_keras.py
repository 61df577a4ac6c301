"""Makes a run workdir from an E.T. trained in Keras: evaluate, predict, compare.

  python -m et_flax.import_keras model.keras --workdir=runs/from_keras \
      [--config=configs/dropout_200.py] [--structure=model.json]

The Keras file (`.keras`, a whole model saved as `.h5`, or weights alone:
`.weights.h5`, legacy `.h5`) is read by structure
(`et_flax.keras.structure.import_keras_et`): its layer names do not matter, and the
model's fields come from the file where it holds them. The rest (the fields
a weights file cannot hold, the data, the loss, the input scaling) comes from
--config (configs/default.py when not given), whose `data` must give the
classes the model was trained on, in the order Keras's flow_from_directory
gave them (sorted wnids). The workdir gets what a trained run has: the
checkpoint (epoch 0, in checkpoints/ and checkpoints_best/; its meta holds
the config and the settings resolved here, as a trained run's), classes.json,
an empty history.jsonl (no epoch was trained here), and keras_import.json
saying what was read from where.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pathlib
from typing import Any

import ml_collections
from absl import app
from absl import flags

from et_flax import checkpoints
from et_flax import config_files
from et_flax import console
from et_flax import models
from et_flax import run_files
from et_flax import settings as settings_lib
from et_flax import workdir_lock
from et_flax.data import input_pipeline
from et_flax.keras import structure as keras_structure

DEFAULT_CONFIG = config_files.path('default')
RECORD_FILE = 'keras_import.json'


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with path.open('rb') as file:
    for chunk in iter(lambda: file.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def import_to_workdir(keras_path: str | pathlib.Path, workdir: str | pathlib.Path,
                      config: ml_collections.ConfigDict,
                      structure: str | pathlib.Path | None = None) -> dict[str, Any]:
  """Writes a workdir holding the Keras file's E.T.; returns keras_import.json's record.

  Raises:
    ValueError: the file is not an E.T. (naming its first misfit layer), its
      classes or input size differ from what `config.data` gives, the config's
      model is not E.T., or the workdir holds checkpoints already.
  """
  keras_path, workdir = pathlib.Path(keras_path).expanduser(), pathlib.Path(workdir)
  for folder in (checkpoints.LATEST, checkpoints.BEST):
    if (workdir / folder).exists():
      raise ValueError(f'{workdir} holds checkpoints already ({workdir / folder}); import '
                       'into a new --workdir')
  if config.model.get('name') != 'et':
    raise ValueError(f"import_keras reads E.T.; the config's model is "
                     f"{config.model.get('name')!r} (VGG16 and ResNet50 Keras weights go "
                     'in through config.pretrained_weights)')
  imported = keras_structure.import_keras_et(keras_path, config.model, structure=structure)
  config = copy.deepcopy(config)
  changed = {}
  with config.unlocked():
    for field, value in imported.model_config.items():
      old = config.model.get(field)
      if (list(old) if isinstance(old, tuple) else old) != (
          list(value) if isinstance(value, tuple) else value):
        changed[field] = (old, value)
      config.model[field] = value
  info = input_pipeline.get_dataset_info(config.data)
  if info.num_classes != imported.num_classes:
    raise ValueError(
        f"{keras_path}: its last Dense has {imported.num_classes} units, but the config's "
        f'data gives {info.num_classes} classes (data.classes={config.data.classes!r}): set '
        '--config.data.classes to the classes the model was trained on (a count, or their '
        'wnids; labels follow the sorted wnids, as flow_from_directory ordered them)')
  if imported.image_size is not None and imported.image_size != info.image_size:
    raise ValueError(f'{keras_path} takes {imported.image_size}x{imported.image_size} '
                     f'images, but config.data.image_size is {info.image_size}: set '
                     f'--config.data.image_size={imported.image_size}')
  models.create_model(config.model, info.num_classes, info.image_size)  # checks the size
  settings = settings_lib.resolve(config)

  record = {
      'keras_file': str(keras_path.resolve()), 'sha256': _sha256(keras_path),
      'structure': None if structure is None else str(pathlib.Path(structure).resolve()),
      'layer_order': imported.order, 'keras_outputs': imported.outputs,
      'num_classes': imported.num_classes, 'image_size': imported.image_size,
      'model_fields_from_file': list(imported.from_file),
      'model_fields_from_config': {field: {'value': config.model[field], 'why': why}
                                   for field, why in imported.not_in_file.items()},
      'config_fields_replaced': {f'model.{field}': {'config': old, 'file': new}
                                 for field, (old, new) in changed.items()},
      'preprocessing': settings.preprocessing,
      'layers': imported.layers,
  }
  with workdir_lock.RunLock(workdir):
    run_files.write_classes(workdir, info.class_mapping())
    run_checkpoints = checkpoints.RunCheckpoints(workdir, config.max_to_keep)
    # An untrained run's meta (epoch 0, no history), and where its weights came from.
    meta = checkpoints.run_meta(config, checkpoints.RunProgress(), settings.to_dict(),
                                keras_import=record)
    run_checkpoints.save(0, imported.variables, meta, best=True)
    run_checkpoints.close()
    run_files.write_history(workdir, [])
    (workdir / RECORD_FILE).write_text(json.dumps(record, indent=1))
  _report(keras_path, workdir, imported, config, changed)
  return record


def _report(keras_path: pathlib.Path, workdir: pathlib.Path,
            imported: keras_structure.KerasET, config: ml_collections.ConfigDict,
            changed: dict[str, tuple[Any, Any]]) -> None:
  fields = imported.model_config
  console.info('Read %s: E.T. with width %d, %d modules, kernel sizes %s, %d hidden units, '
               '%s, dropout %s, %d classes%s%s (layers taken in %s)', keras_path, fields['width'],
               fields['num_modules'], tuple(fields['kernel_sizes']), fields['hidden_units'],
               fields['activation'], fields['dropout_rate'], imported.num_classes,
               ', batch norm' if fields['batch_norm'] else '',
               ', stem pool' if fields['stem_pool'] else '', imported.order)
  for field, (old, new) in changed.items():
    console.info('  model.%s: %r from the file (the config had %r)', field, new, old)
  for field, why in imported.not_in_file.items():
    console.info('  model.%s: %r from the config (not in the file: %s)', field,
                 config.model[field], why)
  if imported.outputs == 'probabilities':
    console.info('  The Keras model ends in a softmax; E.T. here gives the logits under it '
                 '(the same top-1 and top-5)')
  console.info("  Inputs scaled as config.preprocessing=%r says (a Keras file does not "
               "record it; 'rescale' is pixels / 255, as the report's "
               'ImageDataGenerator(rescale=1./255))', config.get('preprocessing', 'rescale'))
  console.info('Wrote %s: checkpoint (epoch 0), classes.json, %s. Evaluate it with: '
               'python -m et_flax.evaluate --workdir=%s', workdir, RECORD_FILE, workdir)


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('Name one Keras file: python -m et_flax.import_keras model.keras '
                         '--workdir=runs/from_keras')
  import_to_workdir(argv[1], FLAGS.workdir, FLAGS.config, FLAGS.structure)


if __name__ == '__main__':
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string('workdir', None, 'The workdir to create (it must hold no checkpoints).')
  config_files.importable()  # the config's `from configs import ...`, from any directory
  config_flags.DEFINE_config_file(
      'config', str(DEFAULT_CONFIG), 'A config file with get_config(): its data, loss and '
      "preprocessing, and the model fields the Keras file cannot hold (default: et_flax's "
      'configs/default.py).', lock_config=True)
  flags.DEFINE_string('structure', None, 'For weights alone: the model structure, a .keras '
                      'file or the JSON of model.to_json().')
  flags.mark_flag_as_required('workdir')
  console.run(main)
