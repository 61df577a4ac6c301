"""What makes steps fast on CPUs.

`onednn` is the oneDNN convolution (`jax.ffi` handlers in `csrc/`, built at
first use) and its Flax layer; `host_memory` keeps XLA:CPU's step buffers in
the process between steps (`--host_memory`); `micro_batches` sizes the parts
of a batch whose gradients are accumulated ('auto' micro-batches).
"""
