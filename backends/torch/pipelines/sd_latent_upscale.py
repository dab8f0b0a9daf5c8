"""PyTorch ``StableDiffusionLatentUpscalePipeline`` (the x2 latent upscaler): a K-diffusion UNet with Karras
preconditioning on (sigma, pooled CLIP text), conditioned on nearest-upsampled low-res latents.

The math is ``diffusion_core.pipelines.conditioning.latent_upscaler_*``; text uses the SD recipe helpers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffusion_core.pipelines import ImagePipelineOutput, conditioning, sd_image
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.torch.pipelines.sd_base import StableDiffusionBase, StepCallback
from diffusion_core.torch.sampling import Generators


class StableDiffusionLatentUpscalePipeline(StableDiffusionBase):
    """2x upscaling in latent space; diffusers' ``StableDiffusionLatentUpscalePipeline``."""

    _components = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    _optional_components = ()

    def _encode_pair(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids -> (the last layer's hidden states before the final norm (B, L, D), pooled (B, D))."""
        with torch.inference_mode():
            out = self.text_encoder(torch.from_numpy(ids).to(self.device), output_hidden_states=True)
        return out.hidden_states[-1], out.pooler_output

    def _low_res_latents(self, image: Any, generator: Generators) -> torch.Tensor:
        """(b, C, h, w) scaled latents: latents given as they are (torch/numpy), or images VAE-encoded."""
        channels = int(self.vae.config["latent_channels"])
        if (torch.is_tensor(image) or isinstance(image, np.ndarray)) and image.ndim == 4 and image.shape[1] == channels:
            return self._as_tensor(image)
        pixels = sd_image.preprocess_image(image, self.vae_scale_factor)
        return sd.scale_latents(self._encode_image(pixels, pixels.shape[0], generator), self.vae.config)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        num_inference_steps: int = 75,
        guidance_scale: float = 9.0,
        negative_prompt: str | list[str] | None = None,
        generator: Generators = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        pooled_prompt_embeds: Any = None,
        negative_pooled_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Upscale ``image`` (latents (B, 4, h, w) from an SD run with ``output_type="latent"``, or images) 2x."""
        embeds = (prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds)
        batch, prompt, g = sd_image.check_latent_upscaler_call(
            prompt, negative_prompt, embeds, image, guidance_scale, num_inference_steps, output_type,
            self.text_encoder.config,
        )  # fmt: skip
        given = tuple(None if e is None else self._as_tensor(e) for e in embeds)
        hidden, pooled = sd.encode_prompt_pairs(
            self._encode_pair, self.tokenizer, prompt, negative_prompt, given, g.parts > 1
        )
        low = self._low_res_latents(image, generator)
        if low.shape[0] != batch:
            raise ValueError(f"image: {low.shape[0]} images for {batch} prompts; pass one per prompt")
        image_cond = conditioning.latent_upscaler_image_cond(torch.cat([low] * g.parts))  # (parts * B, C, 2h, 2w)
        sd_image.check_unet_channels(self.unet.config, low.shape[1], int(image_cond.shape[1]), type(self).__name__)
        time_cond = conditioning.latent_upscaler_timestep_cond(pooled.to(self.unet.dtype))
        shape = (batch, int(low.shape[1]), 2 * int(low.shape[2]), 2 * int(low.shape[3]))
        x = self._start_latents(shape, latents, generator)
        state = self.scheduler.set_timesteps(num_inference_steps, like=x)
        x = x * state.init_noise_sigma
        model_fn = self._model_fn(state, hidden.to(self.unet.dtype), image_cond.to(self.unet.dtype), time_cond, g)
        x = self._run_loop(x, state, model_fn, generator, 0.0, callback_on_step_end)
        return self._decode(x, output_type, return_dict)

    def _model_fn(self, state: Any, hidden: Any, image_cond: Any, time_cond: Any, g: sd.Guidance):
        """The preconditioned, guided denoiser ``D(x; sigma)`` per model call (calls counted in order)."""
        step = iter(range(int(state.step_index), int(state.timesteps.shape[0])))

        def model_fn(x_scaled: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            sigma = state.sigmas[next(step)]
            x_in = sd.model_input(x_scaled, g, image_cond)  # (parts * B, 2C, H, W)
            out = self.unet(x_in, conditioning.latent_upscaler_timestep(sigma), hidden, timestep_cond=time_cond)
            sample = sd.model_input(x_scaled, g) * torch.sqrt(sigma**2 + 1)  # the unscaled x, repeated per part
            return sd.combine(conditioning.latent_upscaler_precondition(sample, out, sigma), g)

        return model_fn
