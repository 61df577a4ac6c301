"""VGG16 retrained from scratch, 20 classes: RMSprop 1e-3, 5 augmentations.

Report (5.1 table): validation top-1 0.531, top-5 0.854.

  python -m et_flax.main --config=configs/vgg16_20.py --workdir=runs/vgg16_20 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import vgg16_200


def get_config() -> ml_collections.ConfigDict:
  config = vgg16_200.get_config()
  config.data.classes = 20
  return config
