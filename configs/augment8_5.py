"""E.T. with the report's 8 augmentations, 5 classes.

Report (4.2, Fig. 6): validation accuracy 0.70-0.71 (loss 0.68), converging
after ~900 epochs. Augmentation ranges: et_flax.augment's `eight` preset.

  python -m et_flax.main --config=configs/augment8_5.py --workdir=runs/augment8_5 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.classes = 5
  config.augment.preset = 'eight'
  config.num_epochs = 1000
  return config
