"""E.T. with a stride-2 max-pool after the stem, 5 classes.

Report (4.3, Fig. 12): validation accuracy 0.38 (plain_5: 0.66).

  python -m et_flax.main --config=configs/stride2_5.py --workdir=runs/stride2_5 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.classes = 5
  config.model.stem_pool = True
  config.num_epochs = 100
  return config
