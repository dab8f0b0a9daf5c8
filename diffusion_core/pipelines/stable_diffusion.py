"""Stable Diffusion building blocks written once for every backend: checks, prompts, guidance batches, latents,
output. The pipelines assemble them into requests and recipes in ``sd_recipe`` / ``sd_recipes``.

Array functions take the caller's namespace (numpy, torch, jax) and have no value branches (jit-safe).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffusion_core import arrays
from diffusion_core.pipelines import guidance as guidance_math
from diffusion_core.pipelines.image import OUTPUT_TYPES, check_output_type
from diffusion_core.pipelines.unconditional import check_latents

__all__ = [
    "SD_COMPONENTS",
    "SD_OPTIONAL",
    "Guidance",
    "batch_embeddings",
    "check_call_options",
    "check_latents",
    "check_prompt_inputs",
    "combine",
    "encode_prompt_pairs",
    "encode_prompts",
    "guidance",
    "latent_shape",
    "legacy_scheduler_config",
    "model_input",
    "negative_texts",
    "prompt_texts",
    "resolve_size",
    "step_kwargs",
    "tokenize",
    "unscale_latents",
    "updated_scheduler",
    "vae_scale_factor",
]

logger = logging.getLogger(__name__)

SIZE_MULTIPLE = 8  # diffusers requires height and width divisible by 8 for every SD pipeline

# A Stable Diffusion pipeline's components, in diffusers' model_index order.
SD_COMPONENTS = (
    "vae",
    "text_encoder",
    "tokenizer",
    "unet",
    "scheduler",
    "safety_checker",
    "feature_extractor",
    "image_encoder",
)
# Accepted and ignored (diffusers stores them as [null, null] when absent).
SD_OPTIONAL = ("safety_checker", "feature_extractor", "image_encoder")


# --- argument checks ------------------------------------------------------------------------------


def _is_texts(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
    )


def check_prompt_inputs(prompt: Any, negative_prompt: Any, prompt_embeds: Any, negative_prompt_embeds: Any) -> int:
    """Validate the prompt arguments as diffusers' ``check_inputs``; returns the prompt batch size."""
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("prompt, prompt_embeds: pass one of them, not both")
    if prompt is None and prompt_embeds is None:
        raise ValueError("prompt, prompt_embeds: pass one of them (a str, a list of str, or (B, L, D) embeddings)")
    if prompt is not None and not _is_texts(prompt):
        raise ValueError(f"prompt must be a str or a non-empty list of str, got {type(prompt).__name__}")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("negative_prompt, negative_prompt_embeds: pass at most one of them")
    if negative_prompt is not None and not _is_texts(negative_prompt):
        raise ValueError(f"negative_prompt must be a str or a non-empty list of str, got {type(negative_prompt)!r}")
    if prompt_embeds is not None and len(prompt_embeds.shape) != 3:
        raise ValueError(f"prompt_embeds must be (batch, tokens, dim), got shape {tuple(prompt_embeds.shape)}")
    if negative_prompt_embeds is not None and prompt_embeds is not None:
        if tuple(negative_prompt_embeds.shape) != tuple(prompt_embeds.shape):
            raise ValueError(
                f"negative_prompt_embeds must have the shape of prompt_embeds {tuple(prompt_embeds.shape)}, "
                f"got {tuple(negative_prompt_embeds.shape)}"
            )
    batch = len(prompt_texts(prompt)) if prompt is not None else int(prompt_embeds.shape[0])
    if isinstance(negative_prompt, list) and len(negative_prompt) != batch:
        raise ValueError(f"negative_prompt: got {len(negative_prompt)} texts for {batch} prompts")
    return batch


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_call_options(
    *,
    num_inference_steps: int,
    num_images_per_prompt: int,
    eta: float,
    output_type: str,
    clip_skip: int | None,
    text_config: Mapping[str, Any],
    output_types: Sequence[str] = OUTPUT_TYPES,
) -> None:
    """Validate the step count, images per prompt, ``eta``, ``output_type`` and ``clip_skip``."""
    _positive_int("num_inference_steps", num_inference_steps)
    _positive_int("num_images_per_prompt", num_images_per_prompt)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0.0:
        raise ValueError(f"eta must be a number >= 0 (0: deterministic DDIM), got {eta!r}")
    check_output_type(output_type, output_types)
    if clip_skip is not None:
        layers = int(text_config["num_hidden_layers"])
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer)) or not 0 <= clip_skip < layers:
            raise ValueError(
                f"clip_skip must be None or an int in [0, {layers}) (text encoder layers), got {clip_skip!r}"
            )


def vae_scale_factor(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent cell: ``2 ** (len(block_out_channels) - 1)``."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def resolve_size(
    height: int | None, width: int | None, unet_config: Mapping[str, Any], vae_config: Mapping[str, Any]
) -> tuple[int, int]:
    """Image size: default ``unet.sample_size * vae_scale_factor``; both must be positive multiples of 8."""
    size = unet_config["sample_size"]
    default_h, default_w = (size, size) if isinstance(size, int) else tuple(size)
    scale = vae_scale_factor(vae_config)
    height = default_h * scale if height is None else height
    width = default_w * scale if width is None else width
    for name, value in (("height", height), ("width", width)):
        _positive_int(name, value)
        if value % SIZE_MULTIPLE or value % scale:
            raise ValueError(f"{name} must be divisible by {max(SIZE_MULTIPLE, scale)}, got {value}")
    return int(height), int(width)


def latent_shape(batch: int, channels: int, height: int, width: int, scale: int) -> tuple[int, int, int, int]:
    """(B, C, height / scale, width / scale): the latents the UNet denoises."""
    return (int(batch), int(channels), int(height) // scale, int(width) // scale)


def step_kwargs(scheduler: Any, eta: float) -> dict[str, Any]:
    """Scheduler step options: ``eta`` where the scheduler's ``step_options`` list it (DDIM); other schedulers
    ignore it, as diffusers' SD pipelines do."""
    return {"eta": float(eta)} if "eta" in scheduler.step_options else {}


# --- prompts --------------------------------------------------------------------------------------


def prompt_texts(prompt: str | Sequence[str]) -> list[str]:
    """A str or list of str as a list."""
    return [prompt] if isinstance(prompt, str) else list(prompt)


def negative_texts(negative_prompt: str | Sequence[str] | None, batch_size: int) -> list[str]:
    """Unconditional texts for ``batch_size`` prompts: ``""`` by default; one str is used for every prompt."""
    if negative_prompt is None:
        return [""] * batch_size
    if isinstance(negative_prompt, str):
        return [negative_prompt] * batch_size
    texts = list(negative_prompt)
    if len(texts) != batch_size:
        raise ValueError(f"negative_prompt: got {len(texts)} texts for {batch_size} prompts")
    return texts


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int | None = None) -> np.ndarray:
    """(B, L) int64 ids padded to ``max_length`` (default: the tokenizer's ``model_max_length``), truncated."""
    length = tokenizer.model_max_length if max_length is None else int(max_length)
    enc = tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="np")
    return np.asarray(enc["input_ids"], dtype=np.int64)  # (B, L)


def encode_prompts(
    encode: Callable[[np.ndarray, int | None], Any],
    tokenizer: Any,
    prompt: Any,
    negative_prompt: Any,
    prompt_embeds: Any,
    negative_prompt_embeds: Any,
    unconditional: bool,
    clip_skip: int | None = None,
) -> tuple[Any, Any]:
    """``(pos, neg)`` text embeddings, (B, L, D) each; ``neg`` is None unless ``unconditional``.

    ``encode(ids, clip_skip)`` is the backend's text encoder; given embeddings are used as they are. The
    negative prompt is padded to the positive length and encoded without ``clip_skip``, as diffusers.
    """
    pos = prompt_embeds if prompt_embeds is not None else encode(tokenize(tokenizer, prompt_texts(prompt)), clip_skip)
    if not unconditional:
        return pos, None
    if negative_prompt_embeds is not None:
        return pos, negative_prompt_embeds
    ids = tokenize(tokenizer, negative_texts(negative_prompt, int(pos.shape[0])), max_length=int(pos.shape[1]))
    return pos, encode(ids, None)


def encode_prompt_pairs(
    encode_pair: Callable[[np.ndarray], tuple[Any, Any]],
    tokenizer: Any,
    prompt: Any,
    negative_prompt: Any,
    given: tuple[Any, Any, Any, Any],
    unconditional: bool,
) -> tuple[Any, Any]:
    """``(hidden (parts * B, L, D), pooled (parts * B, D))``: ``cat([neg, pos])`` each when ``unconditional``.

    ``encode_pair(ids) -> (hidden (B, L, D), pooled (B, D))`` is the backend's text encoder (the x2 latent
    upscaler's: last hidden states before the final norm); ``given`` is ``(pos, pos_pooled, neg, neg_pooled)``
    embeddings (None: encode the text). The negative prompt is padded to the positive length, as diffusers.
    """
    pos, pos_pooled, neg, neg_pooled = given
    if pos is None:
        pos, pos_pooled = encode_pair(tokenize(tokenizer, prompt_texts(prompt)))
    if not unconditional:
        return pos, pos_pooled
    if neg is None:
        ids = tokenize(tokenizer, negative_texts(negative_prompt, int(pos.shape[0])), max_length=int(pos.shape[1]))
        neg, neg_pooled = encode_pair(ids)
    xp = arrays.namespace(pos)
    return xp.concat([neg, pos], axis=0), xp.concat([neg_pooled, pos_pooled], axis=0)


# --- guidance -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Guidance:
    """How the model batch is built and combined: ``parts`` is 1 (none), 2 (CFG) or 3 (InstructPix2Pix)."""

    guidance_scale: float
    guidance_rescale: float = 0.0
    image_guidance_scale: float | None = None  # set only for InstructPix2Pix
    parts: int = 1


def guidance(
    guidance_scale: float,
    guidance_rescale: float,
    unet_config: Mapping[str, Any],
    image_guidance_scale: float | None = None,
) -> Guidance:
    """Validated guidance options; CFG runs when ``guidance_scale > 1`` and the UNet has no ``time_cond_proj_dim``.

    With ``image_guidance_scale`` (InstructPix2Pix) the 3-way batch runs when also ``image_guidance_scale >= 1``.
    """
    for name, value in (("guidance_scale", guidance_scale), ("image_guidance_scale", image_guidance_scale)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not 0.0 <= float(value) < float("inf"):  # also refuses NaN
            raise ValueError(f"{name} must be a finite number >= 0 (values in [0, 1] turn guidance off), got {value!r}")
    if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float)):
        raise ValueError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
    if image_guidance_scale is not None:
        on = guidance_math.do_pix2pix_guidance(guidance_scale, image_guidance_scale)
        return Guidance(float(guidance_scale), float(guidance_rescale), float(image_guidance_scale), 3 if on else 1)
    on = guidance_math.do_classifier_free_guidance(guidance_scale) and unet_config.get("time_cond_proj_dim") is None
    return Guidance(float(guidance_scale), float(guidance_rescale), None, 2 if on else 1)


def batch_embeddings(pos: Any, neg: Any, num_images_per_prompt: int, g: Guidance) -> Any:
    """The UNet's ``encoder_hidden_states``: each prompt repeated per image (p0, p0, p1, p1, ...), then
    ``cat([neg, pos])`` for CFG or ``cat([pos, neg, neg])`` for InstructPix2Pix. (parts * B * n, L, D)."""
    xp = arrays.namespace(pos)
    pos = xp.repeat(pos, num_images_per_prompt, axis=0)
    if g.parts == 1:
        return pos
    neg = xp.repeat(xp.astype(neg, pos.dtype), num_images_per_prompt, axis=0)
    return xp.concat([neg, pos] if g.parts == 2 else [pos, neg, neg], axis=0)


def model_input(x_scaled: Any, g: Guidance, extra: Any = None) -> Any:
    """The UNet input: ``x`` repeated ``g.parts`` times on the batch axis, then ``extra`` channels appended.

    ``extra`` (inpaint mask + masked latents, pix2pix image latents, upscaler image) is already (parts * B, ...).
    """
    xp = arrays.namespace(x_scaled)
    x = x_scaled if g.parts == 1 else xp.concat([x_scaled] * g.parts, axis=0)  # (parts * B, C, h, w)
    return x if extra is None else xp.concat([x, xp.astype(extra, x.dtype)], axis=1)


def combine(model_output: Any, g: Guidance) -> Any:
    """The guided prediction: identity, CFG (+ ``guidance_rescale``), or InstructPix2Pix's 3-way guidance."""
    if g.parts == 1:
        return model_output
    if g.parts == 3:
        return guidance_math.pix2pix_guidance(model_output, g.guidance_scale, g.image_guidance_scale)
    guided, cond = guidance_math.classifier_free_guidance(model_output, g.guidance_scale)
    return guidance_math.rescale_guidance(guided, cond, g.guidance_rescale)


# --- latents and output ---------------------------------------------------------------------------


def unscale_latents(latents: Any, vae_config: Mapping[str, Any]) -> Any:
    """What the VAE decodes: ``latents / scaling_factor + shift_factor`` (no shift when it is None)."""
    out = latents / vae_config["scaling_factor"]
    shift = vae_config.get("shift_factor")
    return out if shift is None else out + shift


def scale_latents(latents: Any, vae_config: Mapping[str, Any]) -> Any:
    """Encoded image latents into diffusion space: ``(latents - shift_factor) * scaling_factor``."""
    shift = vae_config.get("shift_factor")
    return (latents if shift is None else latents - shift) * vae_config["scaling_factor"]


# --- outdated scheduler configs ---------------------------------------------------------------------

# What diffusers' SD pipelines rewrite in an outdated scheduler config when they are constructed (with a
# deprecation warning): option -> (outdated when, replacement).
_LEGACY_FIXES = {
    "steps_offset": (lambda v: v is not None and v != 1, 1),
    "clip_sample": (lambda v: v is True, False),
    "skip_prk_steps": (lambda v: v is False, True),
}


def legacy_scheduler_config(config: Mapping[str, Any], options: Sequence[str]) -> dict[str, Any] | None:
    """The scheduler config with the outdated ``options`` fixed as diffusers' pipeline does, or None if current.

    ``StableDiffusionPipeline``/``Img2Img`` fix ``steps_offset`` (-> 1) and ``clip_sample`` (-> False); the
    inpaint pipeline ``steps_offset`` and ``skip_prk_steps`` (-> True).
    """
    fixes = {}
    for name in options:
        outdated, value = _LEGACY_FIXES[name]
        if name in config and outdated(config[name]):
            fixes[name] = value
    return {**config, **fixes} if fixes else None


def updated_scheduler(scheduler: Any, options: Sequence[str], owner: str) -> Any:
    """``scheduler`` itself, or a new one with the outdated ``options`` fixed (logs a warning naming ``owner``)."""
    fixed = legacy_scheduler_config(scheduler.config, options)
    if fixed is None:
        return scheduler
    changed = {k: v for k, v in fixed.items() if scheduler.config.get(k) != v}
    logger.warning("%s: outdated scheduler config, using %s as diffusers does", owner, changed)
    return type(scheduler).from_config(fixed)
