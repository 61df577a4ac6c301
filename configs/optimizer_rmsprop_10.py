"""Optimizer experiment, RMSprop: 10 classes, RMSprop 1e-3.

Report (4.1): RMSprop "cannot train E.T. properly": training accuracy rose
to 0.49 while validation accuracy stayed at chance for every rate scanned
(0.1 to 1e-6). No plateau halving.

  python -m et_flax.main --config=configs/optimizer_rmsprop_10.py \
      --workdir=runs/optimizer_rmsprop_10 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.classes = 10
  config.optimizer = ml_collections.ConfigDict(dict(
      name='rmsprop', learning_rate=1e-3, rho=0.9, momentum=0.0, epsilon=1e-7,
      schedule='constant', plateau=ml_collections.ConfigDict(dict(enabled=False))))
  config.num_epochs = 300
  return config
