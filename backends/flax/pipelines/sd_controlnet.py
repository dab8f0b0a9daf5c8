"""Flax ``StableDiffusionControlNetPipeline``: text to image steered by ControlNets (Zhang et al. 2023).

The recipe is ``diffusion_core.pipelines.sd_recipes.ControlNetRecipe`` (per-net options, which model calls each
ControlNet acts on, the control batch, guess mode); here the ControlNets and the UNet run inside the one compiled
denoising scan, net k's per-call weight ``controlnet_conditioning_scale[k] * keep[i, k]`` indexed by the model-call
counter (the scales are traced: changing them does not recompile).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from diffusion_core.flax.pipelines.sd_base import Run, StableDiffusionBase
from diffusion_core.pipelines import ImagePipelineOutput
from diffusion_core.pipelines.sd_recipes import ControlNetRecipe


class StableDiffusionControlNetPipeline(ControlNetRecipe, StableDiffusionBase):
    """SD with a ``ControlNetModel``, or several (a list or a ``MultiControlNetModel``); diffusers'
    ``StableDiffusionControlNetPipeline`` for Flax."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
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
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt`` following the control ``image`` (edges, depth, pose, ...); with several
        ControlNets, ``image`` and (optionally) the scale and guidance window are lists with one entry per net."""
        request = self._request(locals())  # first: the call's parameters
        control, size, opts, scalars = self._control_inputs(
            request, image, (height, width), guess_mode, controlnet_conditioning_scale,
            (control_guidance_start, control_guidance_end),
        )  # fmt: skip
        run = self._run(request, size, parallel, mesh, scalars=scalars, opts=opts)
        return self._generate(run, request, key, latents, {"control": control}, return_dict)

    def _inputs(self, run: Run, keys: jax.Array, start: np.ndarray | None, options: dict) -> dict[str, Any]:
        inputs = super()._inputs(run, keys, start, options)
        inputs["control"] = options["control"]  # (N, nets, 3, H, W): image b's control image per net
        return inputs
