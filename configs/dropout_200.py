"""The report's Kaggle model: E.T. with dropout 0.5, 200 classes, no augmentation.

Report (4.2, Fig. 9; table 5.1): best validation top-1 0.3470, top-5 0.5509
after 172 epochs; it was warm-started from the dropout + 5-augmentation run:
to do the same, train configs/dropout_augment5_200.py first and pass
--config.init_from=<its workdir>.

  python -m et_flax.main --config=configs/dropout_200.py --workdir=runs/dropout_200 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.dropout_rate = 0.5
  config.num_epochs = 172
  return config
