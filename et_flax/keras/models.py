"""E.T. written in Keras, layer for layer equal to `models.ETNet`.

For weight interchange and parity tests with the Keras world the report came
from. Layer names are the Flax module paths joined by '_' (`block0_conv1`,
`stem_conv`, `hidden`, `logits`), so weights map by name. Keras is imported
here only (it comes with tensorflow).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from et_flax import models


def build_keras_et(model_config: Mapping[str, Any], num_classes: int, image_size: int):
  """A `keras.Model` of `config.model` (name 'et'), returning logits."""
  import keras  # pylint: disable=import-outside-toplevel

  flax_model = models.create_model(model_config, num_classes, image_size)
  if not isinstance(flax_model, models.ETNet):
    raise ValueError(f'build_keras_et builds E.T. only, not {model_config["name"]!r} '
                     '(use keras.applications for VGG16 and ResNet50)')
  m = flax_model
  layers = keras.layers

  def conv(x, kernel_size, name):
    return layers.Conv2D(m.features, kernel_size, padding='same', name=name)(x)

  def batch_norm(x, name):
    return layers.BatchNormalization(momentum=0.99, epsilon=1e-3, name=name)(x)

  def activation(x):
    return layers.Activation(m.activation)(x)

  def dropout(x, rate):
    return layers.Dropout(rate)(x) if rate else x

  inputs = keras.Input((image_size, image_size, 3))
  x = conv(inputs, 3, 'stem_conv')
  if m.batch_norm:
    x = batch_norm(x, 'stem_bn')
  x = activation(x)
  if m.stem_pool:
    x = layers.MaxPooling2D(2, strides=2)(x)
  if m.block_type == 'residual':
    for i in range(2 * m.num_modules):
      kernel_size = m.kernel_sizes[i % len(m.kernel_sizes)]
      shortcut = x
      for j in range(3):
        x = conv(x, kernel_size, f'block{i}_conv{j}')
        if m.batch_norm:
          x = batch_norm(x, f'block{i}_bn{j}')
        if j < 2:
          x = dropout(activation(x), m.block_dropout_rate)
      x = activation(layers.Add()([x, shortcut]))
  else:
    for i in range(m.num_modules):
      outputs = [x]
      for kernel_size in m.kernel_sizes:
        y = x
        for j in range(3):
          if j > 0:
            y = dropout(y, m.block_dropout_rate)
          y = conv(y, kernel_size, f'block{i}_branch{kernel_size}_conv{j}')
          if m.batch_norm:
            y = batch_norm(y, f'block{i}_branch{kernel_size}_bn{j}')
          y = activation(y)
        outputs.append(y)
      x = conv(layers.Concatenate()(outputs), 1, f'block{i}_merge_conv')
      if m.batch_norm:
        x = batch_norm(x, f'block{i}_merge_bn')
      x = activation(x)
  x = layers.GlobalAveragePooling2D()(x)
  x = layers.Dense(m.hidden_units, activation=m.activation, name='hidden')(x)
  x = dropout(x, m.dropout_rate)
  outputs = layers.Dense(num_classes, name='logits')(x)
  return keras.Model(inputs, outputs, name='extractor_team')
