"""``UnCLIPPipeline`` (Karlo) for Flax NNX: the core unCLIP recipe bound to NNX modules, keys and the scan loop.

Each stage's loop is one ``lax.scan`` in a jitted program (compiled once per shapes and options).
Stage s (0 prior, 1 decoder, 2 super-resolution) draws from
``fold_in(key, s)``: image b starts from ``normal(fold_in(stage_key, b))`` and its step-i noise comes from
``fold_in(fold_in(stage_key, b), i)``, so an image does not depend on the batch it is made in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.flax.sampling import as_key, denoise_loop, per_example_keys, per_example_normal
from diffusion_core.pipelines import ImagePipelineOutput
from diffusion_core.pipelines import unclip as uc

NoiseFns = Mapping[str, Callable[[int], np.ndarray]]  # stage -> (model call -> step noise); tests only


def _model_fn(stage: str, net, other, cond, guided: bool, scale: Any, last: int):
    """The stage's ``model_fn(x, t, i)``: the recipe's guided prior / decoder call, or the super-resolution pair."""
    if stage == "prior":
        embeds, hidden, mask = cond

        def prior(x, t, i):
            pred = net(uc.model_batch(x, guided), t, embeds, hidden, mask).predicted_image_embedding
            return uc.guide_prior(pred, scale, guided)

        return prior
    if stage == "decoder":
        context, time_embeds, context_mask = cond

        def decoder(x, t, i):
            out = net(uc.model_batch(x, guided), t, context, class_labels=time_embeds, attention_mask=context_mask)
            return uc.guide_decoder(out, x.shape[1], scale, guided)

        return decoder
    (upscaled,) = cond

    def super_res(x, t, i):  # super_res_first on every call but the last, super_res_last there
        x = uc.super_res_input(x, upscaled)
        return jax.lax.cond(i == last, lambda: other(x, t), lambda: net(x, t))

    return super_res


@nnx.jit(static_argnames=("scheduler", "stage", "guided", "last"))
def _stage_loop(net, other, x, state, keys, noises, cond, *, scheduler, stage, guided, scale, last):
    """One stage: the scan over its model calls from the scaled start ``x``; noise from ``keys`` or ``noises``."""
    noise_fn = None if noises is None else (lambda i: noises[i])
    model_fn = _model_fn(stage, net, other, cond, guided, scale, last)
    x, _ = denoise_loop(scheduler, model_fn, x, state, keys=keys, noise_fn=noise_fn, index_model_fn=True)
    return x


@nnx.jit
def _encode(text_encoder, ids):
    out = text_encoder(ids)
    return out.text_embeds, out.last_hidden_state


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
        key: jax.Array | None = None,
        prior_latents: Any = None,
        decoder_latents: Any = None,
        super_res_latents: Any = None,
        prior_guidance_scale: float = 4.0,
        decoder_guidance_scale: float = 8.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt``; ``*_latents`` (numpy or jax) fix a stage's starting draw.

        ``key`` (``jax.random.key(seed)``) is required: every stage draws step noise.
        """
        request = uc.unclip_request(
            self._configs(), prompt, num_images_per_prompt=num_images_per_prompt,
            prior_num_inference_steps=prior_num_inference_steps,
            decoder_num_inference_steps=decoder_num_inference_steps,
            super_res_num_inference_steps=super_res_num_inference_steps, prior_latents=prior_latents,
            decoder_latents=decoder_latents, super_res_latents=super_res_latents,
            prior_guidance_scale=prior_guidance_scale, decoder_guidance_scale=decoder_guidance_scale,
            output_type=output_type,
        )  # fmt: skip
        if key is None:
            raise ValueError("key: pass key=jax.random.key(seed) (every unCLIP stage draws step noise)")
        images = uc.finish(self._generate(request, as_key(key)), request.output_type)
        return ImagePipelineOutput(images) if return_dict else (images,)

    def _configs(self) -> dict[str, Any]:
        return {name: getattr(self, name).config for name in ("prior", "decoder", "super_res_first")}

    def _generate(self, request: uc.UnCLIPRequest, key: jax.Array | None, noise_fns: NoiseFns | None = None):
        """(B, 3, H, W) numpy images in [-1, 1]; ``noise_fns`` replaces the keys' step noise (tests)."""
        embeds, hidden, mask = self._encode_text(request)
        image_embeds = self._prior_stage(request, embeds, hidden, mask, key, noise_fns)
        image = self._decoder_stage(request, image_embeds, embeds, hidden, mask, key, noise_fns)
        return np.asarray(jax.device_get(self._super_res_stage(request, image, key, noise_fns)), np.float32)

    def _encode_text(self, request: uc.UnCLIPRequest):
        """(text embeds (N, P), last hidden states (N, L, D), mask (N, L)); N = batch, doubled under guidance."""

        def encode(texts):
            ids, mask = uc.tokenize_with_mask(self.tokenizer, texts)
            return (*_encode(self.text_encoder, jnp.asarray(ids)), jnp.asarray(mask))

        cond = encode(request.texts)
        uncond = encode([""] * len(request.texts)) if request.guided else (None, None, None)
        n, g = request.num_images_per_prompt, request.guided
        return tuple(uc.batch_text(c, u, n, g) for c, u in zip(cond, uncond, strict=True))

    def _run(self, stage: str, request, nets, cond, key, noise_fns, scale: float = 0.0):
        """One stage's scan from its start draw (given latents, else drawn from the stage's key)."""
        scheduler = getattr(self, f"{stage}_scheduler")
        shape, calls = request.shapes[stage], request.steps[stage]
        keys = None if key is None else per_example_keys(jax.random.fold_in(key, uc.STAGES.index(stage)), shape[0])
        start = request.latents[stage]
        if start is None and keys is None:
            raise ValueError(f"key: needed to draw the {stage} stage's start (or pass {stage}_latents)")
        x = per_example_normal(keys, shape[1:]) if start is None else jnp.asarray(start, jnp.float32)
        state = scheduler.set_timesteps(calls, like=x)
        noises = None
        if noise_fns is not None:
            noises = jnp.stack([jnp.asarray(noise_fns[stage](i), x.dtype) for i in range(calls)])  # (n, *shape)
            keys = None
        net, other = (nets, None) if not isinstance(nets, tuple) else nets
        return _stage_loop(
            net, other, x * state.init_noise_sigma, state, keys, noises, cond, scheduler=scheduler, stage=stage,
            guided=request.guided, scale=jnp.float32(scale), last=calls - 1,
        )  # fmt: skip

    def _prior_stage(self, request, embeds, hidden, mask, key, noise_fns):
        cond = (embeds, hidden, mask)
        x = self._run("prior", request, self.prior, cond, key, noise_fns, request.prior_guidance_scale)
        return self.prior.post_process_latents(x)

    def _decoder_stage(self, request, image_embeds, embeds, hidden, mask, key, noise_fns):
        context, time_embeds = self.text_proj(
            image_embeddings=image_embeds, prompt_embeds=embeds, text_encoder_hidden_states=hidden,
            do_classifier_free_guidance=request.guided,
        )  # fmt: skip
        context_mask = uc.decoder_attention_mask(mask, self.text_proj.config["clip_extra_context_tokens"])
        cond = (context, time_embeds, context_mask)
        x = self._run("decoder", request, self.decoder, cond, key, noise_fns, request.decoder_guidance_scale)
        return uc.clamp_image(x)

    def _super_res_stage(self, request, image, key, noise_fns):
        _, _, height, width = request.shapes["super_res"]
        cond = (uc.upsample_bicubic(image, height, width),)
        return self._run("super_res", request, (self.super_res_first, self.super_res_last), cond, key, noise_fns)
