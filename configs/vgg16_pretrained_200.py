"""VGG16 pre-trained on ImageNet (Keras weights), 200 classes.

Report (5.1 table): validation top-1 0.520, top-5 0.794. The backbone
starts from Keras's ImageNet weights, a new head is trained, and everything
trains as in vgg16_200 (RMSprop 1e-3, the 5 augmentations), with Keras's
'caffe' preprocessing that those weights expect. The weights file cannot be
downloaded here: README.md says how to get it. To train only the head first,
add --config.freeze_backbone_epochs=N.

  python -m et_flax.main --config=configs/vgg16_pretrained_200.py \
      --workdir=runs/vgg16_pretrained_200 \
      --config.data.data_dir=/path/to/tiny-imagenet-200 \
      --config.pretrained_weights=~/.keras/models/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5
"""

import ml_collections

from configs import vgg16_200


def get_config() -> ml_collections.ConfigDict:
  config = vgg16_200.get_config()
  # Where Keras keeps the file after keras.applications.VGG16(weights='imagenet',
  # include_top=False) has run once on a machine with internet.
  config.pretrained_weights = '~/.keras/models/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5'
  config.preprocessing = 'caffe'
  return config
