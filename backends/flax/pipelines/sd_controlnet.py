"""Flax ControlNet pipelines (Zhang et al. 2023): ``StableDiffusionControlNetPipeline`` (text to image) and its
img2img / inpaint forms, each steered by one ControlNet or several.

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
from diffusion_core.flax.pipelines.sd_image import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from diffusion_core.pipelines import ImagePipelineOutput
from diffusion_core.pipelines.sd_recipes import ControlNetImg2ImgRecipe, ControlNetInpaintRecipe, ControlNetRecipe


class _ControlInputs(StableDiffusionBase):
    """Adds the control images (options ``"control"``) to the per-image inputs of the compiled program."""

    def _inputs(self, run: Run, keys: jax.Array, start: np.ndarray | None, options: dict) -> dict[str, Any]:
        inputs = super()._inputs(run, keys, start, options)
        inputs["control"] = options["control"]  # (N, nets, 3, H, W): image b's control image per net
        return inputs


class StableDiffusionControlNetPipeline(ControlNetRecipe, _ControlInputs):
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


class StableDiffusionControlNetImg2ImgPipeline(ControlNetImg2ImgRecipe, _ControlInputs, StableDiffusionImg2ImgPipeline):
    """Image-to-image steered by ControlNets; diffusers' ``StableDiffusionControlNetImg2ImgPipeline`` for Flax."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        control_image: Any = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.8,
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
        controlnet_conditioning_scale: float | list[float] = 0.8,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Repaint ``image`` toward ``prompt`` (``strength`` of the schedule) following ``control_image``."""
        request = self._request(locals())  # first: the call's parameters
        control, size, opts, scalars = self._control_inputs(
            request, control_image, (height, width), guess_mode, controlnet_conditioning_scale,
            (control_guidance_start, control_guidance_end), "control_image",
        )  # fmt: skip
        run, options = self._img2img_run(request, image, size, strength, parallel, mesh, opts, scalars)
        return self._generate(run, request, key, latents, {**options, "control": control}, return_dict)


class StableDiffusionControlNetInpaintPipeline(ControlNetInpaintRecipe, _ControlInputs, StableDiffusionInpaintPipeline):
    """Inpainting steered by ControlNets; diffusers' ``StableDiffusionControlNetInpaintPipeline`` for Flax."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        control_image: Any = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 1.0,
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
        controlnet_conditioning_scale: float | list[float] = 0.5,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Repaint the white (>= 0.5) region of ``mask_image`` in ``image`` following ``prompt`` and
        ``control_image``."""
        request = self._request(locals())  # first: the call's parameters
        control, size, opts, scalars = self._control_inputs(
            request, control_image, (height, width), guess_mode, controlnet_conditioning_scale,
            (control_guidance_start, control_guidance_end), "control_image",
        )  # fmt: skip
        run, options = self._inpaint_run(request, image, mask_image, size, strength, parallel, mesh, opts, scalars)
        return self._generate(run, request, key, latents, {**options, "control": control}, return_dict)
