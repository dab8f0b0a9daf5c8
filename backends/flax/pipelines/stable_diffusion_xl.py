"""Flax SDXL pipelines: ``StableDiffusionXLPipeline``, ``StableDiffusionXLImg2ImgPipeline`` (the refiner) and
``StableDiffusionXLInpaintPipeline``, ``StableDiffusionXLControlNetPipeline``.

The recipes are ``diffusion_core.pipelines.sdxl_recipes``; this module binds the two text encoders and the
per-image inputs of the compiled program (``text_embeds`` and ``time_ids`` travel in guidance-batch order like the
text context). ``latents=`` is the starting Gaussian draw for text to image, and the starting latents used as they
are for img2img (as diffusers). Image ``b``'s VAE posterior draw comes from ``fold_in(key_b, POSTERIOR_STREAM)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from diffusion_core.flax.pipelines.sd_base import Run, StableDiffusionBase
from diffusion_core.flax.pipelines.sd_image import StableDiffusionInpaintPipeline
from diffusion_core.flax.pipelines.sd_program import encode_text_layer, vae_encode_sample
from diffusion_core.pipelines import ImagePipelineOutput, sd_image, sd_recipe, sdxl
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.sd_recipe import SDRequest
from diffusion_core.pipelines.sd_recipes import inpaint_needs_image_latents
from diffusion_core.pipelines.sdxl_recipes import (
    SDXLControlNetRecipe,
    SDXLImg2ImgRecipe,
    SDXLInpaintRecipe,
    SDXLTextToImageRecipe,
)

__all__ = [
    "StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLPipeline",
]


class SDXLBase(StableDiffusionBase):
    """Flax primitives of the SDXL recipes: both text encoders; the added conditioning as per-image inputs."""

    def _encode_layers(self, index: int, ids: np.ndarray, clip_skip: int | None) -> tuple[jax.Array, Any]:
        """(B, L) ids -> (layer ``-(2 + clip_skip)`` (B, L, D), projected pooled text (B, P) or None)."""
        return encode_text_layer(self._text_encoders()[index], jnp.asarray(ids), -(2 + (clip_skip or 0)))

    _upcast: tuple[Any, Any] = (None, None)  # (the float16 VAE, its float32 copy)

    def _decoding_vae(self) -> nnx.Module:
        """A float16 VAE whose config says ``force_upcast`` decodes as a float32 copy (SDXL's VAE overflows in
        float16), made once per VAE."""
        vae = self.vae
        if jnp.dtype(vae.dtype) != jnp.float16 or not vae.config.get("force_upcast", False):
            return vae
        if self._upcast[0] is not vae:
            copy = nnx.eval_shape(lambda: type(vae).from_config(vae.config, dtype=jnp.float32))
            nnx.update(copy, jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), nnx.state(vae)))
            self._upcast = (vae, copy)
        return self._upcast[1]

    def _conditioned(self, request: SDRequest, cond: sdxl.SDXLConditions) -> dict[str, Any]:
        """The ``_generate`` options: the text context and the added conditioning (``added``)."""
        inputs = self._sdxl_inputs(request, cond)
        return {"context": inputs.pop("context"), "added": inputs}

    def _inputs(self, run: Run, keys: jax.Array, start: np.ndarray | None, options: dict) -> dict[str, Any]:
        return {**super()._inputs(run, keys, start, options), **options["added"]}


class StableDiffusionXLPipeline(SDXLTextToImageRecipe, SDXLBase):
    """SDXL text to image (Podell et al. 2023); diffusers' ``StableDiffusionXLPipeline`` for Flax."""

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
        key: jax.Array | None = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        pooled_prompt_embeds: Any = None,
        negative_pooled_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt`` (``prompt_2`` for the second encoder); ``latents`` (numpy (N, C, h, w))
        fixes the starting draw, else ``key``; ``denoising_end`` stops early (``output_type="latent"``: the
        refiner's input). ``parallel="pmap"`` / ``mesh=`` spread the images over devices."""
        a = locals()  # first: the call's parameters
        request = self._request(a)
        size = sd.resolve_size(height, width, self.unet.config, self.vae.config)
        cond = sdxl.sdxl_conditions(request, a, sdxl.base_time_ids(a, size))
        opts = (("custom", sd_recipe.custom_schedule(timesteps, sigmas)), ("denoising_end", cond.denoising_end))
        run = self._run(request, size, parallel, mesh, opts=opts)
        return self._generate(run, request, key, latents, self._conditioned(request, cond), return_dict)


class StableDiffusionXLImg2ImgPipeline(SDXLImg2ImgRecipe, SDXLBase):
    """SDXL img2img and the refiner; diffusers' ``StableDiffusionXLImg2ImgPipeline`` for Flax."""

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
        key: jax.Array | None = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        pooled_prompt_embeds: Any = None,
        negative_pooled_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
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
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Repaint ``image`` (pixels, or latents such as the base pipeline's ``output_type="latent"``) toward
        ``prompt``: ``strength`` of the schedule, or from ``denoising_start`` on; ``latents`` are the start."""
        a = locals()  # first: the call's parameters
        request = self._request(a)
        image = sd_image.require_image(image, "image")
        given = np.asarray(image, np.float32) if self._latent_image(image) else None
        pixels = None if given is not None else sd_image.preprocess_image(image, self.vae_scale_factor)
        scale = self.vae_scale_factor
        size = pixels.shape[2:] if given is None else (given.shape[2] * scale, given.shape[3] * scale)
        cond = sdxl.sdxl_conditions(
            request, a, sdxl.refiner_time_ids(a, tuple(int(s) for s in size), self._aesthetics())
        )
        self._img2img_checks(cond, num_inference_steps, strength)
        opts = (
            ("strength", strength), ("as_given", latents is not None or cond.denoising_start is not None),
            ("denoising_start", cond.denoising_start), ("denoising_end", cond.denoising_end),
        )  # fmt: skip
        run = self._run(request, size, parallel, mesh, opts=opts, channels=self._latent_channels())
        encode = pixels is not None and latents is None  # with latents= the image is not encoded, as diffusers
        options = {**self._conditioned(request, cond), "pixels": pixels, "given": given, "encode": encode}
        return self._generate(run, request, key, latents, options, return_dict)

    def _aesthetics(self) -> bool:
        return bool(self.setting("requires_aesthetics_score"))

    def _needs_key(self, options: dict) -> bool:
        return options["encode"]  # the VAE posterior draw

    def _inputs(self, run: Run, keys: jax.Array, start: np.ndarray | None, options: dict) -> dict[str, Any]:
        """``image_latents``: ``latents=`` as given, the latent ``image`` tiled, or the encoded pixels."""
        inputs = super()._inputs(run, keys, start, options)
        if start is not None:
            inputs["image_latents"] = inputs["noise"]
        elif options["given"] is not None:
            inputs["image_latents"] = sd_image.image_batch(jnp.asarray(options["given"]), keys.shape[0], "image")
        else:
            tiled = sd_image.image_batch(jnp.asarray(options["pixels"]), keys.shape[0])  # (N, 3, H, W)
            inputs["image_latents"] = sd.scale_latents(vae_encode_sample(self.vae, tiled, keys, 0), self.vae.config)
        return inputs


class StableDiffusionXLInpaintPipeline(SDXLInpaintRecipe, SDXLBase, StableDiffusionInpaintPipeline):
    """SDXL inpainting; diffusers' ``StableDiffusionXLInpaintPipeline`` for Flax (inputs as SD inpainting's)."""

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
        key: jax.Array | None = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        pooled_prompt_embeds: Any = None,
        negative_pooled_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
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
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Repaint the white (>= 0.5) region of ``mask_image`` in ``image`` following ``prompt``; ``latents``
        (numpy (N, C, h, w)) is the starting Gaussian draw."""
        a = locals()  # first: the call's parameters
        request = self._request(a)
        blend, size, pixels, mask = sd_image.inpaint_inputs(
            self.unet.config, self.vae.config, image, mask_image, (height, width),
            (self.scheduler, num_inference_steps, strength), type(self).__name__,
        )  # fmt: skip
        aesthetics = bool(self.setting("requires_aesthetics_score"))
        cond = sdxl.sdxl_conditions(request, a, sdxl.refiner_time_ids(a, size, aesthetics))
        opts = (("strength", strength), ("denoising_end", cond.denoising_end))
        run = self._run(request, size, parallel, mesh, opts=opts, channels=self._latent_channels())
        needs = inpaint_needs_image_latents(strength, blend)
        options = {"pixels": pixels, "mask": mask, "image_latents": needs, "blend": blend}
        return self._generate(run, request, key, latents, {**options, **self._conditioned(request, cond)}, return_dict)


class StableDiffusionXLControlNetPipeline(SDXLControlNetRecipe, SDXLBase):
    """SDXL with one ``ControlNetModel`` or several (``MultiControlNetModel``); diffusers'
    ``StableDiffusionXLControlNetPipeline`` for Flax."""

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
        key: jax.Array | None = None,
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
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt`` following the control ``image`` (edges, depth, pose, ...)."""
        a = locals()  # first: the call's parameters
        request = self._request(a)
        control, size, opts, scalars = self._control_inputs(
            request, image, (height, width), guess_mode, controlnet_conditioning_scale,
            (control_guidance_start, control_guidance_end),
        )  # fmt: skip
        cond = sdxl.sdxl_conditions(request, a, sdxl.base_time_ids(a, size))
        run = self._run(request, size, parallel, mesh, scalars=scalars, opts=opts)
        options = {**self._conditioned(request, cond), "control": control}
        return self._generate(run, request, key, latents, options, return_dict)

    def _inputs(self, run: Run, keys: jax.Array, start: np.ndarray | None, options: dict) -> dict[str, Any]:
        return {**super()._inputs(run, keys, start, options), "control": options["control"]}  # (N, 3, H, W)
