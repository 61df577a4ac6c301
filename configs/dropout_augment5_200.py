"""E.T. with dropout 0.5 and the 5 augmentations, all 200 classes.

Report (4.2, Fig. 8): validation accuracy ~0.29 before a plateau. The
Kaggle model (dropout_200) was warm-started from this run.

  python -m et_flax.main --config=configs/dropout_augment5_200.py \
      --workdir=runs/dropout_augment5_200 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.dropout_rate = 0.5
  config.augment.preset = 'five'
  config.num_epochs = 300
  return config
