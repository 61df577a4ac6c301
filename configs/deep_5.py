"""Deep E.T. (8 modules, 49 convs), 5 classes, no dropout or augmentation.

Report (4.3, Fig. 11): validation accuracy ~0.68 at epoch 23.

  python -m et_flax.main --config=configs/deep_5.py --workdir=runs/deep_5 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.classes = 5
  config.model.num_modules = 8
  config.num_epochs = 100
  return config
