"""Plain E.T. on 5 classes: the baseline of the dropout experiment.

Report (4.2, Fig. 4): overfits after ~15 epochs; validation accuracy 0.66.

  python -m et_flax.main --config=configs/plain_5.py --workdir=runs/plain_5 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.classes = 5
  config.num_epochs = 100
  return config
