"""Future work: wide E.T. (k=4, 64 filters) with heavy augmentation, 200 classes.

The report's last proposals (section 7): k=4 and heavier augmentation than
its five; et_flax's `heavy` preset adds a random-resized crop to the eight.
No result in the report.

  python -m et_flax.main --config=configs/wide4_heavy_200.py --workdir=runs/wide4_heavy_200 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.width = 4
  config.model.dropout_rate = 0.5
  config.augment.preset = 'heavy'
  config.num_epochs = 500
  return config
