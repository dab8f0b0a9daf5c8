"""PyTorch backend: drives diffusion_core's schedulers from a Python loop (CPU, CUDA, MPS)."""

from backends.torch.sampling import denoise_loop

__all__ = ["denoise_loop"]
