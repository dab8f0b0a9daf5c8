"""JAX/Flax backend: runs diffusion_core's schedulers as one compiled ``lax.scan``."""

from backends.flax.sampling import denoise_loop, jit_denoise_loop

__all__ = ["denoise_loop", "jit_denoise_loop"]
