"""VGG16 pre-trained on ImageNet (Keras weights), 20 classes.

Report (5.1 table): validation top-1 0.456, top-5 0.892. As
vgg16_pretrained_200, on the 20-class subset.

  python -m et_flax.main --config=configs/vgg16_pretrained_20.py \
      --workdir=runs/vgg16_pretrained_20 \
      --config.data.data_dir=/path/to/tiny-imagenet-200 \
      --config.pretrained_weights=~/.keras/models/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5
"""

import ml_collections

from configs import vgg16_pretrained_200


def get_config() -> ml_collections.ConfigDict:
  config = vgg16_pretrained_200.get_config()
  config.data.classes = 20
  return config
