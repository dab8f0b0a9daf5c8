"""Flax image-conditioned Stable Diffusion pipelines: ``StableDiffusionImg2ImgPipeline``,
``StableDiffusionInpaintPipeline`` and ``StableDiffusionInstructPix2PixPipeline``.

The recipe (image/mask preprocessing, ``strength`` start, noised start, extra UNet channels) is
``diffusion_core.pipelines.sd_image``. ``latents=`` (numpy) is always the starting Gaussian draw: img2img and
inpaint (strength < 1) add it to the encoded image at the start timestep; pure noise (inpaint at strength 1,
InstructPix2Pix) is scaled by ``init_noise_sigma``. VAE posterior draws of image ``b`` come from
``fold_in(key_b, POSTERIOR_STREAM + s)`` (``s`` = 0 for the image, 1 for the masked image), so ``key=`` is
needed even with ``latents=``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffusion_core.flax.pipelines.sd_base import Run, StableDiffusionBase, call_options
from diffusion_core.flax.pipelines.sd_program import vae_encode_mode, vae_encode_sample
from diffusion_core.pipelines import ImagePipelineOutput, conditioning, sd_image
from diffusion_core.pipelines import stable_diffusion as sd


class _ImageConditioned(StableDiffusionBase):
    """Encodes the conditioning images of a call with the VAE."""

    def _latent_channels(self) -> int:
        return int(self.vae.config["latent_channels"])

    def _sampled_latents(self, pixels: np.ndarray, keys: jax.Array, stream: int) -> jax.Array:
        """(b, 3, H, W) pixels -> scaled posterior draws (N, C, h, w), one per generated image (tiled first)."""
        tiled = sd_image.image_batch(jnp.asarray(pixels), keys.shape[0])  # (N, 3, H, W)
        return sd.scale_latents(vae_encode_sample(self.vae, tiled, keys, stream), self.vae.config)


class StableDiffusionImg2ImgPipeline(_ImageConditioned):
    """Image-to-image (SDEdit, Meng et al. 2022): noise the encoded image to ``strength``, then denoise."""

    _legacy_scheduler_options = ("steps_offset", "clip_sample")

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
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
        clip_skip: int | None = None,
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Repaint ``image`` toward ``prompt``; ``strength`` in [0, 1] is how much of the schedule runs."""
        options = call_options(num_inference_steps, num_images_per_prompt, eta, output_type, clip_skip)
        batch = self._common_checks(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, options)
        pixels = sd_image.preprocess_image(sd_image.require_image(image, "image"), self.vae_scale_factor)
        sd_image.strength_start(self.scheduler, num_inference_steps, strength)  # checked before the VAE work
        g = sd.guidance(guidance_scale, 0.0, self.unet.config)
        run = self._run(
            g, pixels.shape[2:], batch * num_images_per_prompt, num_inference_steps, eta, parallel, mesh,
            scalars=(("guidance_scale", float(guidance_scale)),), strength=strength, channels=self._latent_channels(),
        )  # fmt: skip
        context = self.encode_prompt(
            prompt, num_images_per_prompt, g, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip
        )
        latents = self._denoise(run, context, key, latents, {"pixels": pixels})
        return self._decode(latents, output_type, return_dict)

    def _needs_key(self, options: dict) -> bool:
        return True

    def _inputs(self, run: Run, keys: jax.Array, start: np.ndarray | None, options: dict) -> dict[str, Any]:
        inputs = super()._inputs(run, keys, start, options)
        inputs["image_latents"] = self._sampled_latents(options["pixels"], keys, 0)
        return inputs

    def _start(self, inputs: dict, state: Any, run: Run) -> jax.Array:
        return sd_image.noised_start(self.scheduler, state, inputs["image_latents"], inputs["noise"], run.first)


class StableDiffusionInpaintPipeline(_ImageConditioned):
    """Inpainting (Rombach et al. 2022): a 9-channel UNet sees ``cat([x_t, mask, masked image latents])``; a
    4-channel (text-to-image) UNet keeps the re-noised original outside the mask after every step."""

    _legacy_scheduler_options = ("steps_offset", "skip_prk_steps")

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
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
        clip_skip: int | None = None,
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Repaint the white (>= 0.5) region of ``mask_image`` in ``image`` following ``prompt``."""
        options = call_options(num_inference_steps, num_images_per_prompt, eta, output_type, clip_skip)
        batch = self._common_checks(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, options)
        # blend: a text-to-image (4-channel) UNet keeps the known region after each step
        blend, size, pixels, mask = sd_image.inpaint_inputs(
            self.unet.config, self.vae.config, image, mask_image, (height, width),
            (self.scheduler, num_inference_steps, strength), type(self).__name__,
        )  # fmt: skip
        channels = self._latent_channels()
        g = sd.guidance(guidance_scale, 0.0, self.unet.config)
        run = self._run(
            g, size, batch * num_images_per_prompt, num_inference_steps, eta, parallel, mesh,
            scalars=(("guidance_scale", float(guidance_scale)),), strength=strength, channels=channels,
        )  # fmt: skip
        context = self.encode_prompt(
            prompt, num_images_per_prompt, g, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip
        )
        options = {"pixels": pixels, "mask": mask, "image_latents": strength < 1.0 or blend, "blend": blend}
        return self._decode(self._denoise(run, context, key, latents, options), output_type, return_dict)

    def _needs_key(self, options: dict) -> bool:
        return True

    def _inputs(self, run: Run, keys: jax.Array, start: np.ndarray | None, options: dict) -> dict[str, Any]:
        inputs = super()._inputs(run, keys, start, options)
        pixels, mask = options["pixels"], jnp.asarray(options["mask"])
        if options["image_latents"]:
            inputs["image_latents"] = self._sampled_latents(pixels, keys, 0)
        if not options["blend"]:  # the 9-channel UNet's masked-image channels
            masked = conditioning.masked_image(jnp.asarray(pixels), mask)  # (b, 3, H, W), repaint region zeroed
            inputs["masked_latents"] = self._sampled_latents(masked, keys, 1)
        small = conditioning.resize_nearest(mask, run.latent_shape[2], run.latent_shape[3])  # (b, 1, h, w)
        inputs["mask"] = sd_image.image_batch(small, run.latent_shape[0], "mask_image")
        return inputs

    def _start(self, inputs: dict, state: Any, run: Run) -> jax.Array:
        if run.strength >= 1.0:  # pure noise, as diffusers (also when image latents are kept for blending)
            return super()._start(inputs, state, run)
        return sd_image.noised_start(self.scheduler, state, inputs["image_latents"], inputs["noise"], run.first)

    def _extra(self, inputs: dict, guidance: sd.Guidance) -> jax.Array | None:
        if "masked_latents" not in inputs:  # static: the rows' layout is part of the program key
            return None
        return sd_image.inpaint_extra(inputs["mask"], inputs["masked_latents"], guidance.parts)

    def _post_step(self, inputs: dict, run: Run) -> Callable | None:
        """4-channel UNets: after each step, the re-noised original outside the mask (diffusers' blend)."""
        if "masked_latents" in inputs:
            return None
        scheduler, image_latents, noise, mask = self.scheduler, inputs["image_latents"], inputs["noise"], inputs["mask"]
        return lambda x, state: sd_image.keep_known_region(scheduler, state, x, image_latents, noise, mask)


class StableDiffusionInstructPix2PixPipeline(_ImageConditioned):
    """Instruction-following image editing (Brooks et al. 2023): image latents as extra UNet channels."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 1.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        key: jax.Array | None = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Edit ``image`` as ``prompt`` says; ``image_guidance_scale`` pulls toward the input image."""
        options = call_options(num_inference_steps, num_images_per_prompt, eta, output_type, None)
        batch = self._common_checks(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, options)
        channels = self._latent_channels()
        sd_image.check_unet_channels(self.unet.config, channels, channels, type(self).__name__)
        pixels = sd_image.preprocess_image(sd_image.require_image(image, "image"), self.vae_scale_factor)
        g = sd.guidance(guidance_scale, 0.0, self.unet.config, image_guidance_scale)
        scalars = (("guidance_scale", float(guidance_scale)), ("image_guidance_scale", float(image_guidance_scale)))
        run = self._run(
            g, pixels.shape[2:], batch * num_images_per_prompt, num_inference_steps, eta, parallel, mesh,
            scalars=scalars, channels=channels,
        )  # fmt: skip
        context = self.encode_prompt(
            prompt, num_images_per_prompt, g, negative_prompt, prompt_embeds, negative_prompt_embeds
        )
        latents = self._denoise(run, context, key, latents, {"pixels": pixels})
        return self._decode(latents, output_type, return_dict)

    def _inputs(self, run: Run, keys: jax.Array, start: np.ndarray | None, options: dict) -> dict[str, Any]:
        inputs = super()._inputs(run, keys, start, options)
        mode = vae_encode_mode(self.vae, jnp.asarray(options["pixels"]))  # unscaled, as diffusers
        inputs["image_latents"] = sd_image.image_batch(mode, run.latent_shape[0])
        return inputs

    def _extra(self, inputs: dict, guidance: sd.Guidance) -> jax.Array:
        return sd_image.pix2pix_extra(inputs["image_latents"], guidance.parts)
