"""Future work: E.T. with tanh activations on all 200 classes.

Report (section 7) proposes it after tanh_5 (0.65); no result.

  python -m et_flax.main --config=configs/tanh_200.py --workdir=runs/tanh_200 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.activation = 'tanh'
  config.model.dropout_rate = 0.5
  config.num_epochs = 300
  return config
