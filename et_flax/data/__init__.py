"""The data: Tiny ImageNet and the embedded digits, prepared once and read as batches.

`input_pipeline` prepares, decodes (the only TensorFlow), caches and batches
the splits; `tiny_imagenet` knows the dataset's layout and source
fingerprints, `tiny_imagenet_builder` is the tfds builder (named
`tiny_imagenet`), `preparation` prepares a dataset once under a file lock
(`filelock`) and checks it against its source; `digits` writes scikit-learn's
digits, and `fake_data` generated trees, in the Tiny ImageNet layout.
"""
