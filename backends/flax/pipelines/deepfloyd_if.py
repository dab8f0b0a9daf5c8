"""DeepFloyd IF for Flax NNX: ``IFPipeline`` (stage I) and ``IFSuperResolutionPipeline`` (stage II).

The request checks and the recipe are the core's ``diffusion_core.pipelines.deepfloyd_if``, shared with torch;
this module binds them to NNX modules, keys and one compiled ``lax.scan`` (cached per shapes and scheduler).
Image ``b`` starts from ``normal(fold_in(key, b))``, draws its step noise from ``fold_in(that key, i)`` and
stage II's augmentation noise from ``fold_in(that key, AUGMENT_FOLD)``, so ``parallel="pmap"`` / ``mesh=`` (the
batch split over devices, as the SD pipelines do) give the images of one device.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline, scale_out_mode
from diffusion_core.flax.pipelines.sd_base import guided_to_rows, rows_to_guided
from diffusion_core.flax.pipelines.sd_program import pack_rows, unpack_rows
from diffusion_core.flax.sampling import denoise_loop, per_example_keys, per_example_normal
from diffusion_core.pipelines import ImagePipelineOutput
from diffusion_core.pipelines import deepfloyd_if as dif
from diffusion_core.pipelines import stable_diffusion as sd

AUGMENT_FOLD = 2**31 - 1  # fold_in index of stage II's augmentation noise (step noise uses the call index)
_GUIDED = ("context", "extra", "labels")  # program inputs in guidance-batch order (parts * N, ...)


class _IFBase(dif.IFRecipe, DiffusionPipeline):
    """Flax primitives of the IF recipe: text encoding, keys, the compiled loop."""

    def _embeds_array(self, value: Any) -> jax.Array:
        return jnp.asarray(np.asarray(value), jnp.float32).astype(self.unet.dtype)

    def _encode_ids(self, ids: np.ndarray, mask: np.ndarray) -> jax.Array:
        """(B, L) ids and attention mask -> (B, L, D) T5 states: ``text_encoder(input_ids, attention_mask=mask)[0]``."""
        return self.text_encoder(jnp.asarray(ids), attention_mask=jnp.asarray(mask))[0]

    def _program(self, graphdef: Any, request: dif.IFRequest, step_kwargs: dict[str, Any], first: int, unravel: Any):
        """``(params, state, rows, keys) -> x``: the guided loop over per-image rows (one program for every mode)."""
        scheduler = self.scheduler

        def program(params, state, rows, keys):
            self.trace_count += 1  # runs at trace time only
            unet = nnx.merge(graphdef, params[0])
            inputs = unpack_rows(rows, unravel)
            guided = {k: rows_to_guided(v) for k, v in inputs.items() if k in _GUIDED}
            labels = guided["labels"][:, 0].astype(jnp.int32) if "labels" in guided else None
            model_fn = self._model_fn(unet, guided["context"], request, guided.get("extra"), labels, state)
            steps = inputs.get("steps")  # (b, num_calls, C, H, W) explicit noise, or None
            blend = (inputs["blend_image"], inputs["blend_mask"]) if "blend_mask" in inputs else None
            x, _ = denoise_loop(
                scheduler, model_fn, inputs["x"], state, keys=None if steps is not None else keys, first=first,
                noise_fn=None if steps is None else (lambda i: steps[:, i]), step_kwargs=step_kwargs,
                index_model_fn=True, post_step=self._blend(blend),
            )  # fmt: skip
            return x

        return program

    def _rows(self, request: dif.IFRequest, x, context, extra, labels, noise) -> dict[str, jax.Array]:
        """Per-image program inputs, each (N, ...): guidance-batch inputs as (N, parts, ...) rows."""
        parts = request.guidance.parts
        inputs = {"x": x, "context": guided_to_rows(context, parts)}
        if extra is not None:
            inputs["extra"] = guided_to_rows(extra, parts)
            inputs["labels"] = guided_to_rows(labels[:, None].astype(jnp.float32), parts)
        blend = self._blend_inputs(request, x)
        if blend is not None:
            inputs["blend_image"], inputs["blend_mask"] = blend
        if noise is not None:
            inputs["steps"] = jnp.swapaxes(jnp.asarray(noise.steps, x.dtype), 0, 1)  # (N, num_calls, C, H, W)
        return inputs

    def _run(
        self,
        request: dif.IFRequest,
        key: Any,
        clean_caption: bool,
        return_dict: bool,
        noise: dif.ExplicitNoise | None = None,
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Start noise, (stage II: noisy upscaled image), the compiled guided loop, images.

        ``noise`` replaces the key's draws after the start (tests compare backends on it). ``parallel="pmap"`` /
        ``mesh=`` split the images over devices (``DiffusionPipeline.run_program``); image b keeps its key.
        """
        mode = scale_out_mode(parallel, mesh)
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
        rows, unravel, signature = pack_rows(self._rows(request, x, context, extra, labels, noise))
        graphdef, params = nnx.split(self.unet)
        static = (self._scheduler_key(), tuple(sorted(step_kwargs.items())), request.guidance, request.shape[1:])
        static += (signature, first, self.unet.dtype)
        fn = self.compiled(mode, mesh, static, lambda: self._program(graphdef, request, step_kwargs, first, unravel))

        def make_state(like):  # the schedule for a (per-device) batch of like.shape[0] images
            return self._schedule(request, jnp.zeros((like.shape[0], *request.shape[1:]), x.dtype))[0]

        out = self.run_program(fn, mode, mesh, params, {}, make_state, rows, keys)
        out = np.asarray(jax.device_get(out))
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
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images; ``latents`` (numpy (N, 3, H, W)) fixes the starting draw."""
        request = dif.if_request_from_call(self.unet.config, locals(), self._stage2)
        return self._run(request, key, clean_caption, return_dict, parallel=parallel, mesh=mesh)


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
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Upscale ``image`` (PIL, numpy (B, H, W, 3), or a (B, 3, h, w) array in [-1, 1]) guided by the text."""
        request = dif.if_request_from_call(self.unet.config, locals(), self._stage2)
        return self._run(request, key, clean_caption, return_dict, parallel=parallel, mesh=mesh)


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
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Rework ``image`` (PIL, numpy (B, H, W, 3), or a (B, 3, H, W) array in [-1, 1]); ``latents`` (numpy, the
        image's shape) fixes the noise it is diffused with."""
        request = dif.if_request_from_call(self.unet.config, locals(), self._stage2)
        return self._run(request, key, clean_caption, return_dict, parallel=parallel, mesh=mesh)


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
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Inpaint ``image`` (as for img2img) under ``mask_image`` (PIL, or (H, W) / (B, H, W) / (B, 1, H, W) in
        [0, 1], thresholded at 0.5)."""
        request = dif.if_request_from_call(self.unet.config, locals(), self._stage2, type(self).__name__)
        return self._run(request, key, clean_caption, return_dict, parallel=parallel, mesh=mesh)


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
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """``image``: the low-res input (as for IFSuperResolutionPipeline); ``original_image``: the full-size start."""
        request = dif.if_request_from_call(self.unet.config, locals(), self._stage2)
        return self._run(request, key, clean_caption, return_dict, parallel=parallel, mesh=mesh)


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
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """As IFImg2ImgSuperResolutionPipeline, keeping ``original_image`` where ``mask_image`` is 0."""
        request = dif.if_request_from_call(self.unet.config, locals(), self._stage2, type(self).__name__)
        return self._run(request, key, clean_caption, return_dict, parallel=parallel, mesh=mesh)
