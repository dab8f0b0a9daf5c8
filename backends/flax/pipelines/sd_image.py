"""Flax image-conditioned Stable Diffusion pipelines: ``StableDiffusionImg2ImgPipeline``,
``StableDiffusionInpaintPipeline`` and ``StableDiffusionInstructPix2PixPipeline``.

The recipes (``strength`` start, noised start, extra UNet channels, inpaint blend) are
``diffusion_core.pipelines.sd_recipes``; here the per-image inputs are drawn. ``latents=`` (numpy) is always
the starting Gaussian draw. VAE posterior draws of image ``b`` come from ``fold_in(key_b, POSTERIOR_STREAM + s)``
(``s`` = 0 for the image, 1 for the masked image), so ``key=`` is needed even with ``latents=``, unless
``posterior_noise=`` (numpy, (N, C, h, w) standard normal) gives that draw's noise: img2img's image, inpaint's
masked image (diffusion_core.flax.compat passes diffusers 0.39's draws this way).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffusion_core.flax.pipelines.sd_base import Run, StableDiffusionBase
from diffusion_core.flax.pipelines.sd_program import vae_encode_mode, vae_encode_sample, vae_encode_with_noise
from diffusion_core.pipelines import ImagePipelineOutput, conditioning, sd_image
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.sd_recipe import SDRequest
from diffusion_core.pipelines.sd_recipes import Img2ImgRecipe, InpaintRecipe, Pix2PixRecipe, inpaint_needs_image_latents


class _ImageConditioned(StableDiffusionBase):
    """Encodes the conditioning images of a call with the VAE."""

    def _sampled_latents(self, pixels: np.ndarray, keys: jax.Array, stream: int, noise: Any = None) -> jax.Array:
        """(b, 3, H, W) pixels -> scaled posterior draws (N, C, h, w), one per generated image (tiled first);
        the draw's standard-normal ``noise`` (N, C, h, w) is given or comes from ``keys`` and ``stream``."""
        tiled = sd_image.image_batch(jnp.asarray(pixels), keys.shape[0])  # (N, 3, H, W)
        if noise is None:
            return sd.scale_latents(vae_encode_sample(self.vae, tiled, keys, stream), self.vae.config)
        expected = (keys.shape[0], int(self.vae.config["latent_channels"]), *self._latent_hw(tiled))
        if np.shape(noise) != expected:
            raise ValueError(f"posterior_noise: expected standard-normal noise {expected}, got {np.shape(noise)}")
        return sd.scale_latents(vae_encode_with_noise(self.vae, tiled, jnp.asarray(noise)), self.vae.config)

    def _latent_hw(self, pixels: jax.Array) -> tuple[int, int]:
        """(h, w) of the VAE latents of (N, 3, H, W) ``pixels``."""
        return (pixels.shape[2] // self.vae_scale_factor, pixels.shape[3] // self.vae_scale_factor)


class StableDiffusionImg2ImgPipeline(Img2ImgRecipe, _ImageConditioned):
    """Image-to-image (SDEdit, Meng et al. 2022): noise the encoded image to ``strength``, then denoise."""

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
        posterior_noise: Any = None,
    ) -> ImagePipelineOutput | tuple:
        """Repaint ``image`` toward ``prompt``; ``strength`` in [0, 1] is how much of the schedule runs.
        ``posterior_noise`` (N, C, h, w): the image's VAE posterior draw noise (default: from ``key``)."""
        request = self._request(locals())  # first: the call's parameters
        run, options = self._img2img_run(request, image, (None, None), strength, parallel, mesh)
        options["posterior_noise"] = posterior_noise
        return self._generate(run, request, key, latents, options, return_dict)

    def _img2img_run(
        self, request: SDRequest, image: Any, size: tuple[int | None, int | None], strength: float,
        parallel: str | None, mesh: Mesh | None, opts: tuple = (), scalars: tuple | None = None,
    ) -> tuple[Run, dict[str, Any]]:  # fmt: skip
        """Checks, then ``(run, options for _inputs)``; ``size`` (None: the image's own) and ``opts``/``scalars``:
        the caller's (ControlNet) extras."""
        pixels = sd_image.preprocess_image(sd_image.require_image(image, "image"), self.vae_scale_factor, *size)
        sd_image.strength_start(self.scheduler, request.num_inference_steps, strength)  # checked before the VAE work
        fields = {"opts": (*opts, ("strength", strength)), "channels": self._latent_channels()}
        if scalars is not None:
            fields["scalars"] = scalars
        run = self._run(request, pixels.shape[2:] if None in size else size, parallel, mesh, **fields)
        return run, {"pixels": pixels}

    def _needs_key(self, options: dict) -> bool:
        return options.get("posterior_noise") is None

    def _inputs(self, run: Run, keys: jax.Array, start: np.ndarray | None, options: dict) -> dict[str, Any]:
        inputs = super()._inputs(run, keys, start, options)
        inputs["image_latents"] = self._sampled_latents(options["pixels"], keys, 0, options.get("posterior_noise"))
        return inputs


class StableDiffusionInpaintPipeline(InpaintRecipe, _ImageConditioned):
    """Inpainting (Rombach et al. 2022): a 9-channel UNet sees ``cat([x_t, mask, masked image latents])``; a
    4-channel (text-to-image) UNet keeps the re-noised original outside the mask after every step."""

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
        posterior_noise: Any = None,
    ) -> ImagePipelineOutput | tuple:
        """Repaint the white (>= 0.5) region of ``mask_image`` in ``image`` following ``prompt``.
        ``posterior_noise`` (N, C, h, w): the masked image's VAE posterior draw noise (9-channel UNets only)."""
        request = self._request(locals())  # first: the call's parameters
        run, options = self._inpaint_run(request, image, mask_image, (height, width), strength, parallel, mesh)
        if posterior_noise is not None and options["blend"]:
            raise ValueError("posterior_noise: only for a 9-channel inpainting UNet (its masked-image latents)")
        options["posterior_noise"] = posterior_noise
        return self._generate(run, request, key, latents, options, return_dict)

    def _inpaint_run(
        self, request: SDRequest, image: Any, mask_image: Any, size: tuple[int | None, int | None], strength: float,
        parallel: str | None, mesh: Mesh | None, opts: tuple = (), scalars: tuple | None = None,
    ) -> tuple[Run, dict[str, Any]]:  # fmt: skip
        """Checks, then ``(run, options for _inputs)``; ``opts``/``scalars``: the caller's (ControlNet) extras."""
        # blend: a text-to-image (4-channel) UNet keeps the known region after each step
        blend, size, pixels, mask = sd_image.inpaint_inputs(
            self.unet.config, self.vae.config, image, mask_image, size,
            (self.scheduler, request.num_inference_steps, strength), type(self).__name__,
        )  # fmt: skip
        fields = {"opts": (*opts, ("strength", strength)), "channels": self._latent_channels()}
        if scalars is not None:
            fields["scalars"] = scalars
        run = self._run(request, size, parallel, mesh, **fields)
        needs = inpaint_needs_image_latents(strength, blend)
        return run, {"pixels": pixels, "mask": mask, "image_latents": needs, "blend": blend, "posterior_noise": None}

    def _needs_key(self, options: dict) -> bool:
        return options["image_latents"] or options.get("posterior_noise") is None

    def _inputs(self, run: Run, keys: jax.Array, start: np.ndarray | None, options: dict) -> dict[str, Any]:
        inputs = super()._inputs(run, keys, start, options)
        pixels, mask = options["pixels"], jnp.asarray(options["mask"])
        if options["image_latents"]:
            inputs["image_latents"] = self._sampled_latents(pixels, keys, 0)
        if not options["blend"]:  # the 9-channel UNet's masked-image channels
            masked = conditioning.masked_image(jnp.asarray(pixels), mask)  # (b, 3, H, W), repaint region zeroed
            inputs["masked_latents"] = self._sampled_latents(masked, keys, 1, options.get("posterior_noise"))
        small = conditioning.resize_nearest(mask, run.latent_shape[2], run.latent_shape[3])  # (b, 1, h, w)
        inputs["mask"] = sd_image.image_batch(small, run.latent_shape[0], "mask_image")
        return inputs


class StableDiffusionInstructPix2PixPipeline(Pix2PixRecipe, _ImageConditioned):
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
        request = self._request(locals())  # first: the call's parameters
        channels = self._latent_channels()
        sd_image.check_unet_channels(self.unet.config, channels, channels, type(self).__name__)
        pixels = sd_image.preprocess_image(sd_image.require_image(image, "image"), self.vae_scale_factor)
        run = self._run(request, pixels.shape[2:], parallel, mesh, channels=channels)
        return self._generate(run, request, key, latents, {"pixels": pixels}, return_dict)

    def _inputs(self, run: Run, keys: jax.Array, start: np.ndarray | None, options: dict) -> dict[str, Any]:
        inputs = super()._inputs(run, keys, start, options)
        mode = vae_encode_mode(self.vae, jnp.asarray(options["pixels"]))  # unscaled, as diffusers
        inputs["image_latents"] = sd_image.image_batch(mode, run.latent_shape[0])
        return inputs
