"""Keras interop: weights in and out, E.T. in Keras, and E.T. read from anyone's Keras file.

`weights` reads Keras weight files into our variables by layer name and
writes E.T.'s back out; `models` is E.T. written in Keras, layer for layer
equal to `et_flax.models.ETNet`; `structure` imports an E.T. whatever its
layer names, from the steps `graph` reads out of the file.

Keras itself is imported by absolute name where it is used: this package is
`et_flax.keras`, never the top-level `keras`.
"""
