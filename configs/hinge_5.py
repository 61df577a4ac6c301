"""Plain E.T. trained with Keras's categorical hinge loss, 5 classes.

Report (4.4, Fig. 13): validation accuracy 0.60 (with cross-entropy, plain_5: 0.66).

  python -m et_flax.main --config=configs/hinge_5.py --workdir=runs/hinge_5 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.classes = 5
  config.loss = 'categorical_hinge'
  config.num_epochs = 100
  return config
