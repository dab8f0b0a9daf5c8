"""PyTorch ``StableDiffusionLatentUpscalePipeline`` (the x2 latent upscaler): a K-diffusion UNet with Karras
preconditioning on (sigma, pooled CLIP text), conditioned on nearest-upsampled low-res latents.

The recipe is ``diffusion_core.pipelines.sd_recipes.LatentUpscaleRecipe``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffusion_core.pipelines import ImagePipelineOutput
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.sd_recipes import LatentUpscaleRecipe
from diffusion_core.torch.pipelines.sd_base import StableDiffusionBase, StepCallback
from diffusion_core.torch.sampling import Generators


class StableDiffusionLatentUpscalePipeline(LatentUpscaleRecipe, StableDiffusionBase):
    """2x upscaling in latent space; diffusers' ``StableDiffusionLatentUpscalePipeline``."""

    def _encode_pair(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids -> (the last layer's hidden states before the final norm (B, L, D), pooled (B, D))."""
        with torch.inference_mode():
            out = self.text_encoder(torch.from_numpy(ids).to(self.device), output_hidden_states=True)
        return out.hidden_states[-1], out.pooler_output

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
        request, embeds = self._latent_upscale_request(locals())  # first: the call's parameters
        hidden, time_cond = self._pooled_context(request, embeds)
        given, pixels, (channels, h, w) = self._low_res_input(image, request.prompts)
        if given is None:
            scaled = self._encode_image(pixels, pixels.shape[0], generator)
            low_res = sd.scale_latents(scaled, self.vae.config)
        else:
            low_res = self._as_tensor(given)
        shape = (request.batch, channels, 2 * h, 2 * w)
        inputs = {"context": hidden, "time_cond": time_cond, "low_res": low_res}
        inputs["noise"] = self.prepare_latents(shape, latents, generator)
        return self._generate(request, inputs, generator, callback_on_step_end, return_dict)
