"""PyTorch ``StableDiffusionUpscalePipeline`` (the x4 upscaler): denoise latents at the low-res image size,
conditioned on the noised low-res image (extra UNet channels) and its noise level (class labels).

The recipe is ``diffusion_core.pipelines.conditioning.upscaler_condition`` + ``sd_image.upscaler_inputs``.
"""

from __future__ import annotations

from typing import Any

from diffusion_core.pipelines import ImagePipelineOutput, conditioning, sd_image
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.torch.pipelines.sd_base import StableDiffusionBase, StepCallback, prompt_args
from diffusion_core.torch.sampling import Generators, randn_tensor


class StableDiffusionUpscalePipeline(StableDiffusionBase):
    """Text-guided x4 super-resolution; diffusers' ``StableDiffusionUpscalePipeline``."""

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
        generator: Generators = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
        clip_skip: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Upscale ``image`` (one per prompt) guided by ``prompt``; ``noise_level`` in [0, max_noise_level]."""
        args = prompt_args(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
            num_inference_steps, eta, output_type, clip_skip,
        )  # fmt: skip
        prompts = self._common_checks(args)
        conditioning.check_noise_level(noise_level, self.max_noise_level)
        if image is None:
            raise ValueError("image: the low-resolution image is required (PIL image(s) or numpy in [0, 1])")
        pixels = sd_image.preprocess_image(image, self.vae_scale_factor, resample="bicubic")
        if pixels.shape[0] != prompts:
            raise ValueError(f"image: {pixels.shape[0]} images for {prompts} prompts; pass one image per prompt")
        g = sd.guidance(guidance_scale, 0.0, self.unet.config)
        embeds = self._text_embeddings(args, g).to(self.unet.dtype)
        low_res = self._as_tensor(pixels)
        noise = randn_tensor(tuple(low_res.shape), generator, dtype=low_res.dtype, device=self.device)
        noised, labels = conditioning.upscaler_condition(
            self.low_res_scheduler, low_res, noise, noise_level, self.max_noise_level
        )
        extra, class_labels = sd_image.upscaler_inputs(noised, labels, g.parts, num_images_per_prompt)
        channels = int(self.vae.config["latent_channels"])
        sd_image.check_unet_channels(self.unet.config, channels, int(extra.shape[1]), type(self).__name__)
        shape = (prompts * num_images_per_prompt, channels, int(pixels.shape[2]), int(pixels.shape[3]))
        x = self._start_latents(shape, latents, generator)
        state = self.scheduler.set_timesteps(num_inference_steps, like=x)
        x = x * state.init_noise_sigma
        x = self._denoise(
            x,
            state,
            embeds,
            g,
            generator,
            eta,
            callback_on_step_end,
            extra,
            lambda x_in, t: {"class_labels": class_labels},
        )
        return self._decode(x, output_type, return_dict)
