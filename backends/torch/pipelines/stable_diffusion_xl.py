"""PyTorch SDXL pipelines: ``StableDiffusionXLPipeline``, ``StableDiffusionXLImg2ImgPipeline`` (the refiner) and
``StableDiffusionXLInpaintPipeline``, ``StableDiffusionXLControlNetPipeline``.

The recipes are ``diffusion_core.pipelines.sdxl_recipes``; this module binds the two text encoders, the float16
VAE's ``force_upcast`` and the inputs drawn in diffusers' generator order. ``latents=`` is the starting Gaussian
draw for text to image, and the starting latents used as they are for img2img (as diffusers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from diffusion_core.models.clip_config import CLIPTextWithProjectionOutput
from diffusion_core.pipelines import ImagePipelineOutput, sd_image, sd_recipe, sdxl
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.sdxl_recipes import (
    SDXLControlNetRecipe,
    SDXLImg2ImgRecipe,
    SDXLInpaintRecipe,
    SDXLTextToImageRecipe,
)
from diffusion_core.torch.pipelines.sd_base import StableDiffusionBase, StepCallback
from diffusion_core.torch.pipelines.sd_img2img import StableDiffusionInpaintPipeline
from diffusion_core.torch.sampling import Generators

__all__ = [
    "StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLPipeline",
]


class SDXLBase(StableDiffusionBase):
    """Torch primitives of the SDXL recipes: both text encoders, VAE calls upcast where ``force_upcast`` says."""

    def _embeds_array(self, value: Any) -> torch.Tensor:
        return self._as_tensor(value, self.text_encoder_2.dtype)

    def _encode_layers(self, index: int, ids: np.ndarray, clip_skip: int | None) -> tuple[torch.Tensor, Any]:
        """(B, L) ids -> (layer ``-(2 + clip_skip)`` (B, L, D), projected pooled text (B, P) or None)."""
        encoder = self._text_encoders()[index]
        with torch.inference_mode():
            out = encoder(torch.from_numpy(ids).to(self.device), output_hidden_states=True)
        pooled = out.text_embeds if isinstance(out, CLIPTextWithProjectionOutput) else None
        return out.hidden_states[-(2 + (clip_skip or 0))], pooled

    @contextlib.contextmanager
    def _upcast_vae(self) -> Iterator[None]:
        """A float16 VAE whose config says ``force_upcast`` runs in float32 (SDXL's VAE overflows in float16)."""
        dtype = self.vae.dtype
        upcast = dtype == torch.float16 and bool(self.vae.config.get("force_upcast", False))
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            yield
        finally:
            if upcast:
                self.vae.to(dtype=dtype)

    def _vae_decode(self, z: torch.Tensor) -> np.ndarray:
        with self._upcast_vae():
            return super()._vae_decode(z)

    def _encode_image(self, image: np.ndarray, batch: int, generator: Generators, sample: bool = True) -> torch.Tensor:
        with self._upcast_vae():
            return super()._encode_image(image, batch, generator, sample).to(self.unet.dtype)


class StableDiffusionXLPipeline(SDXLTextToImageRecipe, SDXLBase):
    """SDXL text to image (Podell et al. 2023); diffusers' ``StableDiffusionXLPipeline``."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generators = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        pooled_prompt_embeds: Any = None,
        negative_pooled_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt`` (``prompt_2`` for the second encoder); ``latents`` (numpy (N, C, h, w))
        fixes the starting noise; ``denoising_end`` stops early (``output_type="latent"`` feeds the refiner)."""
        a = locals()  # first: the call's parameters
        request = self._request(a)
        height, width = sd.resolve_size(height, width, self.unet.config, self.vae.config)
        cond = sdxl.sdxl_conditions(request, a, sdxl.base_time_ids(a, (height, width)))
        inputs = self._sdxl_inputs(request, cond)
        shape = sd.latent_shape(request.batch, self.unet.config["in_channels"], height, width, self.vae_scale_factor)
        inputs["noise"] = self.prepare_latents(shape, latents, generator)
        opts = (("custom", sd_recipe.custom_schedule(timesteps, sigmas)), ("denoising_end", cond.denoising_end))
        return self._generate(request, inputs, generator, callback_on_step_end, return_dict, opts)


class StableDiffusionXLImg2ImgPipeline(SDXLImg2ImgRecipe, SDXLBase):
    """SDXL img2img and the refiner; diffusers' ``StableDiffusionXLImg2ImgPipeline``."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: Any = None,
        strength: float = 0.3,
        num_inference_steps: int = 50,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generators = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        pooled_prompt_embeds: Any = None,
        negative_pooled_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Repaint ``image`` (pixels, or latents such as the base pipeline's ``output_type="latent"``) toward
        ``prompt``: ``strength`` of the schedule, or from ``denoising_start`` on; ``latents`` are the start."""
        a = locals()  # first: the call's parameters
        request = self._request(a)
        image_latents = self._image_latents(sd_image.require_image(image, "image"), request.batch, generator)
        start = None if latents is None else sd.check_latents(latents, tuple(image_latents.shape))
        image_latents = image_latents if start is None else self._as_tensor(start)
        size = (image_latents.shape[2] * self.vae_scale_factor, image_latents.shape[3] * self.vae_scale_factor)
        aesthetics = bool(self.setting("requires_aesthetics_score"))
        cond = sdxl.sdxl_conditions(request, a, sdxl.refiner_time_ids(a, size, aesthetics))
        self._img2img_checks(cond, num_inference_steps, strength)
        inputs = {**self._sdxl_inputs(request, cond), "image_latents": image_latents}
        as_given = start is not None or cond.denoising_start is not None  # diffusers adds no noise then
        inputs["noise"] = (
            image_latents if as_given else self.prepare_latents(tuple(image_latents.shape), None, generator)
        )
        opts = (
            ("strength", strength), ("as_given", as_given), ("denoising_start", cond.denoising_start),
            ("denoising_end", cond.denoising_end),
        )  # fmt: skip
        return self._generate(request, inputs, generator, callback_on_step_end, return_dict, opts)

    def _image_latents(self, image: Any, batch: int, generator: Generators) -> torch.Tensor:
        """(N, C, h, w) scaled latents: given latents tiled to the batch, or the VAE-encoded images."""
        if self._latent_image(image):
            return sd_image.image_batch(self._as_tensor(image), batch, "image")
        pixels = sd_image.preprocess_image(image, self.vae_scale_factor)  # (b, 3, H, W) in [-1, 1]
        return sd.scale_latents(self._encode_image(pixels, batch, generator), self.vae.config)


class StableDiffusionXLInpaintPipeline(SDXLInpaintRecipe, SDXLBase, StableDiffusionInpaintPipeline):
    """SDXL inpainting; diffusers' ``StableDiffusionXLInpaintPipeline`` (inputs drawn as the SD inpaint pipeline)."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
        denoising_end: float | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generators = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        pooled_prompt_embeds: Any = None,
        negative_pooled_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Repaint the white (>= 0.5) region of ``mask_image`` in ``image`` following ``prompt``; ``latents``
        (numpy (N, C, h, w)) is the starting Gaussian draw."""
        a = locals()  # first: the call's parameters
        request = self._request(a)
        checked = self._inpaint_checks(image, mask_image, (height, width), num_inference_steps, strength)
        aesthetics = bool(self.setting("requires_aesthetics_score"))
        cond = sdxl.sdxl_conditions(request, a, sdxl.refiner_time_ids(a, checked[1], aesthetics))
        inputs = self._inpaint_inputs(request, checked, strength, generator, latents)
        inputs.update(self._sdxl_inputs(request, cond))
        opts = (("strength", strength), ("denoising_end", cond.denoising_end))
        return self._generate(request, inputs, generator, callback_on_step_end, return_dict, opts)


class StableDiffusionXLControlNetPipeline(SDXLControlNetRecipe, SDXLBase):
    """SDXL with one ``ControlNetModel`` or several (``MultiControlNetModel``); diffusers'
    ``StableDiffusionXLControlNetPipeline``."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: Any = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generators = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        pooled_prompt_embeds: Any = None,
        negative_pooled_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: StepCallback | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt`` following the control ``image`` (edges, depth, pose, ...)."""
        a = locals()  # first: the call's parameters
        request = self._request(a)
        control, (height, width), opts, scalars = self._control_inputs(
            request, image, (height, width), guess_mode, controlnet_conditioning_scale,
            (control_guidance_start, control_guidance_end),
        )  # fmt: skip
        cond = sdxl.sdxl_conditions(request, a, sdxl.base_time_ids(a, (height, width)))
        inputs = self._sdxl_inputs(request, cond)
        shape = sd.latent_shape(request.batch, self.unet.config["in_channels"], height, width, self.vae_scale_factor)
        inputs["noise"] = self.prepare_latents(shape, latents, generator)
        inputs["control"] = self._as_tensor(control, self.controlnet.dtype)
        return self._generate(request, inputs, generator, callback_on_step_end, return_dict, opts, scalars)
