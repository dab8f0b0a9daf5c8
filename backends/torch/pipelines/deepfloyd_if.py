"""DeepFloyd IF for PyTorch: ``IFPipeline`` (stage I) and ``IFSuperResolutionPipeline`` (stage II).

The request checks and the recipe (text context, guided model function with its variance channels,
stage II's noise-augmented upscaled image) are the core's ``diffusion_core.pipelines.deepfloyd_if``; this
module binds them to torch modules, generators (noise drawn in diffusers' order, so seeded runs match it)
and ``diffusion_core.torch.sampling.denoise_loop``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffusion_core.pipelines import ImagePipelineOutput
from diffusion_core.pipelines import deepfloyd_if as dif
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.torch.sampling import Generators, denoise_loop, randn_tensor


class _IFBase(dif.IFRecipe, DiffusionPipeline):
    """Torch primitives of the IF recipe: text encoding, noise draws, the Python loop."""

    def _as_tensor(self, value: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = value if torch.is_tensor(value) else torch.from_numpy(np.asarray(value))
        return tensor.to(device=self.device, dtype=dtype or self.unet.dtype)

    def _embeds_array(self, value: Any) -> torch.Tensor:
        return self._as_tensor(value)

    def _encode_ids(self, ids: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        """(B, L) ids and attention mask -> (B, L, D) T5 states: ``text_encoder(input_ids, attention_mask=mask)[0]``."""
        with torch.inference_mode():
            out = self.text_encoder(
                torch.from_numpy(ids).to(self.device), attention_mask=torch.from_numpy(mask).to(self.device)
            )
        return out[0]

    def _run(
        self,
        request: dif.IFRequest,
        generator: Generators,
        clean_caption: bool,
        return_dict: bool,
        noise: dif.ExplicitNoise | None = None,
    ):
        """Start noise, (stage II: noisy upscaled image), the guided loop, images; draws in diffusers' order.

        ``noise`` replaces the generator's draws after the start (tests compare backends on it).
        """
        context = self.encode_prompt(request, clean_caption)
        if request.latents is None:
            x = randn_tensor(request.shape, generator, dtype=self.unet.dtype, device=self.device)
        else:
            x = self._as_tensor(request.latents)
        state, first = self._schedule(request, x)
        x = self._start(request, x, state, first)
        extra = labels = None
        if self._stage2:
            if noise is None:
                image_noise = randn_tensor(request.shape, generator, dtype=self.unet.dtype, device=self.device)
            else:
                image_noise = self._as_tensor(noise.image)
            extra = self._augment(request, x, image_noise)
            labels = self._noise_level_labels(request, x)
        steps = None if noise is None else self._as_tensor(noise.steps)
        x, _ = denoise_loop(
            self.scheduler,
            self._model_fn(self.unet, context, request, extra, labels, state),
            x,
            state,
            generator=generator,
            noise_fn=None if steps is None else steps.__getitem__,
            step_kwargs=sd.step_kwargs(self.scheduler, request.eta),
            progress=not self.progress_bar_disabled,
            index_model_fn=True,
            post_step=self._blend(self._blend_inputs(request, x)),
        )
        return self._finish(x.float().cpu().numpy(), request.output_type, return_dict)


class IFPipeline(_IFBase):
    """DeepFloyd IF stage I: text -> 64x64 pixels; diffusers' ``IFPipeline`` call signature."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        generator: Generators = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clean_caption: bool = True,
        latents: Any = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images; ``latents`` (numpy (N, 3, H, W)) fixes the starting draw."""
        request = dif.if_request_from_call(self.unet.config, locals(), self._stage2)
        return self._run(request, generator, clean_caption, return_dict)


class IFSuperResolutionPipeline(_IFBase):
    """DeepFloyd IF stage II: a low-res image + text -> 4x the pixels; diffusers' ``IFSuperResolutionPipeline``."""

    _components = dif.IF_SR_COMPONENTS
    _stage2 = True

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        image: Any = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generators = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        noise_level: int = 250,
        clean_caption: bool = True,
        latents: Any = None,
    ) -> ImagePipelineOutput | tuple:
        """Upscale ``image`` (PIL, numpy (B, H, W, 3), or a (B, 3, h, w) tensor in [-1, 1]) guided by the text."""
        request = dif.if_request_from_call(self.unet.config, locals(), self._stage2)
        return self._run(request, generator, clean_caption, return_dict)


class IFImg2ImgPipeline(_IFBase):
    """DeepFloyd IF stage I from an image: ``image`` forward-diffused to ``strength`` of the schedule, then denoised
    with the text; diffusers' ``IFImg2ImgPipeline`` call."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        strength: float = 0.7,
        num_inference_steps: int = 80,
        guidance_scale: float = 10.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generators = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clean_caption: bool = True,
        latents: Any = None,
    ) -> ImagePipelineOutput | tuple:
        """Rework ``image`` (PIL, numpy (B, H, W, 3), or a (B, 3, H, W) array in [-1, 1]); ``latents`` (numpy, the
        image's shape) fixes the noise it is diffused with."""
        request = dif.if_request_from_call(self.unet.config, locals(), self._stage2)
        return self._run(request, generator, clean_caption, return_dict)


class IFInpaintingPipeline(_IFBase):
    """DeepFloyd IF stage I inpainting: redraws ``image`` where ``mask_image`` is 1, keeping the rest; diffusers'
    ``IFInpaintingPipeline`` call."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generators = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clean_caption: bool = True,
        latents: Any = None,
    ) -> ImagePipelineOutput | tuple:
        """Inpaint ``image`` (as for img2img) under ``mask_image`` (PIL, or (H, W) / (B, H, W) / (B, 1, H, W) in
        [0, 1], thresholded at 0.5)."""
        request = dif.if_request_from_call(self.unet.config, locals(), self._stage2, type(self).__name__)
        return self._run(request, generator, clean_caption, return_dict)


class IFImg2ImgSuperResolutionPipeline(_IFBase):
    """DeepFloyd IF stage II from an image: ``original_image`` diffused to ``strength``, denoised next to the upscaled
    noise-augmented ``image``; diffusers' ``IFImg2ImgSuperResolutionPipeline`` call."""

    _components = dif.IF_SR_COMPONENTS
    _stage2 = True

    def __call__(
        self,
        image: Any = None,
        original_image: Any = None,
        strength: float = 0.8,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generators = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        noise_level: int = 250,
        clean_caption: bool = True,
        latents: Any = None,
    ) -> ImagePipelineOutput | tuple:
        """``image``: the low-res input (as for IFSuperResolutionPipeline); ``original_image``: the full-size start."""
        request = dif.if_request_from_call(self.unet.config, locals(), self._stage2)
        return self._run(request, generator, clean_caption, return_dict)


class IFInpaintingSuperResolutionPipeline(_IFBase):
    """DeepFloyd IF stage II inpainting: ``original_image`` redrawn under ``mask_image`` next to the upscaled
    noise-augmented ``image``; diffusers' ``IFInpaintingSuperResolutionPipeline`` call."""

    _components = dif.IF_SR_COMPONENTS
    _stage2 = True

    def __call__(
        self,
        image: Any = None,
        original_image: Any = None,
        mask_image: Any = None,
        strength: float = 0.8,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generators = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        noise_level: int = 0,
        clean_caption: bool = True,
        latents: Any = None,
    ) -> ImagePipelineOutput | tuple:
        """As IFImg2ImgSuperResolutionPipeline, keeping ``original_image`` where ``mask_image`` is 0."""
        request = dif.if_request_from_call(self.unet.config, locals(), self._stage2, type(self).__name__)
        return self._run(request, generator, clean_caption, return_dict)
