"""et_flax: the Extractor Team (E.T.) network and its baselines in JAX/Flax."""

__version__ = '0.1.0'
