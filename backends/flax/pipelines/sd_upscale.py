"""Flax Stable Diffusion upscalers: ``StableDiffusionUpscalePipeline`` (x4, pixel-conditioned) and
``StableDiffusionLatentUpscalePipeline`` (x2, in latent space with Karras preconditioning).

The math is ``diffusion_core.pipelines.conditioning`` (``upscaler_condition``, ``latent_upscaler_*``) and
``sd_image.upscaler_inputs``. The x4 upscaler noises prompt image ``b`` with noise drawn from
``fold_in(key_b, LOW_RES_STREAM)``; every image generated for that prompt sees the same noised image, as diffusers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffusion_core.flax.pipelines.sd_base import (
    Run,
    StableDiffusionBase,
    call_options,
    guided_to_rows,
    rows_to_guided,
)
from diffusion_core.flax.pipelines.sd_program import POSTERIOR_STREAM, encode_text_unnormed, vae_encode_sample
from diffusion_core.flax.sampling import per_example_normal
from diffusion_core.pipelines import ImagePipelineOutput, conditioning, sd_image
from diffusion_core.pipelines import stable_diffusion as sd

LOW_RES_STREAM = POSTERIOR_STREAM - 1  # key stream of the low-res image noise (below the posterior streams)


class StableDiffusionUpscalePipeline(StableDiffusionBase):
    """Text-guided x4 super-resolution; diffusers' ``StableDiffusionUpscalePipeline`` for Flax."""

    _components = (
        "vae",
        "text_encoder",
        "tokenizer",
        "unet",
        "low_res_scheduler",
        "scheduler",
        "safety_checker",
        "feature_extractor",
        "watermarker",
    )
    _optional_components = ("safety_checker", "feature_extractor", "watermarker")

    @property
    def max_noise_level(self) -> int:
        return sd_image.upscaler_max_noise_level(self.settings)

    def _vae_config(self) -> dict[str, Any]:
        return sd_image.upscaler_vae_config(self.vae.config)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        num_inference_steps: int = 75,
        guidance_scale: float = 9.0,
        noise_level: int = 20,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        key: jax.Array | None = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clip_skip: int | None = None,
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Upscale ``image`` (one per prompt) guided by ``prompt``; ``noise_level`` in [0, max_noise_level]."""
        options = call_options(num_inference_steps, num_images_per_prompt, eta, output_type, clip_skip)
        prompts = self._common_checks(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, options)
        conditioning.check_noise_level(noise_level, self.max_noise_level)
        if image is None:
            raise ValueError("image: the low-resolution image is required (PIL image(s) or numpy in [0, 1])")
        pixels = sd_image.preprocess_image(image, self.vae_scale_factor, resample="bicubic")  # (B, 3, h, w)
        if pixels.shape[0] != prompts:
            raise ValueError(f"image: {pixels.shape[0]} images for {prompts} prompts; pass one image per prompt")
        channels = int(self.vae.config["latent_channels"])
        sd_image.check_unet_channels(self.unet.config, channels, int(pixels.shape[1]), type(self).__name__)
        g = sd.guidance(guidance_scale, 0.0, self.unet.config)
        scale = self.vae_scale_factor
        run = self._run(
            g, (pixels.shape[2] * scale, pixels.shape[3] * scale), prompts * num_images_per_prompt,
            num_inference_steps, eta, parallel, mesh, channels=channels,
            scalars=(("guidance_scale", float(guidance_scale)), ("noise_level", float(noise_level))),
        )  # fmt: skip
        context = self.encode_prompt(
            prompt, num_images_per_prompt, g, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip
        )
        latents = self._denoise(run, context, key, latents, {"pixels": pixels, "noise_level": int(noise_level)})
        return self._decode(latents, output_type, return_dict)

    def _needs_key(self, options: dict) -> bool:
        return True

    def _inputs(self, run: Run, keys: jax.Array, start: np.ndarray | None, options: dict) -> dict[str, Any]:
        inputs = super()._inputs(run, keys, start, options)
        low_res = jnp.asarray(options["pixels"])  # (B, 3, h, w)
        prompts = low_res.shape[0]
        draw_keys = jax.vmap(lambda k: jax.random.fold_in(k, LOW_RES_STREAM))(keys[:prompts])
        noise = per_example_normal(draw_keys, low_res.shape[1:])
        level = options["noise_level"]
        noised, _ = conditioning.upscaler_condition(self.low_res_scheduler, low_res, noise, level, self.max_noise_level)
        inputs["low_res"] = jnp.concatenate([noised] * (run.latent_shape[0] // prompts))  # (N, 3, h, w), tiled
        return inputs

    def _extra(self, inputs: dict, guidance: sd.Guidance) -> jax.Array:
        return jnp.concatenate([inputs["low_res"]] * guidance.parts) if guidance.parts > 1 else inputs["low_res"]

    def _model_fn(
        self, nets: dict, inputs: dict, guidance: sd.Guidance, run: Run, scalars: dict, state: Any
    ) -> Callable:
        unet, context, extra = nets["unet"], inputs["context"], self._extra(inputs, guidance)
        labels = jnp.full((extra.shape[0],), scalars["noise_level"]).astype(jnp.int32)  # (parts * b,) noise level

        def model_fn(x, t):
            out = unet(sd.model_input(x, guidance, extra), t, context, class_labels=labels)
            return sd.combine(out, guidance)

        return model_fn


class StableDiffusionLatentUpscalePipeline(StableDiffusionBase):
    """2x upscaling in latent space; diffusers' ``StableDiffusionLatentUpscalePipeline`` for Flax."""

    _components = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    _optional_components = ()
    _indexed_model_fn = True

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        num_inference_steps: int = 75,
        guidance_scale: float = 9.0,
        negative_prompt: str | list[str] | None = None,
        key: jax.Array | None = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        pooled_prompt_embeds: Any = None,
        negative_pooled_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Upscale ``image`` (latents (B, 4, h, w) from an SD run with ``output_type="latent"``, or images) 2x."""
        embeds = (prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds)
        batch, prompt, g = sd_image.check_latent_upscaler_call(
            prompt, negative_prompt, embeds, image, guidance_scale, num_inference_steps, output_type,
            self.text_encoder.config,
        )  # fmt: skip
        given = tuple(None if e is None else jnp.asarray(e) for e in embeds)
        hidden, pooled = sd.encode_prompt_pairs(
            self._encode_pair, self.tokenizer, prompt, negative_prompt, given, g.parts > 1
        )
        options = self._low_res(image, batch)
        channels, h, w = options["shape"]
        sd_image.check_unet_channels(self.unet.config, channels, channels, type(self).__name__)
        scale = self.vae_scale_factor
        run = self._run(
            g, (2 * h * scale, 2 * w * scale), batch, num_inference_steps, 0.0, parallel, mesh, channels=channels,
            scalars=(("guidance_scale", float(guidance_scale)),),
        )  # fmt: skip
        options["time_cond"] = conditioning.latent_upscaler_timestep_cond(pooled)  # (parts * B, 64 + 64 + D)
        return self._decode(self._denoise(run, hidden, key, latents, options), output_type, return_dict)

    def _low_res(self, image: Any, batch: int) -> dict[str, Any]:
        """The low-res input: latents (B, C, h, w) as given, or images (B, 3, H, W) to VAE-encode in ``_inputs``."""
        channels = int(self.vae.config["latent_channels"])
        if isinstance(image, (np.ndarray, jax.Array)) and image.ndim == 4 and image.shape[1] == channels:
            given, pixels, size = jnp.asarray(image, jnp.float32), None, tuple(image.shape[2:])
        else:
            pixels = sd_image.preprocess_image(image, self.vae_scale_factor)
            given, size = None, (pixels.shape[2] // self.vae_scale_factor, pixels.shape[3] // self.vae_scale_factor)
        count = (given if given is not None else pixels).shape[0]
        if count != batch:
            raise ValueError(f"image: {count} images for {batch} prompts; pass one per prompt")
        return {"latents": given, "pixels": pixels, "shape": (channels, *size)}

    def _encode_pair(self, ids: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """(B, L) ids -> (the last layer's hidden states before the final norm (B, L, D), pooled (B, D))."""
        return encode_text_unnormed(self.text_encoder, jnp.asarray(ids))

    def _needs_key(self, options: dict) -> bool:
        return options["latents"] is None  # images are VAE-encoded with a posterior draw

    def _inputs(self, run: Run, keys: jax.Array, start: np.ndarray | None, options: dict) -> dict[str, Any]:
        inputs = super()._inputs(run, keys, start, options)
        low = options["latents"]
        if low is None:
            draw = vae_encode_sample(self.vae, jnp.asarray(options["pixels"]), keys, 0)
            low = sd.scale_latents(draw, self.vae.config)
        inputs["low_res"] = low  # (B, C, h, w) scaled latents
        inputs["time_cond"] = guided_to_rows(options["time_cond"], run.guidance.parts)  # (B, parts, T)
        return inputs

    def _model_fn(
        self, nets: dict, inputs: dict, guidance: sd.Guidance, run: Run, scalars: dict, state: Any
    ) -> Callable:
        """The preconditioned, guided denoiser ``D(x; sigma_i)`` at model call ``i``."""
        unet, hidden = nets["unet"], inputs["context"]
        image_cond = conditioning.latent_upscaler_image_cond(jnp.concatenate([inputs["low_res"]] * guidance.parts))
        time_cond = rows_to_guided(inputs["time_cond"])  # (parts * b, T)
        sigmas = state.sigmas

        def model_fn(x, t, i):
            sigma = sigmas[i]
            x_in = sd.model_input(x, guidance, image_cond)  # (parts * b, 2C, H, W)
            out = unet(x_in, conditioning.latent_upscaler_timestep(sigma), hidden, timestep_cond=time_cond)
            sample = sd.model_input(x, guidance) * jnp.sqrt(sigma**2 + 1)  # the unscaled x, repeated per part
            return sd.combine(conditioning.latent_upscaler_precondition(sample, out, sigma), guidance)

        return model_fn
