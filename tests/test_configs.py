"""Every experiment config builds; dropout_200 trains and resumes on a tree."""

import importlib
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import make_tiny_imagenet_tree
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
