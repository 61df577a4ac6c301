"""ResNet50 pre-trained on ImageNet (Keras weights), 200 classes.

Report (5.1 table): validation top-1 0.623, top-5 0.821. The backbone
starts from Keras's ImageNet weights, a new head is trained, and everything
trains as in resnet50_200 (SGD 1e-4, decay 1e-6, the 5 augmentations), with Keras's
'caffe' preprocessing that those weights expect. The weights file cannot be
downloaded here: README.md says how to get it. To train only the head first,
add --config.freeze_backbone_epochs=N.

  python -m et_flax.main --config=configs/resnet50_pretrained_200.py \
      --workdir=runs/resnet50_pretrained_200 \
      --config.data.data_dir=/path/to/tiny-imagenet-200 \
      --config.pretrained_weights=~/.keras/models/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5
"""

import ml_collections

from configs import resnet50_200


def get_config() -> ml_collections.ConfigDict:
  config = resnet50_200.get_config()
  # Where Keras keeps the file after keras.applications.ResNet50(weights='imagenet',
  # include_top=False) has run once on a machine with internet.
  config.pretrained_weights = '~/.keras/models/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5'
  config.preprocessing = 'caffe'
  return config
