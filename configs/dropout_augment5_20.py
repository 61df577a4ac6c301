"""E.T. with dropout 0.5 and the 5 augmentations, 20 classes.

Report (4.2, Fig. 7; table 5.1): validation top-1 0.525, top-5 0.838. The
confusion matrix of the report (Fig. 15) comes from this model.

  python -m et_flax.main --config=configs/dropout_augment5_20.py \
      --workdir=runs/dropout_augment5_20 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.classes = 20
  config.model.dropout_rate = 0.5
  config.augment.preset = 'five'
  config.num_epochs = 500
  return config
