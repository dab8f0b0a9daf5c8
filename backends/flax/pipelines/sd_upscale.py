"""Flax Stable Diffusion upscalers: ``StableDiffusionUpscalePipeline`` (x4, pixel-conditioned) and
``StableDiffusionLatentUpscalePipeline`` (x2, in latent space with Karras preconditioning).

The recipes are ``diffusion_core.pipelines.sd_recipes`` (``UpscaleRecipe``, ``LatentUpscaleRecipe``). The x4
upscaler noises prompt image ``b`` with noise drawn from
``fold_in(key_b, LOW_RES_STREAM)``; every image generated for that prompt sees the same noised image, as diffusers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffusion_core.flax.pipelines.sd_base import Run, StableDiffusionBase
from diffusion_core.flax.pipelines.sd_program import POSTERIOR_STREAM, encode_text_unnormed, vae_encode_sample
from diffusion_core.flax.sampling import per_example_normal
from diffusion_core.pipelines import ImagePipelineOutput
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.sd_recipes import LatentUpscaleRecipe, UpscaleRecipe

LOW_RES_STREAM = POSTERIOR_STREAM - 1  # key stream of the low-res image noise (below the posterior streams)


class StableDiffusionUpscalePipeline(UpscaleRecipe, StableDiffusionBase):
    """Text-guided x4 super-resolution; diffusers' ``StableDiffusionUpscalePipeline`` for Flax."""

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
        request = self._request(locals())  # first: the call's parameters
        pixels, size = self._low_res_pixels(request, image, noise_level)
        scalars = (*request.scalars, ("noise_level", float(noise_level)))
        run = self._run(request, size, parallel, mesh, channels=self._latent_channels(), scalars=scalars)
        options = {"pixels": pixels, "noise_level": int(noise_level)}
        return self._generate(run, request, key, latents, options, return_dict)

    def _needs_key(self, options: dict) -> bool:
        return True

    def _inputs(self, run: Run, keys: jax.Array, start: np.ndarray | None, options: dict) -> dict[str, Any]:
        inputs = super()._inputs(run, keys, start, options)
        low_res = jnp.asarray(options["pixels"])  # (B, 3, h, w)
        draw_keys = jax.vmap(lambda k: jax.random.fold_in(k, LOW_RES_STREAM))(keys[: low_res.shape[0]])
        noise = per_example_normal(draw_keys, low_res.shape[1:])
        inputs["low_res"] = self._noised_low_res(low_res, noise, options["noise_level"], run.latent_shape[0])
        return inputs


class StableDiffusionLatentUpscalePipeline(LatentUpscaleRecipe, StableDiffusionBase):
    """2x upscaling in latent space; diffusers' ``StableDiffusionLatentUpscalePipeline`` for Flax."""

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
        request, embeds = self._latent_upscale_request(locals())  # first: the call's parameters
        given, pixels, (channels, h, w) = self._low_res_input(image, request.prompts)
        hidden, time_cond = self._pooled_context(request, embeds)
        scale = self.vae_scale_factor
        run = self._run(request, (2 * h * scale, 2 * w * scale), parallel, mesh, channels=channels)
        options = {"context": hidden, "time_cond": time_cond, "latents": given, "pixels": pixels}
        return self._generate(run, request, key, latents, options, return_dict)

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
        inputs["low_res"] = jnp.asarray(low, jnp.float32)  # (B, C, h, w) scaled latents
        inputs["time_cond"] = options["time_cond"]  # (parts * B, T)
        return inputs
