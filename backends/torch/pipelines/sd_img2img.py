"""PyTorch image-conditioned SD pipelines: ``StableDiffusionImg2ImgPipeline``, ``StableDiffusionInpaintPipeline``,
``StableDiffusionInstructPix2PixPipeline`` (the recipes are ``diffusion_core.pipelines.sd_recipes``; here the
inputs are drawn and encoded in diffusers' generator order).

``latents=`` (numpy) is always the starting Gaussian draw: img2img and inpaint (strength < 1) add it to the
encoded image at the start timestep; pure noise (strength 1, InstructPix2Pix) is scaled by ``init_noise_sigma``.
"""

from __future__ import annotations

from typing import Any

from diffusion_core.pipelines import ImagePipelineOutput, conditioning, sd_image
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.sd_recipe import SDRequest
from diffusion_core.pipelines.sd_recipes import Img2ImgRecipe, InpaintRecipe, Pix2PixRecipe, inpaint_needs_image_latents
from diffusion_core.torch.pipelines.sd_base import StableDiffusionBase, StepCallback
from diffusion_core.torch.sampling import Generators


class StableDiffusionImg2ImgPipeline(Img2ImgRecipe, StableDiffusionBase):
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
        request = self._request(locals())  # first: the call's parameters
        pixels = sd_image.preprocess_image(sd_image.require_image(image, "image"), self.vae_scale_factor)
        inputs = self._img2img_inputs(request, pixels, strength, generator, latents)
        opts = (("strength", strength),)
        return self._generate(request, inputs, generator, callback_on_step_end, return_dict, opts)

    def _img2img_inputs(
        self, request: SDRequest, pixels: Any, strength: float, generator: Generators, latents: Any
    ) -> dict[str, Any]:
        """Checks ``strength``, then the recipe's inputs in diffusers' generator order: the text context, the
        scaled posterior draw of ``pixels`` (b, 3, H, W), the start noise."""
        sd_image.strength_start(self.scheduler, request.num_inference_steps, strength)  # checks before the work
        context = self._context(request)
        image_latents = sd.scale_latents(self._encode_image(pixels, request.batch, generator), self.vae.config)
        noise = self.prepare_latents(tuple(image_latents.shape), latents, generator)
        return {"context": context, "noise": noise, "image_latents": image_latents}


class StableDiffusionInpaintPipeline(InpaintRecipe, StableDiffusionBase):
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
        request = self._request(locals())  # first: the call's parameters
        checked = self._inpaint_checks(image, mask_image, (height, width), num_inference_steps, strength)
        inputs = {
            "context": self._context(request),
            **self._inpaint_inputs(request, checked, strength, generator, latents),
        }
        opts = (("strength", strength),)
        return self._generate(request, inputs, generator, callback_on_step_end, return_dict, opts)

    def _inpaint_checks(
        self, image: Any, mask_image: Any, size: tuple[int | None, int | None], steps: int, strength: float
    ) -> tuple[bool, tuple[int, int], Any, Any]:
        """``(blend, (height, width), pixels, mask)``; blend: a 4-channel UNet keeps the known region each step."""
        return sd_image.inpaint_inputs(
            self.unet.config, self.vae.config, image, mask_image, size, (self.scheduler, steps, strength),
            type(self).__name__,
        )  # fmt: skip

    def _inpaint_inputs(
        self, request: SDRequest, checked: tuple, strength: float, generator: Generators, latents: Any
    ) -> dict[str, Any]:
        """The recipe's inputs but the text (``checked`` from ``_inpaint_checks``), in diffusers' generator order:
        image latents (if needed), start noise, masked-image latents (9-channel UNets), the latent-size mask."""
        blend, (height, width), pixels, mask = checked
        batch, scale = request.batch, self.vae_scale_factor
        inputs = {}
        if inpaint_needs_image_latents(strength, blend):
            inputs["image_latents"] = sd.scale_latents(self._encode_image(pixels, batch, generator), self.vae.config)
        shape = sd.latent_shape(batch, self._latent_channels(), height, width, scale)
        inputs["noise"] = self.prepare_latents(shape, latents, generator)
        # diffusers encodes the masked image (a generator draw) also for 4-channel UNets, which do not use it
        masked = conditioning.masked_image(pixels, mask)  # (b, 3, H, W), repaint region zeroed
        masked_latents = sd.scale_latents(self._encode_image(masked, batch, generator), self.vae.config)
        if not blend:
            inputs["masked_latents"] = masked_latents
        small = conditioning.resize_nearest(self._as_tensor(mask), shape[2], shape[3])  # (b, 1, h, w)
        inputs["mask"] = sd_image.image_batch(small, batch, "mask_image")
        return inputs


class StableDiffusionInstructPix2PixPipeline(Pix2PixRecipe, StableDiffusionBase):
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
        request = self._request(locals())  # first: the call's parameters
        channels = self._latent_channels()
        sd_image.check_unet_channels(self.unet.config, channels, channels, type(self).__name__)
        pixels = sd_image.preprocess_image(sd_image.require_image(image, "image"), self.vae_scale_factor)
        context = self._context(request)
        image_latents = self._encode_image(pixels, request.batch, generator, sample=False)  # unscaled, as diffusers
        shape = sd.latent_shape(request.batch, channels, pixels.shape[2], pixels.shape[3], self.vae_scale_factor)
        inputs = {"context": context, "noise": self.prepare_latents(shape, latents, generator)}
        inputs["image_latents"] = image_latents
        return self._generate(request, inputs, generator, callback_on_step_end, return_dict)
