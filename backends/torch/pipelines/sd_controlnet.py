"""PyTorch ControlNet pipelines (Zhang et al. 2023): ``StableDiffusionControlNetPipeline`` (text to image) and its
img2img / inpaint forms, each steered by one ControlNet or several.

The recipe is ``diffusion_core.pipelines.sd_recipes.ControlNetRecipe`` (per-net options and guidance windows,
control batch, guess mode); the ControlNets' residuals feed the UNet's skips and mid block at every model call.
"""

from __future__ import annotations

from typing import Any

from diffusion_core.pipelines import ImagePipelineOutput, sd_image
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.sd_recipes import ControlNetImg2ImgRecipe, ControlNetInpaintRecipe, ControlNetRecipe
from diffusion_core.torch.pipelines.sd_base import StableDiffusionBase, StepCallback
from diffusion_core.torch.pipelines.sd_img2img import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from diffusion_core.torch.sampling import Generators


class StableDiffusionControlNetPipeline(ControlNetRecipe, StableDiffusionBase):
    """SD with a ``ControlNetModel``, or several (a list or a ``MultiControlNetModel``); diffusers'
    ``StableDiffusionControlNetPipeline``."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        height: int | None = None,
        width: int | None = None,
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
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: StepCallback | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt`` following the control ``image`` (edges, depth, pose, ...); with several
        ControlNets, ``image`` and (optionally) the scale and guidance window are lists with one entry per net."""
        request = self._request(locals())  # first: the call's parameters
        control, (height, width), opts, scalars = self._control_inputs(
            request, image, (height, width), guess_mode, controlnet_conditioning_scale,
            (control_guidance_start, control_guidance_end),
        )  # fmt: skip
        context = self._context(request)
        shape = sd.latent_shape(request.batch, self.unet.config["in_channels"], height, width, self.vae_scale_factor)
        inputs = {"context": context, "noise": self.prepare_latents(shape, latents, generator)}
        inputs["control"] = self._as_tensor(control, self.controlnet.dtype)
        return self._generate(request, inputs, generator, callback_on_step_end, return_dict, opts, scalars)


class StableDiffusionControlNetImg2ImgPipeline(ControlNetImg2ImgRecipe, StableDiffusionImg2ImgPipeline):
    """Image-to-image steered by ControlNets; diffusers' ``StableDiffusionControlNetImg2ImgPipeline``."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        control_image: Any = None,
        height: int | None = None,
        width: int | None = None,
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
        controlnet_conditioning_scale: float | list[float] = 0.8,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: StepCallback | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Repaint ``image`` toward ``prompt`` (``strength`` of the schedule) following ``control_image``."""
        request = self._request(locals())  # first: the call's parameters
        control, size, opts, scalars = self._control_inputs(
            request, control_image, (height, width), guess_mode, controlnet_conditioning_scale,
            (control_guidance_start, control_guidance_end), "control_image",
        )  # fmt: skip
        pixels = sd_image.preprocess_image(sd_image.require_image(image, "image"), self.vae_scale_factor, *size)
        inputs = self._img2img_inputs(request, pixels, strength, generator, latents)
        inputs["control"] = self._as_tensor(control, self.controlnet.dtype)
        opts = (*opts, ("strength", strength))
        return self._generate(request, inputs, generator, callback_on_step_end, return_dict, opts, scalars)


class StableDiffusionControlNetInpaintPipeline(ControlNetInpaintRecipe, StableDiffusionInpaintPipeline):
    """Inpainting steered by ControlNets; diffusers' ``StableDiffusionControlNetInpaintPipeline``."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        control_image: Any = None,
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
        controlnet_conditioning_scale: float | list[float] = 0.5,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: StepCallback | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Repaint the white (>= 0.5) region of ``mask_image`` in ``image`` following ``prompt`` and
        ``control_image``."""
        request = self._request(locals())  # first: the call's parameters
        control, size, opts, scalars = self._control_inputs(
            request, control_image, (height, width), guess_mode, controlnet_conditioning_scale,
            (control_guidance_start, control_guidance_end), "control_image",
        )  # fmt: skip
        checked = self._inpaint_checks(image, mask_image, size, num_inference_steps, strength)
        inputs = {
            "context": self._context(request),
            **self._inpaint_inputs(request, checked, strength, generator, latents),
        }
        inputs["control"] = self._as_tensor(control, self.controlnet.dtype)
        opts = (*opts, ("strength", strength))
        return self._generate(request, inputs, generator, callback_on_step_end, return_dict, opts, scalars)
