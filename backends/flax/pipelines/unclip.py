"""``UnCLIPPipeline`` (Karlo) for Flax NNX: the core unCLIP recipe bound to NNX modules, keys and the scan loop.

Each stage's loop is one ``lax.scan`` in a cached compiled program (``DiffusionPipeline.compiled``: once per
shapes and options; prompts, seeds and guidance scales are inputs). Stage s (0 prior, 1 decoder, 2 super-resolution)
draws from ``fold_in(key, s)``: image b starts from ``normal(fold_in(stage_key, b))`` and its step-i noise comes from
``fold_in(fold_in(stage_key, b), i)``, so an image does not depend on the batch it is made in, nor on the devices
``parallel="pmap"`` / ``mesh=`` split the batch over (its inputs travel as per-image rows; see ``run_program``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from diffusion_core.configuration import config_to_json_string
from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline, scale_out_mode
from diffusion_core.flax.pipelines.sd_base import guided_to_rows, rows_to_guided
from diffusion_core.flax.pipelines.sd_program import pack_rows, unpack_rows
from diffusion_core.flax.sampling import as_key, denoise_loop, per_example_keys, per_example_normal
from diffusion_core.pipelines import ImagePipelineOutput
from diffusion_core.pipelines import unclip as uc

NoiseFns = Mapping[str, Callable[[int], np.ndarray]]  # stage -> (model call -> step noise); tests only
# stage -> the networks its program runs (super-resolution: super_res_first, then super_res_last for the last call)
NETS = {"prior": ("prior",), "decoder": ("decoder",), "super_res": ("super_res_first", "super_res_last")}
# stage -> its conditioning inputs, in ``_model_fn``'s order; per-image rows (guidance order for prior and decoder)
COND = {
    "prior": ("embeds", "hidden", "mask"),
    "decoder": ("context", "time_embeds", "context_mask"),
    "super_res": ("upscaled",),
}


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
        prompt: str | list[str] | None = None,
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
        text_model_output: Any = None,
        text_attention_mask: Any = None,
        parallel: str | None = None,
        mesh: Mesh | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt``; ``*_latents`` (numpy or jax) fix a stage's starting draw;
        ``text_model_output`` ((text_embeds, last_hidden_state)) with ``text_attention_mask`` replaces encoding
        ``prompt`` (then optional), as in diffusers.

        ``key`` (``jax.random.key(seed)`` or ``jax.random.PRNGKey(seed)``) is required: every stage draws step
        noise. ``parallel="pmap"`` / ``mesh=`` (a ``"data"`` axis) split the images of every stage over devices; a
        batch that does not divide them is padded and trimmed, and the images are those of one device.
        """
        mode = scale_out_mode(parallel, mesh)
        request = uc.unclip_request(
            self._configs(), prompt, num_images_per_prompt=num_images_per_prompt,
            prior_num_inference_steps=prior_num_inference_steps,
            decoder_num_inference_steps=decoder_num_inference_steps,
            super_res_num_inference_steps=super_res_num_inference_steps, prior_latents=prior_latents,
            decoder_latents=decoder_latents, super_res_latents=super_res_latents,
            prior_guidance_scale=prior_guidance_scale, decoder_guidance_scale=decoder_guidance_scale,
            output_type=output_type, text_model_output=text_model_output, text_attention_mask=text_attention_mask,
        )  # fmt: skip
        if key is None:
            raise ValueError("key: pass key=jax.random.key(seed) (every unCLIP stage draws step noise)")
        images = uc.finish(self._generate(request, as_key(key), where=(mode, mesh)), request.output_type)
        return ImagePipelineOutput(images) if return_dict else (images,)

    def _placeholder_call(self, batch_size: int) -> dict[str, Any]:
        return {"prompt": [""] * batch_size}

    def _configs(self) -> dict[str, Any]:
        return {name: getattr(self, name).config for name in ("prior", "decoder", "super_res_first")}

    def _generate(
        self,
        request: uc.UnCLIPRequest,
        key: jax.Array | None,
        noise_fns: NoiseFns | None = None,
        where: tuple[str, Mesh | None] = ("single", None),
    ):
        """(B, 3, H, W) numpy images in [-1, 1]; ``noise_fns`` replaces the keys' step noise (tests); ``where``:
        the scale-out ``(mode, mesh)`` every stage runs in."""
        embeds, hidden, mask = self._encode_text(request)
        image_embeds = self._prior_stage(request, embeds, hidden, mask, key, noise_fns, where)
        seconds = self.last_compile_seconds
        image = self._decoder_stage(request, image_embeds, embeds, hidden, mask, key, noise_fns, where)
        seconds += self.last_compile_seconds
        images = np.asarray(jax.device_get(self._super_res_stage(request, image, key, noise_fns, where)), np.float32)
        self.last_compile_seconds += seconds  # the three stage programs' compile time
        return images

    def _encode_text(self, request: uc.UnCLIPRequest):
        """(text embeds (N, P), last hidden states (N, L, D), mask (N, L)); N = batch, doubled under guidance."""

        def encode(texts):
            ids, mask = uc.tokenize_with_mask(self.tokenizer, texts)
            return (*_encode(self.text_encoder, jnp.asarray(ids)), jnp.asarray(mask))

        cond = encode(request.texts) if request.given_text is None else self._given_text(request.given_text)
        uncond = encode([""] * request.prompts) if request.guided else (None, None, None)
        n, g = request.num_images_per_prompt, request.guided
        return tuple(uc.batch_text(c, u, n, g) for c, u in zip(cond, uncond, strict=True))

    @staticmethod
    def _given_text(given: uc.GivenText):
        """``text_model_output`` / ``text_attention_mask`` as jax arrays."""
        return jnp.asarray(given.embeds), jnp.asarray(given.hidden), jnp.asarray(given.mask)

    def _program(self, stage: str, graphdefs: dict, unravel: Callable, dtypes: dict, guided: bool, last: int):
        """``((params, scalars), state, rows, keys) -> x``: the stage's scan over per-image rows (every mode)."""
        scheduler, names = getattr(self, f"{stage}_scheduler"), NETS[stage]

        def program(params, state, rows, keys):
            self.trace_count += 1  # runs at trace time only
            net_params, scalars = params
            nets = [nnx.merge(graphdefs[name], net_params[name]) for name in names]
            inputs = unpack_rows(rows, unravel)
            cond = tuple(rows_to_guided(inputs[name]).astype(dtypes[name]) for name in COND[stage])
            model_fn = _model_fn(stage, nets[0], nets[-1], cond, guided, scalars["scale"], last)
            steps = inputs.get("steps")  # (b, calls, ...) explicit step noise (tests), or None
            noise_fn = None if steps is None else (lambda i: steps[:, i])
            x, _ = denoise_loop(
                scheduler, model_fn, inputs["x"], state, keys=None if steps is not None else keys, noise_fn=noise_fn,
                index_model_fn=True,
            )  # fmt: skip
            return x

        return program

    def _start(self, stage: str, request, key, noise_fns):
        """The stage's per-image inputs (start draw scaled, explicit step noise), its keys (B,) and schedule."""
        scheduler = getattr(self, f"{stage}_scheduler")
        shape, calls = request.shapes[stage], request.steps[stage]
        keys = None if key is None else per_example_keys(jax.random.fold_in(key, uc.STAGES.index(stage)), shape[0])
        start = request.latents[stage]
        if start is None and keys is None:
            raise ValueError(f"key: needed to draw the {stage} stage's start (or pass {stage}_latents)")
        x = per_example_normal(keys, shape[1:]) if start is None else jnp.asarray(start, jnp.float32)
        state = scheduler.set_timesteps(calls, like=x)
        inputs = {"x": x * state.init_noise_sigma}
        if noise_fns is not None:  # (B, calls, ...): image b's noise for every call travels in its row
            inputs["steps"] = jnp.stack([jnp.asarray(noise_fns[stage](i), x.dtype) for i in range(calls)], axis=1)
        keys = per_example_keys(jax.random.key(0), shape[0]) if keys is None else keys  # unused under noise_fns
        return inputs, keys, (lambda like: scheduler.set_timesteps(calls, like=like))

    def _run(self, stage: str, request, cond, key, noise_fns, where, scale: float = 0.0):
        """One stage's compiled scan from its start draw (given latents, else drawn from the stage's key), in
        ``where`` = (mode, mesh); ``cond`` (guidance order for the prior and decoder) travels as per-image rows."""
        mode, mesh = where
        inputs, keys, make_state = self._start(stage, request, key, noise_fns)
        guided = request.guided and stage != "super_res"
        cond = dict(zip(COND[stage], cond, strict=True))
        inputs.update({name: guided_to_rows(value, 2 if guided else 1) for name, value in cond.items()})
        dtypes = {name: jnp.asarray(value).dtype for name, value in cond.items()}
        rows, unravel, signature = pack_rows(inputs)
        split = {name: nnx.split(getattr(self, name)) for name in (n for names in NETS.values() for n in names)}
        graphdefs, params = {k: v[0] for k, v in split.items()}, {k: v[1] for k, v in split.items()}
        last, scheduler = request.steps[stage] - 1, getattr(self, f"{stage}_scheduler")
        static = (type(self).__name__, stage, type(scheduler).__name__, config_to_json_string(scheduler.config))
        static += (signature, tuple(sorted((k, str(v)) for k, v in dtypes.items())), guided, last)
        static += tuple(id(getattr(self, name)) for name in NETS[stage])
        fn = self.compiled(
            mode, mesh, static, lambda: self._program(stage, graphdefs, unravel, dtypes, guided, last),
            network=getattr(self, NETS[stage][0]),
        )  # fmt: skip
        scalars = {"scale": jnp.float32(scale)}
        out = self.run_program(fn, mode, mesh, params, scalars, make_state, rows, keys)
        if mode == "single" and not self._ahead_of_time:
            return out
        # off the devices it was split over; under ``compile`` the placeholder output is committed to a device, which
        # the next stage's real inputs are not: from the host, as here, both compile one program
        return jnp.asarray(jax.device_get(out))

    def _prior_stage(self, request, embeds, hidden, mask, key, noise_fns, where):
        cond = (embeds, hidden, mask)
        x = self._run("prior", request, cond, key, noise_fns, where, request.prior_guidance_scale)
        return self.prior.post_process_latents(x)

    def _decoder_stage(self, request, image_embeds, embeds, hidden, mask, key, noise_fns, where):
        context, time_embeds = self.text_proj(
            image_embeddings=image_embeds, prompt_embeds=embeds, text_encoder_hidden_states=hidden,
            do_classifier_free_guidance=request.guided,
        )  # fmt: skip
        context_mask = uc.decoder_attention_mask(mask, self.text_proj.config["clip_extra_context_tokens"])
        cond = (context, time_embeds, context_mask)
        x = self._run("decoder", request, cond, key, noise_fns, where, request.decoder_guidance_scale)
        return uc.clamp_image(x)

    def _super_res_stage(self, request, image, key, noise_fns, where):
        _, _, height, width = request.shapes["super_res"]
        cond = (uc.upsample_bicubic(image, height, width),)
        return self._run("super_res", request, cond, key, noise_fns, where)
