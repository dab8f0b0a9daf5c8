"""PyTorch Stable Diffusion pipelines: ``StableDiffusionPipeline`` (text to image) here, the image-conditioned ones
in ``sd_*.py`` (re-exported, so ``model_index.json`` names resolve to this module).

The recipe is ``diffusion_core.pipelines.sd_recipe.StableDiffusionRecipe``; ``sd_base.StableDiffusionBase`` binds
it to torch.
"""

from __future__ import annotations

from typing import Any

from diffusion_core.pipelines import ImagePipelineOutput, sd_recipe
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.sd_recipes import TextToImageRecipe
from diffusion_core.torch.pipelines.sd_base import StableDiffusionBase, StepCallback
from diffusion_core.torch.pipelines.sd_controlnet import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
)
from diffusion_core.torch.pipelines.sd_img2img import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
)
from diffusion_core.torch.pipelines.sd_latent_upscale import StableDiffusionLatentUpscalePipeline
from diffusion_core.torch.pipelines.sd_upscale import StableDiffusionUpscalePipeline
from diffusion_core.torch.sampling import Generators

__all__ = [
    "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionControlNetInpaintPipeline",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionInstructPix2PixPipeline",
    "StableDiffusionLatentUpscalePipeline",
    "StableDiffusionPipeline",
    "StableDiffusionUpscalePipeline",
]


class StableDiffusionPipeline(TextToImageRecipe, StableDiffusionBase):
    """Text-to-image latent diffusion (Rombach et al. 2022); diffusers' ``StableDiffusionPipeline``."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
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
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt``; ``latents`` (numpy (B * n, C, h, w)) fixes the starting noise.

        ``timesteps``/``sigmas``: a custom schedule (replaces ``num_inference_steps``) where the scheduler takes one.
        """
        request = self._request(locals())  # first: the call's parameters
        height, width = sd.resolve_size(height, width, self.unet.config, self.vae.config)
        context = self._context(request)
        shape = sd.latent_shape(request.batch, self.unet.config["in_channels"], height, width, self.vae_scale_factor)
        inputs = {"context": context, "noise": self.prepare_latents(shape, latents, generator)}
        opts = (("custom", sd_recipe.custom_schedule(timesteps, sigmas)),)
        return self._generate(request, inputs, generator, callback_on_step_end, return_dict, opts)
