"""Future work: dropout 0.1 between the convs of every block, 200 classes.

The wide-ResNet placement the report proposes (section 7), on top of the
Kaggle model's dropout 0.5 before the last Dense. No result in the report.

  python -m et_flax.main --config=configs/inblock_dropout_200.py \
      --workdir=runs/inblock_dropout_200 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.dropout_rate = 0.5
  config.model.block_dropout_rate = 0.1
  config.num_epochs = 300
  return config
