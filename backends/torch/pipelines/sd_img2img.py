"""PyTorch image-conditioned SD pipelines: ``StableDiffusionImg2ImgPipeline``, ``StableDiffusionInpaintPipeline``,
``StableDiffusionInstructPix2PixPipeline`` (the recipe is ``diffusion_core.pipelines.sd_image``).

``latents=`` (numpy) is always the starting Gaussian draw: img2img and inpaint (strength < 1) add it to the
encoded image at the start timestep; pure noise (strength 1, InstructPix2Pix) is scaled by ``init_noise_sigma``.
"""

from __future__ import annotations

from typing import Any

from diffusion_core.pipelines import ImagePipelineOutput, conditioning, sd_image
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.torch.pipelines.sd_base import StableDiffusionBase, StepCallback, prompt_args
from diffusion_core.torch.sampling import Generators


class _KeepKnown:
    """The pipeline's scheduler, whose ``step`` also restores the known region (4-channel inpainting)."""

    def __init__(self, scheduler: Any, image_latents: Any, noise: Any, mask: Any) -> None:
        self._scheduler, self._image_latents, self._noise, self._mask = scheduler, image_latents, noise, mask

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)

    def step(self, state: Any, model_output: Any, sample: Any, noise: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        x, state = self._scheduler.step(state, model_output, sample, noise=noise, **kwargs)
        kept = sd_image.keep_known_region(self._scheduler, state, x, self._image_latents, self._noise, self._mask)
        return kept, state


class StableDiffusionImg2ImgPipeline(StableDiffusionBase):
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
        generator: Generators = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
        clip_skip: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Repaint ``image`` toward ``prompt``; ``strength`` in [0, 1] is how much of the schedule runs."""
        args = prompt_args(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
            num_inference_steps, eta, output_type, clip_skip,
        )  # fmt: skip
        batch = self._common_checks(args) * num_images_per_prompt
        pixels = sd_image.preprocess_image(sd_image.require_image(image, "image"), self.vae_scale_factor)
        sd_image.strength_start(self.scheduler, num_inference_steps, strength)  # checks before the work
        g = sd.guidance(guidance_scale, 0.0, self.unet.config)
        embeds = self._text_embeddings(args, g)
        image_latents = sd.scale_latents(self._encode_image(pixels, batch, generator), self.vae.config)
        noise = self._start_latents(tuple(image_latents.shape), latents, generator)
        state, start = sd_image.start_state(self.scheduler, num_inference_steps, strength, noise)
        x = sd_image.noised_start(self.scheduler, state, image_latents.to(noise.dtype), noise, start)
        x = self._denoise(x, state, embeds.to(self.unet.dtype), g, generator, eta, callback_on_step_end)
        return self._decode(x, output_type, return_dict)


class StableDiffusionInpaintPipeline(StableDiffusionBase):
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
        generator: Generators = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
        clip_skip: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Repaint the white (>= 0.5) region of ``mask_image`` in ``image`` following ``prompt``."""
        args = prompt_args(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
            num_inference_steps, eta, output_type, clip_skip,
        )  # fmt: skip
        batch = self._common_checks(args) * num_images_per_prompt
        # blend: a text-to-image (4-channel) UNet keeps the known region after each step
        blend, (height, width), pixels, mask = sd_image.inpaint_inputs(
            self.unet.config, self.vae.config, image, mask_image, (height, width),
            (self.scheduler, num_inference_steps, strength), type(self).__name__,
        )  # fmt: skip
        channels, scale = int(self.vae.config["latent_channels"]), self.vae_scale_factor
        g = sd.guidance(guidance_scale, 0.0, self.unet.config)
        embeds = self._text_embeddings(args, g)
        image_latents = None
        if strength < 1.0 or blend:
            image_latents = sd.scale_latents(self._encode_image(pixels, batch, generator), self.vae.config)
        noise = self._start_latents(sd.latent_shape(batch, channels, height, width, scale), latents, generator)
        state, start = sd_image.start_state(self.scheduler, num_inference_steps, strength, noise)
        if strength == 1.0:  # pure noise, as diffusers (also when the image latents are needed for blending)
            x = noise * state.init_noise_sigma
        else:
            x = sd_image.noised_start(self.scheduler, state, image_latents.to(noise.dtype), noise, start)
        mask_latents, extra = self._mask_condition(pixels, mask, batch, generator, g)
        scheduler = None
        if blend:  # diffusers still encodes the masked image (a generator draw) for 4-channel UNets
            extra, scheduler = None, _KeepKnown(self.scheduler, image_latents.to(noise.dtype), noise, mask_latents)
        x = self._denoise(
            x, state, embeds.to(self.unet.dtype), g, generator, eta, callback_on_step_end, extra, scheduler=scheduler
        )
        return self._decode(x, output_type, return_dict)

    def _mask_condition(
        self, pixels: Any, mask: Any, batch: int, generator: Generators, g: sd.Guidance
    ) -> tuple[Any, Any]:
        """``(latent-size mask (B, 1, h, w), extra UNet channels: mask + scaled masked-image latents)``."""
        masked = conditioning.masked_image(pixels, mask)  # (b, 3, H, W), repaint region zeroed
        masked_latents = sd.scale_latents(self._encode_image(masked, batch, generator), self.vae.config)
        h, w = masked_latents.shape[2], masked_latents.shape[3]
        mask_latents = conditioning.resize_nearest(self._as_tensor(mask), h, w)  # (b, 1, h, w)
        mask_latents = sd_image.image_batch(mask_latents, batch, "mask_image")
        return mask_latents, sd_image.inpaint_extra(mask_latents, masked_latents.to(self.unet.dtype), g.parts)


class StableDiffusionInstructPix2PixPipeline(StableDiffusionBase):
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
        generator: Generators = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Edit ``image`` as ``prompt`` says; ``image_guidance_scale`` pulls toward the input image."""
        args = prompt_args(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
            num_inference_steps, eta, output_type, None,
        )  # fmt: skip
        batch = self._common_checks(args) * num_images_per_prompt
        channels = int(self.vae.config["latent_channels"])
        sd_image.check_unet_channels(self.unet.config, channels, channels, type(self).__name__)
        pixels = sd_image.preprocess_image(sd_image.require_image(image, "image"), self.vae_scale_factor)
        g = sd.guidance(guidance_scale, 0.0, self.unet.config, image_guidance_scale)
        embeds = self._text_embeddings(args, g)
        image_latents = self._encode_image(pixels, batch, generator, sample=False).to(self.unet.dtype)
        height, width = pixels.shape[2], pixels.shape[3]
        shape = sd.latent_shape(batch, channels, height, width, self.vae_scale_factor)
        x = self._start_latents(shape, latents, generator)
        state = self.scheduler.set_timesteps(num_inference_steps, like=x)
        x = x * state.init_noise_sigma
        extra = sd_image.pix2pix_extra(image_latents, g.parts)
        x = self._denoise(x, state, embeds.to(self.unet.dtype), g, generator, eta, callback_on_step_end, extra)
        return self._decode(x, output_type, return_dict)
