"""et_flax's benchmarks, one command with three parts.

  python -m et_flax.benchmark [steps] --config=configs/default.py ...
  python -m et_flax.benchmark pipeline --workdir=/tmp/pipe ...
  python -m et_flax.benchmark conv_variants

`steps` (the default): a config's train and eval steps against the same
model in Keras, with the input pipeline feeding them (`steps.py`).
`pipeline`: the input pipeline alone on a generated Tiny ImageNet tree, from
preparing the tfds dataset to cached epochs (`pipeline.py`).
`conv_variants`: ways to write E.T.'s convolutions, with both gradients
(`conv_variants.py`). Results and what they decided are in
docs/performance.md.
"""
