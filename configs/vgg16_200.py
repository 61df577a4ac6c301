"""VGG16 retrained from scratch, 200 classes: RMSprop 1e-3, 5 augmentations.

Report (5.1 table): validation top-1 0.442, top-5 0.782.

  python -m et_flax.main --config=configs/vgg16_200.py --workdir=runs/vgg16_200 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = ml_collections.ConfigDict(dict(name='vgg16', dropout_rate=0.0))
  config.optimizer = ml_collections.ConfigDict(dict(
      name='rmsprop', learning_rate=1e-3, schedule='constant',
      plateau=ml_collections.ConfigDict(dict(enabled=False))))
  config.augment.preset = 'five'
  config.num_epochs = 100
  return config
