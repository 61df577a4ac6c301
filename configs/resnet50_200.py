"""ResNet50 retrained from scratch, 200 classes: SGD 1e-4, no momentum, decay 1e-6.

With the 5 augmentations. Report (5.1 table): validation top-1 0.541,
top-5 0.801.

  python -m et_flax.main --config=configs/resnet50_200.py --workdir=runs/resnet50_200 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = ml_collections.ConfigDict(dict(name='resnet50', dropout_rate=0.0))
  config.optimizer = ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=1e-4, momentum=0.0, schedule='inverse_time', decay=1e-6,
      plateau=ml_collections.ConfigDict(dict(enabled=False))))
  config.augment.preset = 'five'
  config.num_epochs = 100
  return config
