"""JAX/Flax backend: diffusion_core's schedulers and pipelines as compiled programs (``lax.scan``, pmap, meshes)."""

from backends.flax.pipelines import DDIMPipeline, DDPMPipeline, DiffusionPipeline
from backends.flax.sampling import denoise_loop, jit_denoise_loop

__all__ = ["DDIMPipeline", "DDPMPipeline", "DiffusionPipeline", "denoise_loop", "jit_denoise_loop"]
