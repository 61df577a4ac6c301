"""ResNet50 retrained from scratch, 20 classes: SGD 1e-4, no momentum, decay 1e-6.

With the 5 augmentations. Report (5.1 table): validation top-1 0.562,
top-5 0.873.

  python -m et_flax.main --config=configs/resnet50_20.py --workdir=runs/resnet50_20 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import resnet50_200


def get_config() -> ml_collections.ConfigDict:
  config = resnet50_200.get_config()
  config.data.classes = 20
  return config
