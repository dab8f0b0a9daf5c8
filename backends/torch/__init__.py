"""PyTorch backend: diffusion_core's schedulers and pipelines bound to torch modules (CPU, CUDA, MPS)."""

from backends.torch.pipelines import DDIMPipeline, DDPMPipeline, DiffusionPipeline
from backends.torch.sampling import denoise_loop, randn_tensor

__all__ = ["DDIMPipeline", "DDPMPipeline", "DiffusionPipeline", "denoise_loop", "randn_tensor"]
