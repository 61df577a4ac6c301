"""Wide E.T. (k=2, 32 filters), 5 classes, no dropout or augmentation.

Report (4.3, Fig. 10): validation accuracy 0.70 at ~20 epochs (plain_5: 0.66).

  python -m et_flax.main --config=configs/wide_5.py --workdir=runs/wide_5 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.classes = 5
  config.model.width = 2
  config.num_epochs = 100
  return config
