"""Base config: plain E.T. on Tiny ImageNet (200 classes, 64x64).

The report's training set-up for every E.T. experiment after section 4.1:
Adam 1e-3, the rate halved when the training loss has not improved for 50
epochs, categorical cross-entropy. Every experiment config imports this one
and overrides only what changes.

  python -m et_flax.main --config=configs/default.py --workdir=runs/default \
      --config.data.data_dir=/path/to/tiny-imagenet-200
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict(dict(
      name='et',             # et | vgg16 | resnet50
      width=1,               # k: 16 * k filters per conv
      num_modules=4,         # 4 plain, 8 deep
      activation='relu',     # relu | tanh
      hidden_units=256,      # the report does not give the hidden Dense width
      dropout_rate=0.0,      # before the last Dense (the report used 0.5)
      stem_pool=False,       # 2x2 stride-2 max-pool after the stem conv
      batch_norm=False,      # batch norm + scale after every conv
      block_dropout_rate=0.0,
      kernel_sizes=(1, 3),   # block x, block y; (1, 3, 5) alternates three
      block_type='residual',  # residual | three_branch (footnote 3)
  ))

  # Not type-checked: `classes` takes a count or a list of wnids.
  config.data = ml_collections.ConfigDict(type_safe=False, initial_dictionary=dict(
      name='tiny_imagenet',  # tiny_imagenet | digits
      # tiny_imagenet: the extracted tiny-imagenet-200/ folder, or the folder
      # holding tiny-imagenet-200.zip; empty once the tfds dataset is prepared.
      # digits: where the digits tree is written.
      data_dir='',
      tfds_dir='',           # where tfds prepares it; '' = ~/tensorflow_datasets
      download=False,        # fetch the zip from the course site if no source
      # Check tiny-imagenet-200.zip against the official size and MD5 before
      # preparing it; False for a zip repacked on purpose (then recorded as
      # unverified, and said so in the run's header).
      verify_source=True,
      image_size=64,
      # 0 = all classes; n = n classes evenly spaced over the sorted wnids;
      # or a list of wnids. Saved to <workdir>/classes.json. Typed `object`
      # so that the command line may give a count, 'n01443537,n01629819' or
      # "['n01443537', 'n01629819']" (an int field would parse only ints).
      classes=ml_collections.FieldReference(0, field_type=object),
      # Keep the uint8 training split on the accelerator and batch it there:
      # 'auto' does when it takes under half of a GPU's memory.
      device_resident='auto',
  ))

  # A preset of et_flax.augment (none | five | eight | heavy); a range set
  # here overrides the preset's, e.g. --config.augment.rotation_range=10.
  config.augment = ml_collections.ConfigDict(dict(
      preset='none',
      rotation_range=placeholder(float),
      width_shift_range=placeholder(float),
      height_shift_range=placeholder(float),
      shear_range=placeholder(float),
      zoom_range=placeholder(float),
      channel_shift_range=placeholder(float),
      horizontal_flip=placeholder(bool),
      vertical_flip=placeholder(bool),
      crop_min_area=placeholder(float),
  ))

  # Keras's formulas and defaults (et_flax/optim.py). Fields by optimizer:
  # adam: beta_1, beta_2, epsilon; sgd: momentum, nesterov; rmsprop: rho,
  # momentum, epsilon. Schedules: constant | inverse_time (Keras 2's `decay`)
  # | cosine (warmup_epochs) | step (step_epochs, step_factor).
  config.optimizer = ml_collections.ConfigDict(dict(
      name='adam',
      learning_rate=1e-3,
      schedule='constant',
      # The report's schedule: halve the rate when the epoch's training loss
      # has not improved by min_delta in `patience` epochs (Keras
      # ReduceLROnPlateau at epoch granularity).
      plateau=ml_collections.ConfigDict(dict(
          enabled=True, factor=0.5, patience=50, min_delta=1e-4, cooldown=0,
          min_lr=0.0)),
  ))
  config.loss = 'categorical_crossentropy'  # or categorical_hinge

  config.batch_size = 128
  # Accumulate each batch's gradient over parts of this size (0: one pass):
  # the same update, and on CPUs faster per image with small parts
  # (docs/performance.md). 'auto', on CPUs for models without batch norm
  # (whose parts would be normalised apart), sizes parts to stay in cache:
  # 16 images here with the oneDNN convolutions, 8 with XLA's; else 0.
  config.micro_batch_size = ml_collections.FieldReference('auto', field_type=object)
  config.eval_batch_size = 256
  config.num_epochs = 200
  config.seed = 0

  # Checkpoints: every N epochs, at the end, and whenever val top-1 improves
  # (kept apart in checkpoints_best/). A workdir with checkpoints resumes.
  config.checkpoint_every_epochs = 1
  config.max_to_keep = 3
  # Warm start: params (not optimizer state) from another run's workdir.
  config.init_from = ''
  config.init_from_checkpoint = 'best'  # best | latest | an epoch number
  # Pretrained backbones (VGG16, ResNet50): a Keras weights file, the input
  # preprocessing its weights expect (rescale | caffe), and epochs during
  # which only the new head learns.
  config.pretrained_weights = ''
  config.preprocessing = 'rescale'
  config.freeze_backbone_epochs = 0
  # Compute in bfloat16 (params, optimizer and loss stay float32): 'auto' is
  # bfloat16 on GPUs and TPUs, float32 on CPUs.
  config.compute_dtype = 'auto'
  # Convolutions: 'xla' (lax) or 'onednn' (oneDNN through jax.ffi, float32,
  # ~2-9x faster on CPUs; built at first use, docs/performance.md). 'auto':
  # oneDNN for float32 on one CPU device of a Linux x86-64 machine, else XLA.
  config.conv_impl = 'auto'
  # The oneDNN convolutions' threads: 'auto' is one per core, and two per
  # core while other processes keep cores busy where the calls run faster so
  # (timed every minute of load); or a fixed number (docs/performance.md).
  config.onednn_threads = ml_collections.FieldReference('auto', field_type=object)
  # Multi-host: call jax.distributed.initialize() first.
  config.distributed = False
  return config
