"""DeepFloyd IF for Flax NNX: ``IFPipeline`` (stage I) and ``IFSuperResolutionPipeline`` (stage II).

The request checks and the recipe are the core's ``diffusion_core.pipelines.deepfloyd_if``, shared with torch;
this module binds them to NNX modules, keys and one compiled ``lax.scan`` (cached per shapes and scheduler).
Image ``b`` starts from ``normal(fold_in(key, b))``, draws its step noise from ``fold_in(that key, i)`` and
stage II's augmentation noise from ``fold_in(that key, AUGMENT_FOLD)``. Single device (no ``parallel=`` / ``mesh=``
yet).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.flax.sampling import denoise_loop, per_example_keys, per_example_normal
from diffusion_core.pipelines import ImagePipelineOutput
from diffusion_core.pipelines import deepfloyd_if as dif
from diffusion_core.pipelines import stable_diffusion as sd

AUGMENT_FOLD = 2**31 - 1  # fold_in index of stage II's augmentation noise (step noise uses the call index)


class _IFBase(dif.IFRecipe, DiffusionPipeline):
    """Flax primitives of the IF recipe: text encoding, keys, the compiled loop."""

    def _embeds_array(self, value: Any) -> jax.Array:
        return jnp.asarray(np.asarray(value), jnp.float32).astype(self.unet.dtype)

    def _encode_ids(self, ids: np.ndarray, mask: np.ndarray) -> jax.Array:
        """(B, L) ids and attention mask -> (B, L, D) T5 states: ``text_encoder(input_ids, attention_mask=mask)[0]``."""
        return self.text_encoder(jnp.asarray(ids), attention_mask=jnp.asarray(mask))[0]

    def _program(self, graphdef: Any, request: dif.IFRequest, step_kwargs: dict[str, Any], explicit: bool, first: int):
        scheduler = self.scheduler

        def program(params, state, x, context, extra, labels, keys, steps, blend):
            self.trace_count += 1  # runs at trace time only
            unet = nnx.merge(graphdef, params)
            model_fn = self._model_fn(unet, context, request, extra, labels, state)
            x, _ = denoise_loop(
                scheduler, model_fn, x, state, keys=None if explicit else keys, first=first,
                noise_fn=steps.__getitem__ if explicit else None, step_kwargs=step_kwargs, index_model_fn=True,
                post_step=self._blend(blend),
            )  # fmt: skip
            return x

        return program

    def _run(
        self,
        request: dif.IFRequest,
        key: Any,
        clean_caption: bool,
        return_dict: bool,
        noise: dif.ExplicitNoise | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Start noise, (stage II: noisy upscaled image), the compiled guided loop, images.

        ``noise`` replaces the key's draws after the start (tests compare backends on it).
        """
        step_kwargs = sd.step_kwargs(self.scheduler, request.eta)
        if key is None and (request.latents is None or noise is None):
            raise ValueError("key: pass key=jax.random.key(seed) (needed to draw the starting or step noise)")
        keys = per_example_keys(key if key is not None else jax.random.key(0), request.shape[0])
        start = request.latents
        x = per_example_normal(keys, request.shape[1:]) if start is None else jnp.asarray(start, jnp.float32)
        x = x.astype(self.unet.dtype)
        context = self.encode_prompt(request, clean_caption)
        extra = labels = None
        if self._stage2:
            if noise is None:
                image_noise = per_example_normal(
                    jax.vmap(lambda k: jax.random.fold_in(k, AUGMENT_FOLD))(keys), x.shape[1:]
                )
            else:
                image_noise = jnp.asarray(noise.image)
            extra = self._augment(request, x, image_noise.astype(x.dtype))
            labels = self._noise_level_labels(request, x)
        state, first = self._schedule(request, x)
        x = self._start(request, x, state, first)
        graphdef, params = nnx.split(self.unet)
        static = (
            self._scheduler_key(),
            tuple(sorted(step_kwargs.items())),
            request.guidance,
            request.shape,
            noise is not None,
            first,
        )
        fn = self.compiled(
            "single", None, static, lambda: self._program(graphdef, request, step_kwargs, noise is not None, first)
        )
        steps = None if noise is None else jnp.asarray(noise.steps, x.dtype)
        out = np.asarray(
            jax.device_get(fn(params, state, x, context, extra, labels, keys, steps, self._blend_inputs(request, x)))
        )
        return self._finish(out.astype(np.float32), request.output_type, return_dict)


class IFPipeline(_IFBase):
    """DeepFloyd IF stage I: text -> 64x64 pixels; diffusers' ``IFPipeline`` call with ``key=``."""

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
        key: jax.Array | None = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clean_caption: bool = True,
        latents: Any = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images; ``latents`` (numpy (N, 3, H, W)) fixes the starting draw."""
        request = dif.if_request(
            self.unet.config, prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps, eta=eta, output_type=output_type, guidance_scale=guidance_scale,
            height=height, width=width, latents=latents, clean_caption=clean_caption,
        )  # fmt: skip
        return self._run(request, key, clean_caption, return_dict)


class IFSuperResolutionPipeline(_IFBase):
    """DeepFloyd IF stage II: a low-res image + text -> 4x the pixels; diffusers' call with ``key=``."""

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
        key: jax.Array | None = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        noise_level: int = 250,
        clean_caption: bool = True,
        latents: Any = None,
    ) -> ImagePipelineOutput | tuple:
        """Upscale ``image`` (PIL, numpy (B, H, W, 3), or a (B, 3, h, w) array in [-1, 1]) guided by the text."""
        request = dif.if_request(
            self.unet.config, prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps, eta=eta, output_type=output_type, guidance_scale=guidance_scale,
            height=height, width=width, latents=latents, clean_caption=clean_caption, image=image,
            noise_level=noise_level, stage2=True,
        )  # fmt: skip
        return self._run(request, key, clean_caption, return_dict)


class IFImg2ImgPipeline(_IFBase):
    """DeepFloyd IF stage I from an image: ``image`` forward-diffused to ``strength`` of the schedule, then denoised
    with the text; diffusers' ``IFImg2ImgPipeline`` call with ``key=``."""

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
        key: jax.Array | None = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clean_caption: bool = True,
        latents: Any = None,
    ) -> ImagePipelineOutput | tuple:
        """Rework ``image`` (PIL, numpy (B, H, W, 3), or a (B, 3, H, W) array in [-1, 1]); ``latents`` (numpy, the
        image's shape) fixes the noise it is diffused with."""
        request = dif.if_request(
            self.unet.config, prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps, eta=eta, output_type=output_type, guidance_scale=guidance_scale,
            latents=latents, clean_caption=clean_caption, image=image, strength=strength,
        )  # fmt: skip
        return self._run(request, key, clean_caption, return_dict)


class IFInpaintingPipeline(_IFBase):
    """DeepFloyd IF stage I inpainting: redraws ``image`` where ``mask_image`` is 1, keeping the rest; diffusers'
    ``IFInpaintingPipeline`` call with ``key=``."""

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
        key: jax.Array | None = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clean_caption: bool = True,
        latents: Any = None,
    ) -> ImagePipelineOutput | tuple:
        """Inpaint ``image`` (as for img2img) under ``mask_image`` (PIL, or (H, W) / (B, H, W) / (B, 1, H, W) in
        [0, 1], thresholded at 0.5)."""
        if mask_image is None:
            raise ValueError("mask_image: IFInpaintingPipeline needs a mask (1 where the image is redrawn)")
        request = dif.if_request(
            self.unet.config, prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps, eta=eta, output_type=output_type, guidance_scale=guidance_scale,
            latents=latents, clean_caption=clean_caption, image=image, strength=strength, mask_image=mask_image,
        )  # fmt: skip
        return self._run(request, key, clean_caption, return_dict)


class IFImg2ImgSuperResolutionPipeline(_IFBase):
    """DeepFloyd IF stage II from an image: ``original_image`` diffused to ``strength``, denoised next to the upscaled
    noise-augmented ``image``; diffusers' ``IFImg2ImgSuperResolutionPipeline`` call with ``key=``."""

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
        key: jax.Array | None = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        noise_level: int = 250,
        clean_caption: bool = True,
        latents: Any = None,
    ) -> ImagePipelineOutput | tuple:
        """``image``: the low-res input (as for IFSuperResolutionPipeline); ``original_image``: the full-size start."""
        request = dif.if_request(
            self.unet.config, prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps, eta=eta, output_type=output_type, guidance_scale=guidance_scale,
            latents=latents, clean_caption=clean_caption, image=image, original_image=original_image,
            strength=strength, noise_level=noise_level, stage2=True,
        )  # fmt: skip
        return self._run(request, key, clean_caption, return_dict)


class IFInpaintingSuperResolutionPipeline(_IFBase):
    """DeepFloyd IF stage II inpainting: ``original_image`` redrawn under ``mask_image`` next to the upscaled
    noise-augmented ``image``; diffusers' ``IFInpaintingSuperResolutionPipeline`` call with ``key=``."""

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
        key: jax.Array | None = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        noise_level: int = 0,
        clean_caption: bool = True,
        latents: Any = None,
    ) -> ImagePipelineOutput | tuple:
        """As IFImg2ImgSuperResolutionPipeline, keeping ``original_image`` where ``mask_image`` is 0."""
        if mask_image is None:
            raise ValueError("mask_image: IFInpaintingSuperResolutionPipeline needs a mask (1 where redrawn)")
        request = dif.if_request(
            self.unet.config, prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps, eta=eta, output_type=output_type, guidance_scale=guidance_scale,
            latents=latents, clean_caption=clean_caption, image=image, original_image=original_image,
            strength=strength, noise_level=noise_level, stage2=True, mask_image=mask_image,
        )  # fmt: skip
        return self._run(request, key, clean_caption, return_dict)
