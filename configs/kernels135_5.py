"""Future work: blocks alternating 1x1, 3x3 and 5x5 kernels, 5 classes.

Report (section 7) proposes it; no result. Compare with plain_5 (0.66).

  python -m et_flax.main --config=configs/kernels135_5.py --workdir=runs/kernels135_5 \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.classes = 5
  config.model.kernel_sizes = (1, 3, 5)
  config.num_epochs = 100
  return config
