"""Plain E.T. on 2 classes: the report's first sanity check.

Report (section 4): plain E.T. "successfully overfitted" a 2-class subset
before the other experiments; no accuracy is given.

  python -m et_flax.main --config=configs/plain_2.py --workdir=runs/plain_2 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.classes = 2
  config.num_epochs = 100
  return config
