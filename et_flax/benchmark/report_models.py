"""Every model the report trains, timed like for like against Keras.

  python -m et_flax.benchmark report_models [--steps=5] [--rounds=3] [--load=busy:1]
      [--write_docs]

Runs the `steps` benchmark (no input pipeline) for plain E.T., wide E.T.
(k=2 and k=4), E.T. with batch norm, VGG16 and ResNet50 at 64x64, and
prints one Markdown table: our step and Keras's without augmentation (each
with the config's optimizer), and with the config's augmentation (ours on the
device, Keras fed by ImageDataGenerator; 'five' for configs without one),
each the median of --rounds rounds of --steps steps in which ours and
Keras's take turns (`steps.interleaved_seconds`). With --load, something
else uses the cores all the while (`load.py`). `--write_docs` also puts the
table in docs/performance.md, between its REPORT_MODELS markers (for a
load, its own: REPORT_MODELS busy:1 start ...).
"""

from __future__ import annotations

import os
import pathlib
import platform
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
from absl import flags

from et_flax import config_files
from et_flax.benchmark import load
from et_flax.benchmark import steps

FLAGS = flags.FLAGS
DOCS = pathlib.Path(__file__).resolve().parents[2] / 'docs' / 'performance.md'


def markers(load_name: str = 'none') -> tuple[str, str]:
  """The comments docs/performance.md holds a table between, one pair per load."""
  name = 'REPORT_MODELS' if load_name == 'none' else f'REPORT_MODELS {load_name}'
  return f'<!-- {name} start -->', f'<!-- {name} end -->'


def _config(name: str, **model_fields) -> Callable[[], Any]:
  def make():
    config = config_files.load(name)
    config.model.update(model_fields)
    return config
  return make


# (row name, config maker, batch size): batches as the comparisons so far ran them.
MODELS: tuple[tuple[str, Callable[[], Any], int], ...] = (
    ('plain E.T. (`default`)', _config('default'), 128),
    ('wide E.T., k=2 (`wide_200`)', _config('wide_200'), 128),
    ('wide E.T., k=4 (`wide4_heavy_200`)', _config('wide4_heavy_200'), 128),
    ('E.T. with batch norm (`default`, batch_norm)', _config('default', batch_norm=True), 128),
    ('VGG16 (`vgg16_20`)', _config('vgg16_20'), 32),
    ('ResNet50 (`resnet50_20`)', _config('resnet50_20'), 32),
)


def measure(models: Sequence[tuple[str, Callable[[], Any], int]] = MODELS,
            image_size: int = 64, steps_count: int = 5, warmup: int = 1,
            rounds: int = 3) -> list[dict[str, Any]]:
  """One `steps.run` per model (augmentation 'five' where the config has none)."""
  rows = []
  for name, make, batch_size in models:
    config = make()
    if config.augment.preset == 'none':
      config.augment.preset = 'five'
    results = steps.run(config, batch_size, image_size, steps_count, warmup, keras=True,
                        pipeline_images=0, rounds=rounds)
    rows.append({'name': name, **results})
  return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  lines = ['| model | batch | optimizer | et_flax (img/s) | Keras (img/s) | ratio | '
           'et_flax, augmented | Keras + ImageDataGenerator | ratio |',
           '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f'| {r["name"]} | {r["batch_size"]} | {r["keras_optimizer"]} | '
        f'{r["train_images_per_second"]:.1f} | {r["keras_train_images_per_second"]:.1f} | '
        f'{r["ours_over_keras"]:.2f}x | {r["train_augmented_images_per_second"]:.1f} | '
        f'{r["keras_train_augmented_images_per_second"]:.1f} | '
        f'{r["augmented_ours_over_keras"]:.2f}x |')
  return '\n'.join(lines)


def write_docs(table: str, note: str, path: pathlib.Path = DOCS,
               load_name: str = 'none') -> None:
  """Replaces the text between the REPORT_MODELS markers of `path` (`markers`)."""
  start, end = markers(load_name)
  text = path.read_text()
  if start not in text or end not in text:
    raise ValueError(f'{path} has no {start} ... {end} markers to write the table between')
  head, rest = text.split(start, 1)
  _, tail = rest.split(end, 1)
  path.write_text(f'{head}{start}\n{note}\n\n{table}\n{end}{tail}')


def machine() -> str:
  """The accelerator, or on CPUs the processor's model name: speeds differ by CPU."""
  device = jax.devices()[0]
  if device.platform != 'cpu':
    return f'{device.device_kind} x{jax.device_count()}'
  cpuinfo = pathlib.Path('/proc/cpuinfo')
  names = re.findall(r'^model name\s*:\s*(.+)$', cpuinfo.read_text(), re.M) if (
      cpuinfo.exists()) else []
  return (f'{names[0].strip()}, {len(names)} cores (CPU)' if names
          else f'{platform.processor() or "an unnamed"} CPU, {os.cpu_count()} cores')


def define_flags() -> None:
  flags.DEFINE_integer('steps', 5, 'Timed steps per model (the median is reported).')
  flags.DEFINE_integer('warmup', 1, 'Untimed steps after compiling.')
  flags.DEFINE_integer('rounds', 3, 'Interleaved rounds of --steps steps, ours and Keras\'s '
                       'in turn, that the medians are taken over.', lower_bound=1)
  flags.DEFINE_bool('write_docs', False, 'Also write the table into docs/performance.md.')
  load.define_flag()


def main(argv):
  del argv
  load.parse(FLAGS.load)  # a bad value before any work
  with load.running(FLAGS.load, FLAGS.deterministic):
    rows = measure(steps_count=FLAGS.steps, warmup=FLAGS.warmup, rounds=FLAGS.rounds)
  table = markdown_table(rows)
  print(table)
  if FLAGS.write_docs:
    loaded = ('' if FLAGS.load == 'none' else f' --load={FLAGS.load}') + (
        '' if FLAGS.deterministic == 'auto' else f' --deterministic={FLAGS.deterministic}')
    write_docs(table, f'`python -m et_flax.benchmark report_models --steps={FLAGS.steps} '
               f'--warmup={FLAGS.warmup} --rounds={FLAGS.rounds}{loaded} --write_docs`, one '
               f"run, on {machine()}, {load.describe(FLAGS.load)}; 64x64, 'auto' settings; "
               f'each figure the median of {FLAGS.rounds} x {FLAGS.steps} steps, ours and '
               "Keras's taking turns.", load_name=FLAGS.load)
