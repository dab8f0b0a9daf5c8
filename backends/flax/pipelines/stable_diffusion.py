"""Flax Stable Diffusion pipelines: ``StableDiffusionPipeline`` (text to image) and the registry's other SD names.

The shared Flax hooks live in ``sd_base``; the image-conditioned pipelines in ``sd_image``. Every class named
in the pipeline registry (``model_index.json`` ``_class_name``) is importable from here.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from diffusion_core.flax.pipelines.sd_base import StableDiffusionBase, call_options
from diffusion_core.flax.pipelines.sd_controlnet import StableDiffusionControlNetPipeline
from diffusion_core.flax.pipelines.sd_image import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
)
from diffusion_core.flax.pipelines.sd_upscale import (
    StableDiffusionLatentUpscalePipeline,
    StableDiffusionUpscalePipeline,
)
from diffusion_core.pipelines import ImagePipelineOutput
from diffusion_core.pipelines import stable_diffusion as sd


def _custom_schedule(timesteps: Any, sigmas: Any) -> tuple:
    """``("timesteps" | "sigmas", values)`` for a custom schedule, or ``()``; ValueError when both are given."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("timesteps, sigmas: pass at most one of them")
    if timesteps is not None:
        return ("timesteps", tuple(float(t) for t in np.ravel(timesteps)))
    if sigmas is not None:
        return ("sigmas", tuple(float(s) for s in np.ravel(sigmas)))
    return ()


class StableDiffusionPipeline(StableDiffusionBase):
    """Text-to-image latent diffusion (Rombach et al. 2022); diffusers' ``StableDiffusionPipeline`` for Flax."""

    _legacy_scheduler_options = ("steps_offset", "clip_sample")

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
        options = call_options(num_inference_steps, num_images_per_prompt, eta, output_type, clip_skip)
        batch = self._common_checks(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, options)
        size = sd.resolve_size(height, width, self.unet.config, self.vae.config)
        g = sd.guidance(guidance_scale, guidance_rescale, self.unet.config)
        run = self._run(
            g, size, batch * num_images_per_prompt, num_inference_steps, eta, parallel, mesh,
            scalars=(("guidance_scale", float(guidance_scale)),), schedule=_custom_schedule(timesteps, sigmas),
        )  # fmt: skip
        if run.schedule:  # validated now (the scheduler raises for what it does not take), before any work
            self.scheduler.set_timesteps(**{run.schedule[0]: np.asarray(run.schedule[1])})
        context = self.encode_prompt(
            prompt, num_images_per_prompt, g, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip
        )
        return self._decode(self._denoise(run, context, key, latents, {}), output_type, return_dict)


__all__ = [
    "StableDiffusionBase",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionInstructPix2PixPipeline",
    "StableDiffusionLatentUpscalePipeline",
    "StableDiffusionPipeline",
    "StableDiffusionUpscalePipeline",
]
