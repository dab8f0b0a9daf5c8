"""PyTorch ``StableDiffusionUpscalePipeline`` (the x4 upscaler): denoise latents at the low-res image size,
conditioned on the noised low-res image (extra UNet channels) and its noise level (class labels).

The recipe is ``diffusion_core.pipelines.sd_recipes.UpscaleRecipe``.
"""

from __future__ import annotations

from typing import Any

from diffusion_core.pipelines import ImagePipelineOutput
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.sd_recipes import UpscaleRecipe
from diffusion_core.torch.pipelines.sd_base import StableDiffusionBase, StepCallback
from diffusion_core.torch.sampling import Generators, randn_tensor


class StableDiffusionUpscalePipeline(UpscaleRecipe, StableDiffusionBase):
    """Text-guided x4 super-resolution; diffusers' ``StableDiffusionUpscalePipeline``."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        num_inference_steps: int = 75,
        guidance_scale: float = 9.0,
        noise_level: int = 20,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generators = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
        clip_skip: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Upscale ``image`` (one per prompt) guided by ``prompt``; ``noise_level`` in [0, max_noise_level]."""
        request = self._request(locals())  # first: the call's parameters
        pixels, (height, width) = self._low_res_pixels(request, image, noise_level)
        context = self._context(request)
        low_res = self._as_tensor(pixels)
        noise = randn_tensor(tuple(low_res.shape), generator, dtype=low_res.dtype, device=self.device)
        inputs = {"context": context, "low_res": self._noised_low_res(low_res, noise, noise_level, request.batch)}
        shape = sd.latent_shape(request.batch, self._latent_channels(), height, width, self.vae_scale_factor)
        inputs["noise"] = self.prepare_latents(shape, latents, generator)
        scalars = (("noise_level", float(noise_level)),)
        return self._generate(request, inputs, generator, callback_on_step_end, return_dict, scalars=scalars)
