"""PyTorch ``StableDiffusionControlNetPipeline``: text to image steered by a ControlNet (Zhang et al. 2023).

The recipe is ``diffusion_core.pipelines.sd_control`` (keep schedule, control batch, guess mode); the
ControlNet's residuals feed the UNet's skips and mid block at every model call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from diffusion_core.pipelines import ImagePipelineOutput, sd_control, sd_image
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.torch.pipelines.sd_base import StableDiffusionBase, StepCallback, prompt_args
from diffusion_core.torch.sampling import Generators


class StableDiffusionControlNetPipeline(StableDiffusionBase):
    """SD with one ``ControlNetModel``; diffusers' ``StableDiffusionControlNetPipeline``."""

    _components = (*sd.SD_COMPONENTS[:4], "controlnet", *sd.SD_COMPONENTS[4:])
    _optional_components = sd.SD_OPTIONAL

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
        controlnet_conditioning_scale: float = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: StepCallback | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt`` following the control ``image`` (edges, depth, pose, ...)."""
        args = prompt_args(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
            num_inference_steps, eta, output_type, clip_skip,
        )  # fmt: skip
        batch = self._common_checks(args) * num_images_per_prompt
        if image is None:
            raise ValueError("image: the ControlNet conditioning image is required (PIL image(s) or numpy in [0, 1])")
        sd_control.check_control_options(controlnet_conditioning_scale, control_guidance_start, control_guidance_end)
        guess_mode = bool(guess_mode or self.controlnet.config.get("global_pool_conditions", False))
        control = sd_image.preprocess_control_image(image, self.vae_scale_factor, height, width)
        height, width = sd.resolve_size(control.shape[2], control.shape[3], self.unet.config, self.vae.config)
        g = sd.guidance(guidance_scale, 0.0, self.unet.config)
        embeds = self._text_embeddings(args, g).to(self.unet.dtype)
        control = sd_control.control_image_batch(
            self._as_tensor(control, self.controlnet.dtype), batch, num_images_per_prompt, g.parts, guess_mode
        )
        shape = sd.latent_shape(batch, self.unet.config["in_channels"], height, width, self.vae_scale_factor)
        x = self._start_latents(shape, latents, generator)
        state = self.scheduler.set_timesteps(num_inference_steps, like=x)
        x = x * state.init_noise_sigma
        keep = sd_control.controlnet_keep(int(state.timesteps.shape[0]), control_guidance_start, control_guidance_end)
        scales = [float(controlnet_conditioning_scale) * float(k) for k in keep]
        residuals = self._residuals(embeds, control, g, guess_mode, scales)
        x = self._denoise(x, state, embeds, g, generator, eta, callback_on_step_end, unet_kwargs=residuals)
        return self._decode(x, output_type, return_dict)

    def _residuals(
        self, embeds: torch.Tensor, control: torch.Tensor, g: sd.Guidance, guess_mode: bool, scales: list[float]
    ) -> Callable[[torch.Tensor, torch.Tensor], dict[str, Any]]:
        """Per model call: the ControlNet's scaled residuals as UNet keywords (calls counted in order)."""
        calls = iter(scales)
        cond_embeds = embeds[-embeds.shape[0] // g.parts :] if guess_mode else embeds  # guess mode: conditional half

        def unet_kwargs(x_scaled: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
            x_in = x_scaled if guess_mode else sd.model_input(x_scaled, g)
            down, mid = self.controlnet(
                x_in, t, cond_embeds, controlnet_cond=control, conditioning_scale=next(calls), guess_mode=guess_mode
            )
            if guess_mode:
                down, mid = sd_control.guess_mode_residuals(down, mid, g.parts)
            return {"down_block_additional_residuals": list(down), "mid_block_additional_residual": mid}

        return unet_kwargs
