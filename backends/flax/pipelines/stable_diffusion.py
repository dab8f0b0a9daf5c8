"""Flax Stable Diffusion pipelines: ``StableDiffusionPipeline`` (text to image) and the registry's other SD names.

The shared Flax hooks live in ``sd_base``; the image-conditioned pipelines in ``sd_image``. Every class named
in the pipeline registry (``model_index.json`` ``_class_name``) is importable from here.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh

from diffusion_core.flax.pipelines.sd_base import StableDiffusionBase
from diffusion_core.flax.pipelines.sd_controlnet import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
)
from diffusion_core.flax.pipelines.sd_image import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
)
from diffusion_core.flax.pipelines.sd_upscale import (
    StableDiffusionLatentUpscalePipeline,
    StableDiffusionUpscalePipeline,
)
from diffusion_core.pipelines import ImagePipelineOutput, sd_recipe
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.sd_recipes import TextToImageRecipe


class StableDiffusionPipeline(TextToImageRecipe, StableDiffusionBase):
    """Text-to-image latent diffusion (Rombach et al. 2022); diffusers' ``StableDiffusionPipeline`` for Flax.

    The recipe is ``diffusion_core.pipelines.sd_recipe.StableDiffusionRecipe``.
    """

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        key: jax.Array | None = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt``; ``latents`` (numpy (N, C, h, w)) fixes the starting draw, else ``key``.

        ``timesteps``/``sigmas``: a custom schedule (replaces ``num_inference_steps``) where the scheduler takes one.
        ``parallel="pmap"`` splits the N images over the local devices, ``mesh=`` shards them on a Mesh.
        """
        request = self._request(locals())  # first: the call's parameters
        size = sd.resolve_size(height, width, self.unet.config, self.vae.config)
        custom = sd_recipe.custom_schedule(timesteps, sigmas)
        run = self._run(
            request, size, parallel, mesh,
            opts=(("custom", custom),),
        )  # fmt: skip
        return self._generate(run, request, key, latents, {}, return_dict)


__all__ = [
    "StableDiffusionBase",
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
