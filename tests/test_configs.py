"""Every experiment config builds and matches the README's table; dropout_200 trains and resumes."""

import importlib
import os
import re
import pathlib
import subprocess
import sys

import pytest

from helpers import make_tiny_imagenet_tree
from et_flax import augment
from et_flax import models
from et_flax import optim

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.stem for p in (REPO / 'configs').glob('*.py')
                 if p.stem not in ('__init__',))
REPORT_EXPERIMENTS = [
    'plain_2', 'optimizer_adam_10', 'optimizer_sgd_10', 'optimizer_rmsprop_10', 'plain_5',
    'dropout_5', 'augment8_5', 'dropout_augment5_20', 'dropout_augment5_200',
    'dropout_200', 'wide_5', 'wide_200', 'deep_5', 'stride2_5', 'hinge_5', 'tanh_5',
    'vgg16_20', 'vgg16_200', 'resnet50_20', 'resnet50_200', 'inblock_dropout_200',
    'wide4_heavy_200', 'kernels135_5', 'tanh_200']


def test_every_report_experiment_has_a_config():
  assert set(REPORT_EXPERIMENTS) <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  classes = config.data.classes or 200
  if name.endswith(tuple(f'_{n}' for n in (2, 5, 10, 20, 200))):
    assert classes == int(name.rsplit('_', 1)[1]), name
  model = models.create_model(config.model, classes, config.data.image_size)
  optim.create_optimizer(config.optimizer, steps_per_epoch=10,
                         num_epochs=config.num_epochs)
  optim.get_loss(config.loss)
  augment.config_from(config.augment)
  assert model.num_classes == classes
  module = importlib.import_module(f'configs.{name}')
  # Each docstring says what the report got (or that it proposed it) and how to run it.
  assert 'report' in module.__doc__.lower() or name == 'quickstart'
  assert f'configs/{name}.py' in module.__doc__


def test_dropout_200_trains_and_resumes_on_a_tiny_imagenet_tree(tmp_path):
  root = make_tiny_imagenet_tree(tmp_path / 'tiny-imagenet-200', train_per_class=8)
  workdir = tmp_path / 'run'

  def run(num_epochs):
    return subprocess.run(
        [sys.executable, '-m', 'et_flax.main', '--config=configs/dropout_200.py',
         f'--workdir={workdir}', f'--config.data.data_dir={root}',
         f'--config.data.tfds_dir={tmp_path / "tfds"}', '--config.data.image_size=16',
         '--config.batch_size=8', '--config.eval_batch_size=4',
         f'--config.num_epochs={num_epochs}'],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})

  first = run(2)
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'epoch 2/2: train loss' in first.stderr
  second = run(3)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'Resuming' in second.stderr and 'epoch 3/3' in second.stderr
  assert 'epoch 1/3' not in second.stderr
  assert len((workdir / 'history.jsonl').read_text().splitlines()) == 3


def _readme_table():
  """{config name: (experiment text, report text)} from the README's config table."""
  lines = (REPO / 'README.md').read_text().split('| config | experiment |', 1)[1]
  rows = {}
  for line in lines.splitlines()[2:]:
    if not line.startswith('|'):
      break
    names, experiment, report = (cell.strip() for cell in line.strip('|').split('|'))
    for name in names.split(','):
      rows[name.strip().strip('`')] = (experiment, report)
  return rows


def test_the_readme_table_lists_every_config_once_and_says_what_it_sets():
  from et_flax import compare

  table = _readme_table()
  assert sorted(table) == CONFIGS
  problems = []

  def check(holds, name):
    if not holds:
      problems.append(f'{name}: {table[name][0]}')

  for name, (experiment, report) in table.items():
    config = importlib.import_module(f'configs.{name}').get_config()
    says = experiment.lower()
    model = config.model
    check(('vgg16' in says) == (model.name == 'vgg16'), name)
    check(('resnet50' in says) == (model.name == 'resnet50'), name)
    check(('dropout' in says) == (model.get('dropout_rate', 0) > 0
                                  or model.get('block_dropout_rate', 0) > 0), name)
    check(('tanh' in says) == (model.get('activation') == 'tanh'), name)
    check(('hinge' in says) == (config.loss == 'categorical_hinge'), name)
    check(('8 modules' in says) == (model.get('num_modules') == 8), name)
    check(('stride-2' in says) == model.get('stem_pool', False), name)
    check(('k=2' in says) == (model.get('width') == 2), name)
    check(('k=4' in says) == (model.get('width') == 4), name)
    check(('heavy' in says) == (config.augment.preset == 'heavy'), name)
    check(('5 augmentations' in says) == (config.augment.preset == 'five'), name)
    check(('the 8 augmentations' in says) == (config.augment.preset == 'eight'), name)
    for optimizer in ('adam', 'sgd', 'rmsprop'):
      if optimizer in says:
        check(config.optimizer.name == optimizer, name)
    for epochs in re.findall(r'(\d+) epochs', says):
      if 'at ' not in says.split(epochs)[0][-4:]:  # "at 50 epochs" is a result
        check(config.num_epochs == int(epochs), name)
    classes = re.search(r'(\d+) classes', says)
    if classes:
      check((config.data.classes or 200) == int(classes.group(1)), name)
    # The report's numbers are compare.py's, for the rows it compares.
    if model.name != 'et' or name in ('dropout_augment5_20', 'dropout_200'):
      pretrained = 'pretrained' in name
      classes = config.data.classes or 200
      model_top1, model_top5 = compare.REPORT_RESULTS[(model.name, classes, pretrained)][1:]
      pairs = [tuple(map(float, p.split(' / '))) for p in report.split(', ')]
      assert (model_top1, model_top5) in pairs, (name, report)
  assert not problems, '\n'.join(problems)
