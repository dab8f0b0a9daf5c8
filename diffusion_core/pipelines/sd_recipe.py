"""Every Stable Diffusion pipeline defined once: the validated request and the recipe hooks both loop drivers run.

A backend's pipeline class mixes a recipe in (``class StableDiffusionInpaintPipeline(InpaintRecipe, TorchBase)``)
and adds only its public ``__call__`` (``generator=`` or ``key=``), the per-image inputs it builds with its
networks and RNG (``_inputs``), and the primitives below. The recipe owns, per pipeline:

- the request: every argument checked once (:func:`sd_request`, one set of messages);
- the schedule (:meth:`StableDiffusionRecipe._schedule`: custom ``timesteps``/``sigmas``, ``strength``);
- ``_start`` (latents entering the loop), ``_extra`` (extra UNet input channels), ``_model_fn`` (the guided
  model around the UNet: ``(x_scaled, t, i) -> prediction``), ``_post_step`` (``(x, state) -> x`` or None);
- ``encode_prompt`` and ``_decode`` (VAE decode and the output type).

Hooks see per-image ``inputs`` (``{name: (N, ...)}``, plus ``context`` in guidance-batch order), static ``opts``
(``strength``, ``first``, ``num_calls``, pipeline switches) and ``scalars`` (numbers the flax program traces). They
are free of value branches, so torch's Python loop and flax's ``lax.scan`` run the same code.

Backend primitives: ``_encode_ids(ids, clip_skip)`` (text encoder), ``_embeds_array(e)`` (given embeddings as the
backend's arrays), ``_vae_decode(z) -> numpy (N, 3, H, W)`` and ``_latent_output(latents)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffusion_core import arrays
from diffusion_core.pipelines import sd_image
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.base import ImagePipelineOutput
from diffusion_core.pipelines.image import images_to_output
from diffusion_core.weights.io import nonfinite_mask

__all__ = ["GUIDED_INPUTS", "SDRequest", "StableDiffusionRecipe", "images_of_inputs", "sd_request"]


@dataclass(frozen=True, eq=False)
class SDRequest:
    """The arguments every SD call shares, validated once (:func:`sd_request`)."""

    prompt: Any  # str, list of str, or None with prompt_embeds
    negative_prompt: Any
    prompt_embeds: Any  # (B, L, D) or None
    negative_prompt_embeds: Any
    num_images_per_prompt: int
    num_inference_steps: int
    eta: float
    output_type: str
    clip_skip: int | None
    guidance: sd.Guidance
    prompts: int  # B: the prompt batch

    @property
    def batch(self) -> int:
        """N: images generated, ``prompts * num_images_per_prompt``."""
        return self.prompts * self.num_images_per_prompt

    @property
    def scalars(self) -> tuple[tuple[str, float], ...]:
        """The guidance scales by name: numbers a compiled program takes as inputs (no retrace when they change)."""
        g = self.guidance
        image = () if g.image_guidance_scale is None else (("image_guidance_scale", g.image_guidance_scale),)
        return (("guidance_scale", g.guidance_scale), *image)


def sd_request(
    text_config: Mapping[str, Any],
    unet_config: Mapping[str, Any],
    *,
    prompt: Any,
    negative_prompt: Any = None,
    prompt_embeds: Any = None,
    negative_prompt_embeds: Any = None,
    num_images_per_prompt: int = 1,
    num_inference_steps: int,
    eta: float = 0.0,
    output_type: str = "pil",
    clip_skip: int | None = None,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
    image_guidance_scale: float | None = None,
) -> SDRequest:
    """Check a call's shared arguments (prompts, steps, images per prompt, eta, output, clip skip, guidance)."""
    prompts = sd.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
    sd.check_call_options(
        num_inference_steps=num_inference_steps, num_images_per_prompt=num_images_per_prompt, eta=eta,
        output_type=output_type, clip_skip=clip_skip, text_config=text_config,
    )  # fmt: skip
    g = sd.guidance(guidance_scale, guidance_rescale, unet_config, image_guidance_scale)
    return SDRequest(
        prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, int(num_images_per_prompt),
        int(num_inference_steps), float(eta), output_type, clip_skip, g, prompts,
    )  # fmt: skip


# Per-image inputs in guidance-batch order, (parts * N, ...) (``cat([neg, pos])``); every other input is (N, ...).
GUIDED_INPUTS = ("context", "time_cond", "text_embeds", "time_ids")


def images_of_inputs(inputs: Mapping[str, Any], images: slice, parts: int) -> dict[str, Any]:
    """The rows of ``inputs`` for images ``images`` (a slice of the N): each guidance part's rows of them for the
    ``GUIDED_INPUTS``, the images' rows for the rest. Works on numpy, torch and jax arrays."""
    out = {}
    for name, value in inputs.items():
        if name in GUIDED_INPUTS:
            n = value.shape[0] // parts
            grouped = value.reshape((parts, n, *value.shape[1:]))[:, images]  # (parts, n_share, ...)
            value = grouped.reshape((-1, *value.shape[1:]))  # (parts * n_share, ...)
        else:
            value = value[images]
        out[name] = value
    return out


# The ``__call__`` parameters an :class:`SDRequest` is built from (each pipeline has a subset of them).
REQUEST_ARGUMENTS = tuple(inspect.signature(sd_request).parameters)[2:]


def custom_schedule(timesteps: Any, sigmas: Any) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """The given custom schedule as ``(("timesteps" | "sigmas", values), ...)`` (hashable); the scheduler checks it."""
    given = (("timesteps", timesteps), ("sigmas", sigmas))
    return tuple((name, tuple(np.ravel(values).tolist())) for name, values in given if values is not None)


def schedule_state(
    scheduler: Any, num_inference_steps: int, like: Any, strength: float | None = None, custom: tuple = ()
) -> tuple[Any, int]:
    """``(scheduler state, first model call)``: a custom schedule, ``strength``'s mid-schedule start, or all of it."""
    if custom:
        return scheduler.set_timesteps(like=like, **{name: np.asarray(values) for name, values in custom}), 0
    if strength is None:
        return scheduler.set_timesteps(num_inference_steps, like=like), 0
    return sd_image.start_state(scheduler, num_inference_steps, strength, like)


class StableDiffusionRecipe:
    """Text to image, and the parts every SD pipeline shares; the image pipelines override the hooks."""

    _components = sd.SD_COMPONENTS
    _optional_components = sd.SD_OPTIONAL
    # Outdated scheduler options this pipeline rewrites at construction, as diffusers' (sd.legacy_scheduler_config).
    _legacy_scheduler_options: tuple[str, ...] = ()
    # Networks the denoising model function calls (besides nothing else: the VAE and text encoder run outside).
    _loop_networks: tuple[str, ...] = ("unet",)

    def __init__(self, **components: Any) -> None:
        super().__init__(**components)
        self.scheduler = sd.updated_scheduler(self.scheduler, self._legacy_scheduler_options, type(self).__name__)

    @property
    def vae_scale_factor(self) -> int:
        return sd.vae_scale_factor(self.vae.config)

    def _latent_channels(self) -> int:
        return int(self.vae.config["latent_channels"])

    def _request(self, arguments: Mapping[str, Any]) -> SDRequest:
        """The call's shared arguments, checked (:func:`sd_request`); ``arguments`` is the call's ``locals()``
        taken first thing in ``__call__`` (its parameters), of which the names in ``REQUEST_ARGUMENTS`` are used."""
        given = {name: arguments[name] for name in REQUEST_ARGUMENTS if name in arguments}
        return sd_request(self.text_encoder.config, self.unet.config, **given)

    # --- text -------------------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt: Any,
        num_images_per_prompt: int,
        guidance: sd.Guidance,
        negative_prompt: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        clip_skip: int | None = None,
    ) -> Any:
        """The UNet's text context (parts * N, L, D) in diffusers' batch order (``cat([neg, pos])`` for CFG)."""
        given = [None if e is None else self._embeds_array(e) for e in (prompt_embeds, negative_prompt_embeds)]
        pos, neg = sd.encode_prompts(
            self._encode_ids, self.tokenizer, prompt, negative_prompt, given[0], given[1], guidance.parts > 1, clip_skip
        )
        return sd.batch_embeddings(pos, neg, num_images_per_prompt, guidance)

    def _context(self, request: SDRequest) -> Any:
        r = request
        return self.encode_prompt(
            r.prompt, r.num_images_per_prompt, r.guidance, r.negative_prompt, r.prompt_embeds,
            r.negative_prompt_embeds, r.clip_skip,
        )  # fmt: skip

    # --- the recipe hooks -------------------------------------------------------------------------------

    def _schedule(self, num_inference_steps: int, like: Any, opts: Mapping[str, Any]) -> tuple[Any, int]:
        """``(state, first model call)`` for latents shaped as ``like``."""
        return schedule_state(self.scheduler, num_inference_steps, like, opts.get("strength"), opts.get("custom", ()))

    def _start(self, inputs: Mapping[str, Any], state: Any, opts: Mapping[str, Any]) -> Any:
        """Latents entering the loop: the Gaussian draw times ``init_noise_sigma``."""
        return inputs["noise"] * state.init_noise_sigma

    def _extra(self, inputs: Mapping[str, Any], g: sd.Guidance) -> Any:
        """Channels appended to the UNet input, (parts * N, C_extra, h, w), or None."""
        return None

    def _unet_kwargs(self, inputs: Mapping[str, Any], g: sd.Guidance, scalars: Mapping[str, Any]) -> dict[str, Any]:
        """Further UNet keywords for every model call (class labels)."""
        return {}

    def _model_fn(
        self, nets: Mapping[str, Any], inputs: Mapping[str, Any], g: sd.Guidance, scalars: Mapping[str, Any],
        state: Any, opts: Mapping[str, Any],
    ) -> Callable[[Any, Any, Any], Any]:  # fmt: skip
        """``(x_scaled, t, i) -> guided prediction``; ``i`` is the model-call index."""
        unet, context, extra = nets["unet"], inputs["context"], self._extra(inputs, g)
        kwargs = self._unet_kwargs(inputs, g, scalars)

        def model_fn(x: Any, t: Any, i: Any) -> Any:
            return sd.combine(unet(sd.model_input(x, g, extra), t, context, **kwargs), g)

        return model_fn

    def _post_step(self, inputs: Mapping[str, Any], opts: Mapping[str, Any]) -> Callable[[Any, Any], Any] | None:
        """``(x, new state) -> x`` after every scheduler step, or None."""
        return None

    def _stop(self, state: Any, opts: Mapping[str, Any]) -> int | None:
        """The model call the loop ends before (SDXL's ``denoising_end``), or None: the whole schedule."""
        return None

    # --- output -----------------------------------------------------------------------------------------

    def _vae_config(self) -> Mapping[str, Any]:
        """The VAE config the latents are decoded with (the x4 upscaler forces its scaling factor)."""
        return self.vae.config

    def _decode(self, latents: Any, output_type: str, return_dict: bool) -> ImagePipelineOutput | tuple:
        """Final latents -> images of ``output_type`` (``"latent"``: the latents themselves)."""
        if self.finite_check:
            check_finite(latents, "the denoised latents", LATENTS_HINT)
        if output_type == "latent":
            images = self._latent_output(latents)
        else:
            decoded = self._vae_decode(sd.unscale_latents(latents, self._vae_config()))  # (N, 3, H, W) numpy
            if self.finite_check:
                check_finite(decoded, "the VAE's decoded images", VAE_HINT)
            images = images_to_output(decoded, output_type)
        return ImagePipelineOutput(images) if return_dict else (images,)


LATENTS_HINT = (
    "the UNet or the scheduler overflowed: run the UNet in float32 (or bfloat16 rather than float16), "
    "or lower guidance_scale"
)
VAE_HINT = (
    "the usual cause is a float16 VAE overflowing: load the VAE in float32, or keep its config's "
    "force_upcast=True (SDXL's VAE needs it)"
)


def check_finite(values: Any, what: str, hint: str) -> None:
    """FloatingPointError naming ``what`` and the likely cause when ``values`` hold NaN or inf."""
    bad = nonfinite_mask(values)
    if bad.any():
        images = sorted({int(i) for i in np.nonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0]})
        raise FloatingPointError(f"NaN or inf in {what} (images {images} of {bad.shape[0]}): {hint}")


def repeat_parts(x: Any, parts: int) -> Any:
    """``cat([x] * parts)`` on the batch axis (x itself when ``parts == 1``)."""
    return x if parts == 1 else arrays.namespace(x).concat([x] * parts, axis=0)
