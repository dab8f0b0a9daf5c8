"""Flax ``StableDiffusionControlNetPipeline``: text to image steered by one ControlNet (Zhang et al. 2023).

The recipe is ``diffusion_core.pipelines.sd_control`` (which model calls the ControlNet acts on, the control
batch, guess mode); here the ControlNet and the UNet run inside the one compiled denoising scan, the ControlNet's
per-call weight ``controlnet_conditioning_scale * keep[i]`` indexed by the model-call counter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from diffusion_core.flax.pipelines.sd_base import Run, StableDiffusionBase, call_options
from diffusion_core.pipelines import ImagePipelineOutput, sd_control, sd_image
from diffusion_core.pipelines import stable_diffusion as sd


class StableDiffusionControlNetPipeline(StableDiffusionBase):
    """SD with one ``ControlNetModel``; diffusers' ``StableDiffusionControlNetPipeline`` for Flax."""

    _components = (*sd.SD_COMPONENTS[:4], "controlnet", *sd.SD_COMPONENTS[4:])
    _optional_components = sd.SD_OPTIONAL
    _indexed_model_fn = True

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
        key: jax.Array | None = None,
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
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt`` following the control ``image`` (edges, depth, pose, ...)."""
        options = call_options(num_inference_steps, num_images_per_prompt, eta, output_type, clip_skip)
        batch = self._common_checks(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, options)
        if image is None:
            raise ValueError("image: the ControlNet conditioning image is required (PIL image(s) or numpy in [0, 1])")
        sd_control.check_control_options(controlnet_conditioning_scale, control_guidance_start, control_guidance_end)
        guess_mode = bool(guess_mode or self.controlnet.config.get("global_pool_conditions", False))
        control = sd_image.preprocess_control_image(image, self.vae_scale_factor, height, width)  # (b, 3, H, W)
        size = sd.resolve_size(control.shape[2], control.shape[3], self.unet.config, self.vae.config)
        g = sd.guidance(guidance_scale, 0.0, self.unet.config)
        scalars = (
            ("guidance_scale", float(guidance_scale)),
            ("controlnet_conditioning_scale", float(controlnet_conditioning_scale)),
        )
        window = (float(control_guidance_start), float(control_guidance_end))
        run = self._run(
            g, size, batch * num_images_per_prompt, num_inference_steps, eta, parallel, mesh,
            scalars=scalars, static=(("guess_mode", guess_mode), ("control_guidance", window)),
        )  # fmt: skip
        context = self.encode_prompt(
            prompt, num_images_per_prompt, g, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip
        )
        per_image = sd_control.control_image_batch(control, run.latent_shape[0], num_images_per_prompt, 1, guess_mode)
        latents = self._denoise(run, context, key, latents, {"control": per_image})
        return self._decode(latents, output_type, return_dict)

    def _networks(self) -> dict[str, nnx.Module]:
        return {"unet": self.unet, "controlnet": self.controlnet}

    def _inputs(self, run: Run, keys: jax.Array, start: np.ndarray | None, options: dict) -> dict[str, Any]:
        inputs = super()._inputs(run, keys, start, options)
        inputs["control"] = options["control"]  # (N, 3, H, W): image b's control image
        return inputs

    def _model_fn(
        self, nets: dict, inputs: dict, guidance: sd.Guidance, run: Run, scalars: dict, state: Any
    ) -> Callable:
        """``(scaled x, t, i)``: ControlNet residuals (weighted by the window at call i) into the guided UNet."""
        unet, controlnet, context = nets["unet"], nets["controlnet"], inputs["context"]
        options = dict(run.static)
        guess_mode, (begin, end) = options["guess_mode"], options["control_guidance"]
        parts, b = guidance.parts, inputs["noise"].shape[0]
        control = sd_control.control_image_batch(inputs["control"], b, 1, parts, guess_mode)
        cond_context = context[-b:] if guess_mode else context  # guess mode: the conditional half only
        keep = jnp.asarray(sd_control.controlnet_keep(run.num_calls, begin, end))  # (num_calls,)

        def model_fn(x, t, i):
            weight = scalars["controlnet_conditioning_scale"] * keep[i]
            x_in = x if guess_mode else sd.model_input(x, guidance)
            down, mid = controlnet(
                x_in, t, cond_context, controlnet_cond=control, conditioning_scale=weight, guess_mode=guess_mode
            )
            if guess_mode:
                down, mid = sd_control.guess_mode_residuals(down, mid, parts)
            residuals = {"down_block_additional_residuals": list(down), "mid_block_additional_residual": mid}
            return sd.combine(unet(sd.model_input(x, guidance), t, context, **residuals), guidance)

        return model_fn
