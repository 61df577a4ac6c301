"""Quickstart: plain E.T. on the embedded digits at 16x16, 40 epochs, on a CPU.

The digits ship inside scikit-learn, so this runs offline on a fresh machine
(docs/training.md has a measured run):

  python -m et_flax.main --config=configs/quickstart.py --workdir=runs/quickstart
"""

import os

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.name = 'digits'
  config.data.data_dir = os.path.join('~', '.cache', 'et_flax')
  config.data.image_size = 16
  config.batch_size = 32
  config.num_epochs = 40
  config.checkpoint_every_epochs = 10  # and whenever val top-1 improves
  return config
