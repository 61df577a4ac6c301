"""The GPU path, checked without a GPU: the steps lowered for CUDA on this CPU.

A GPU user gets the 'auto' settings resolved for the 'gpu' backend: XLA's
convolutions (no oneDNN custom call), bfloat16 compute, whole batches, and a
train step that donates its state.
"""

import importlib
import re

import jax
import jax.numpy as jnp
import pytest

from et_flax import augment
from et_flax import optim
from et_flax import settings
from et_flax import train

IMAGE_SIZE = 32  # the smallest VGG16 takes


def _lower_for_cuda(config_name):
  config = importlib.import_module(f'configs.{config_name}').get_config()
  assert config.conv_impl == config.compute_dtype == config.micro_batch_size == 'auto'
  if config.model.name == 'et':
    config.model.num_modules = 1
  gpu_settings = settings.resolve(config, settings.Platform('gpu'))
  model = settings.build_model(config, gpu_settings, 10, IMAGE_SIZE)
  tx = optim.create_optimizer(config.optimizer, 10, 2)
  state = train.create_train_state(jax.random.key(0), model, IMAGE_SIZE, tx)
  batch = {'image': jnp.zeros((8, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.uint8),
           'label': jnp.zeros(8, jnp.int32)}
  steps = train.make_steps(gpu_settings, optim.get_loss(config.loss),
                           augment.config_from(config.augment))
  lowered_train = steps.train.trace(state, batch, jax.random.key(1)).lower(
      lowering_platforms=('cuda',))
  lowered_eval = steps.eval.trace(state, {**batch, 'mask': jnp.ones(8, bool)}).lower(
      lowering_platforms=('cuda',))
  return gpu_settings, state, lowered_train.as_text(), lowered_eval.as_text()


@pytest.mark.parametrize('config_name', ['dropout_200', 'vgg16_20'])
def test_gpu_steps_lower_for_cuda_with_xla_convolutions_in_bfloat16(config_name):
  gpu_settings, state, train_text, eval_text = _lower_for_cuda(config_name)
  assert gpu_settings.conv_impl == 'xla'
  assert gpu_settings.micro_batches == 1
  for text in (train_text, eval_text):
    assert 'custom_call' not in text and 'et_onednn' not in text
    convolutions = re.findall(r'stablehlo\.convolution.*?: \((.*?)\) ->', text)
    assert convolutions, 'no convolution in the lowered step'
    for operands in convolutions:
      assert operands.count('xbf16>') == 2, operands  # input and kernel in bfloat16
  # The state's every array is donated: aliased to an output of the step.
  main = re.search(r'func\.func public @main\((.*?)\) ->', train_text).group(1)
  arguments = re.findall(r'%arg\d+: [^{,]*(\{[^}]*\})?', main)
  num_state_leaves = len(jax.tree.leaves(state))
  assert len(arguments) >= num_state_leaves
  assert all('tf.aliasing_output' in attributes
             for attributes in arguments[:num_state_leaves]), arguments[:num_state_leaves]
