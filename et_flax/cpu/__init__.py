"""What makes steps fast on CPUs.

`onednn` is the oneDNN convolution (`jax.ffi` handlers in `csrc/`, built at
first use) and its Flax layer; `host_memory` keeps XLA:CPU's step buffers in
the process between steps (`--host_memory`).
"""
