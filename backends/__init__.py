"""Thin framework bindings of diffusion_core: ``backends.flax`` (JAX/Flax NNX) and ``backends.torch``."""
