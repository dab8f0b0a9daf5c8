"""PyTorch ``StableDiffusionControlNetPipeline``: text to image steered by ControlNets (Zhang et al. 2023).

The recipe is ``diffusion_core.pipelines.sd_recipes.ControlNetRecipe`` (per-net options and guidance windows,
control batch, guess mode); the ControlNets' residuals feed the UNet's skips and mid block at every model call.
"""

from __future__ import annotations

from typing import Any

from diffusion_core.pipelines import ImagePipelineOutput
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.sd_recipes import ControlNetRecipe
from diffusion_core.torch.pipelines.sd_base import StableDiffusionBase, StepCallback
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
