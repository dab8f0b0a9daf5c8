"""``UnCLIPPipeline`` (Karlo) for PyTorch: the core unCLIP recipe bound to torch modules, generators and the loop.

Every random draw comes from ``generator`` in diffusers' order (prior start and steps, decoder start and
steps, super-resolution start and steps), so a seeded call gives diffusers' images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from diffusion_core.pipelines import ImagePipelineOutput
from diffusion_core.pipelines import unclip as uc
from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.torch.sampling import Generators, denoise_loop, randn_tensor

NoiseFns = Mapping[str, Callable[[int], np.ndarray]]  # stage -> (model call -> step noise); tests only


class UnCLIPPipeline(DiffusionPipeline):
    """Text -> CLIP image embedding (prior) -> 64x64 image (decoder) -> 256x256 (two super-resolution UNets)."""

    _components = (
        "decoder", "text_encoder", "tokenizer", "text_proj", "super_res_first", "super_res_last", "prior",
        "prior_scheduler", "decoder_scheduler", "super_res_scheduler",
    )  # fmt: skip

    def __call__(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        prior_num_inference_steps: int = 25,
        decoder_num_inference_steps: int = 25,
        super_res_num_inference_steps: int = 7,
        generator: Generators = None,
        prior_latents: Any = None,
        decoder_latents: Any = None,
        super_res_latents: Any = None,
        prior_guidance_scale: float = 4.0,
        decoder_guidance_scale: float = 8.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt``; ``*_latents`` (numpy or torch) fix a stage's starting draw."""
        request = uc.unclip_request(
            self._configs(), prompt, num_images_per_prompt=num_images_per_prompt,
            prior_num_inference_steps=prior_num_inference_steps,
            decoder_num_inference_steps=decoder_num_inference_steps,
            super_res_num_inference_steps=super_res_num_inference_steps, prior_latents=prior_latents,
            decoder_latents=decoder_latents, super_res_latents=super_res_latents,
            prior_guidance_scale=prior_guidance_scale, decoder_guidance_scale=decoder_guidance_scale,
            output_type=output_type,
        )  # fmt: skip
        images = uc.finish(self._generate(request, generator), request.output_type)
        return ImagePipelineOutput(images) if return_dict else (images,)

    def _configs(self) -> dict[str, Any]:
        return {name: getattr(self, name).config for name in ("prior", "decoder", "super_res_first")}

    def _generate(self, request: uc.UnCLIPRequest, generator: Generators, noise_fns: NoiseFns | None = None):
        """(B, 3, H, W) numpy images in [-1, 1]; ``noise_fns`` replaces the generator's step noise (tests)."""
        with torch.inference_mode():
            embeds, hidden, mask = self._encode_text(request)
            image_embeds = self._prior_stage(request, embeds, hidden, mask, generator, noise_fns)
            image = self._decoder_stage(request, image_embeds, embeds, hidden, mask, generator, noise_fns)
            return self._super_res_stage(request, image, generator, noise_fns).float().cpu().numpy()

    def _encode_text(self, request: uc.UnCLIPRequest):
        """(text embeds (N, P), last hidden states (N, L, D), mask (N, L)); N = batch, doubled under guidance."""

        def encode(texts):
            ids, mask = uc.tokenize_with_mask(self.tokenizer, texts)
            out = self.text_encoder(torch.from_numpy(ids).to(self.device))
            return out.text_embeds, out.last_hidden_state, torch.from_numpy(mask).to(self.device)

        cond = encode(request.texts)
        uncond = encode([""] * len(request.texts)) if request.guided else (None, None, None)
        n, g = request.num_images_per_prompt, request.guided
        return tuple(uc.batch_text(c, u, n, g) for c, u in zip(cond, uncond, strict=True))

    def _run(self, stage: str, request, model_fn, generator, noise_fns, dtype, index_model_fn=False):
        """One stage's loop from its start draw (given latents, else ``generator``), as diffusers runs it."""
        scheduler = getattr(self, f"{stage}_scheduler")
        start = request.latents[stage]
        if start is None:
            x = randn_tensor(request.shapes[stage], generator, dtype=dtype, device=self.device)
        else:
            x = torch.from_numpy(start).to(device=self.device, dtype=dtype)
        state = scheduler.set_timesteps(request.steps[stage], like=x)
        noise_fn = None
        if noise_fns is not None:
            noise_fn = lambda i: torch.from_numpy(noise_fns[stage](i)).to(device=self.device, dtype=dtype)  # noqa: E731
        x, _ = denoise_loop(
            scheduler, model_fn, x * state.init_noise_sigma, state, generator=generator, noise_fn=noise_fn,
            progress=not self.progress_bar_disabled, index_model_fn=index_model_fn,
        )  # fmt: skip
        return x

    def _prior_stage(self, request, embeds, hidden, mask, generator, noise_fns):
        g, scale = request.guided, request.prior_guidance_scale

        def model_fn(x, t):
            pred = self.prior(uc.model_batch(x, g), t, embeds, hidden, mask).predicted_image_embedding
            return uc.guide_prior(pred, scale, g)

        x = self._run("prior", request, model_fn, generator, noise_fns, embeds.dtype)
        return self.prior.post_process_latents(x)

    def _decoder_stage(self, request, image_embeds, embeds, hidden, mask, generator, noise_fns):
        g, scale = request.guided, request.decoder_guidance_scale
        context, time_embeds = self.text_proj(
            image_embeddings=image_embeds, prompt_embeds=embeds, text_encoder_hidden_states=hidden,
            do_classifier_free_guidance=g,
        )  # fmt: skip
        context_mask = uc.decoder_attention_mask(mask, self.text_proj.config["clip_extra_context_tokens"])

        def model_fn(x, t):
            out = self.decoder(uc.model_batch(x, g), t, context, class_labels=time_embeds, attention_mask=context_mask)
            return uc.guide_decoder(out, x.shape[1], scale, g)

        x = self._run("decoder", request, model_fn, generator, noise_fns, context.dtype)
        return uc.clamp_image(x)

    def _super_res_stage(self, request, image, generator, noise_fns):
        _, _, height, width = request.shapes["super_res"]
        upscaled = uc.upsample_bicubic(image, height, width)
        last = request.steps["super_res"] - 1

        def model_fn(x, t, i):
            unet = self.super_res_last if i == last else self.super_res_first
            return unet(uc.super_res_input(x, upscaled), t)

        return self._run("super_res", request, model_fn, generator, noise_fns, image.dtype, index_model_fn=True)
