"""Optimizer experiment, SGD: 10 classes, momentum 0.9, Keras decay 1e-6.

Report (4.1): trained slowly; after 800 epochs training accuracy 0.18 and
validation accuracy 0.22. The report scanned rates from 0.1 to 1e-6 without
saying which gave this; 0.01 is our choice. No plateau halving.

  python -m et_flax.main --config=configs/optimizer_sgd_10.py --workdir=runs/optimizer_sgd_10 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.classes = 10
  config.optimizer = ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=0.01, momentum=0.9, nesterov=False,
      schedule='inverse_time', decay=1e-6,
      plateau=ml_collections.ConfigDict(dict(enabled=False))))
  config.num_epochs = 800
  return config
