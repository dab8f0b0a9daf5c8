"""Stable Diffusion XL (Podell et al. 2023), written once: the call's extra checks, the two-encoder prompt
embeddings, the size/crop (or aesthetic score) conditioning ids, and where ``denoising_start`` / ``denoising_end``
cut the schedule (the base -> refiner ensemble). The recipes are in ``sdxl_recipes``.

Array functions take the caller's namespace (numpy, torch, jax); the schedule cuts run on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffusion_core import arrays
from diffusion_core.pipelines import stable_diffusion as sd

__all__ = [
    "SDXL_COMPONENTS",
    "SDXL_OPTIONAL",
    "SDXLConditions",
    "base_time_ids",
    "check_stop",
    "encode_sdxl_prompt",
    "end_call",
    "refiner_time_ids",
    "start_call",
    "time_id_batch",
]

# StableDiffusionXL(Img2Img)Pipeline components, in diffusers' model_index order. The refiner has no first
# text encoder/tokenizer; image_encoder/feature_extractor (IP-Adapter) are accepted and unused.
SDXL_COMPONENTS = (
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "unet",
    "scheduler",
    "image_encoder",
    "feature_extractor",
)
SDXL_OPTIONAL = ("text_encoder", "tokenizer", "image_encoder", "feature_extractor")


def check_stop(stop: int | None, first: int, num_calls: int) -> int:
    """The model call a denoising loop ends before: ``stop`` (an int in (first, num_calls]) or ``num_calls``."""
    if stop is None:
        return num_calls
    if isinstance(stop, bool) or not isinstance(stop, int) or not first < stop <= num_calls:
        raise ValueError(f"stop must be None or an int in ({first}, {num_calls}] (model calls), got {stop!r}")
    return stop


# --- argument checks ------------------------------------------------------------------------------


def _pair(name: str, value: Any, default: tuple[int, int]) -> tuple[int, int]:
    """A (height, width) / (top, left) pair of non-negative ints, or ``default`` for None."""
    if value is None:
        return default
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    if not ok or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 for v in value):
        raise ValueError(f"{name} must be None or a (int, int) pair of non-negative ints, got {value!r}")
    return (int(value[0]), int(value[1]))


def fraction(name: str, value: Any) -> float | None:
    """``denoising_start`` / ``denoising_end``: None or a float strictly between 0 and 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (float, int)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be None or a float in (0, 1) (the fraction of the schedule), got {value!r}")
    return float(value)


def _score(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True, eq=False)
class SDXLConditions:
    """SDXL's arguments beyond :class:`~diffusion_core.pipelines.sd_recipe.SDRequest`, checked once."""

    prompt_2: Any  # str / list of str for the second encoder (default: prompt)
    negative_prompt_2: Any
    pooled_prompt_embeds: Any  # (B, P) with prompt_embeds, else None
    negative_pooled_prompt_embeds: Any
    time_ids: tuple[float, ...]  # the UNet's size/crop (or aesthetic) conditioning of the positive branch
    negative_time_ids: tuple[float, ...]
    denoising_start: float | None
    denoising_end: float | None


def check_sdxl_prompts(request: Any, a: Mapping[str, Any]) -> None:
    """The second prompts and pooled embeddings, as diffusers' SDXL ``check_inputs``."""
    for name in ("prompt_2", "negative_prompt_2"):
        value = a.get(name)
        if value is not None and not (isinstance(value, str) or (isinstance(value, list) and value)):
            raise ValueError(f"{name} must be None, a str or a non-empty list of str, got {type(value).__name__}")
    if a.get("prompt_2") is not None and request.prompt_embeds is not None:
        raise ValueError("prompt_2, prompt_embeds: pass one of them, not both")
    if request.prompt_embeds is not None and a.get("pooled_prompt_embeds") is None:
        raise ValueError("pooled_prompt_embeds: required with prompt_embeds (both from text_encoder_2)")
    if request.negative_prompt_embeds is not None and a.get("negative_pooled_prompt_embeds") is None:
        raise ValueError("negative_pooled_prompt_embeds: required with negative_prompt_embeds")


def sdxl_conditions(request: Any, a: Mapping[str, Any], time_ids: tuple[tuple, tuple]) -> SDXLConditions:
    """The checked SDXL arguments of a call's ``locals()`` ``a``; ``time_ids`` from :func:`base_time_ids` or
    :func:`refiner_time_ids`."""
    check_sdxl_prompts(request, a)
    start, end = (
        fraction("denoising_start", a.get("denoising_start")),
        fraction("denoising_end", a.get("denoising_end")),
    )
    if start is not None and end is not None and start >= end:
        raise ValueError(f"denoising_start ({start}) must be below denoising_end ({end})")
    return SDXLConditions(
        a.get("prompt_2"), a.get("negative_prompt_2"), a.get("pooled_prompt_embeds"),
        a.get("negative_pooled_prompt_embeds"), time_ids[0], time_ids[1], start, end,
    )  # fmt: skip


# --- conditioning ids ------------------------------------------------------------------------------


def base_time_ids(a: Mapping[str, Any], size: tuple[int, int]) -> tuple[tuple, tuple]:
    """``(positive, negative)`` ids ``original_size + crops_coords_top_left + target_size`` (base pipeline):
    sizes default to the generated ``size``; the negative ids differ only when both negative sizes are given."""
    original = _pair("original_size", a.get("original_size"), size)
    crops = _pair("crops_coords_top_left", a.get("crops_coords_top_left"), (0, 0))
    target = _pair("target_size", a.get("target_size"), size)
    neg_original = _pair("negative_original_size", a.get("negative_original_size"), original)
    neg_crops = _pair("negative_crops_coords_top_left", a.get("negative_crops_coords_top_left"), (0, 0))
    neg_target = _pair("negative_target_size", a.get("negative_target_size"), target)
    positive = (*original, *crops, *target)
    if a.get("negative_original_size") is None or a.get("negative_target_size") is None:
        return positive, positive
    return positive, (*neg_original, *neg_crops, *neg_target)


def refiner_time_ids(a: Mapping[str, Any], size: tuple[int, int], aesthetics: bool) -> tuple[tuple, tuple]:
    """``(positive, negative)`` ids of the img2img pipeline: ``original + crops + (aesthetic_score,)`` when the
    UNet was trained with aesthetic scores (the refiner), else ``original + crops + target`` (the negative
    ids then take the positive crops, as diffusers)."""
    original = _pair("original_size", a.get("original_size"), size)
    crops = _pair("crops_coords_top_left", a.get("crops_coords_top_left"), (0, 0))
    target = _pair("target_size", a.get("target_size"), size)
    neg_original = _pair("negative_original_size", a.get("negative_original_size"), original)
    neg_crops = _pair("negative_crops_coords_top_left", a.get("negative_crops_coords_top_left"), (0, 0))
    neg_target = _pair("negative_target_size", a.get("negative_target_size"), target)
    if aesthetics:
        score = _score("aesthetic_score", a.get("aesthetic_score", 6.0))
        negative_score = _score("negative_aesthetic_score", a.get("negative_aesthetic_score", 2.5))
        return (*original, *crops, score), (*neg_original, *neg_crops, negative_score)
    return (*original, *crops, *target), (*neg_original, *crops, *neg_target)


def check_time_id_width(unet_config: Mapping[str, Any], num_ids: int, pooled_dim: int) -> None:
    """The UNet's ``add_embedding`` input must be ``addition_time_embed_dim * num_ids + pooled width``."""
    expected = unet_config.get("projection_class_embeddings_input_dim")
    got = int(unet_config.get("addition_time_embed_dim") or 0) * num_ids + int(pooled_dim)
    if unet_config.get("addition_embed_type") != "text_time" or expected != got:
        raise ValueError(
            f"unet: expects an added embedding of width {expected}, but {num_ids} conditioning ids and "
            f"{pooled_dim}-wide pooled text make {got}; with an img2img pipeline set requires_aesthetics_score "
            "as the UNet was trained (True for the refiner)"
        )


def time_id_batch(positive: Sequence[float], negative: Sequence[float], batch: int, parts: int, like: Any) -> Any:
    """The UNet's ``time_ids`` (parts * batch, n): diffusers' ``cat([neg, pos]).repeat(batch, 1)`` (rows alternate
    negative/positive when both differ and batch > 1, as diffusers builds them) or the positive ids per image."""
    rows = np.asarray([negative, positive] if parts == 2 else [positive], np.float64)  # (parts, n)
    return arrays.host_to_like(np.tile(rows, (batch, 1)), like)  # (parts * batch, n)


# --- prompts --------------------------------------------------------------------------------------

# encode(encoder index, (B, L) ids, clip_skip) -> (hidden states (B, L, D), pooled (B, P) or None)
EncodeFn = Callable[[int, np.ndarray, "int | None"], tuple[Any, Any]]


def _encode_texts(encode: EncodeFn, tokenizers: Sequence[Any], texts: Sequence[list[str]], clip_skip, length=None):
    """Hidden states of every encoder concatenated on the feature axis, and the first pooled output."""
    hidden, pooled = [], None
    for i, (tokenizer, batch) in enumerate(zip(tokenizers, texts, strict=False)):  # one encoder: the first texts
        h, p = encode(i, sd.tokenize(tokenizer, batch, length), clip_skip)
        pooled = p if pooled is None else pooled
        hidden.append(h)
    if pooled is None:
        raise ValueError("text_encoder_2: must be a CLIPTextModelWithProjection (its text_embeds are the pooled text)")
    return arrays.namespace(hidden[0]).concat(hidden, axis=-1), pooled


def _texts(value: Any, fallback: Any, batch: int, name: str) -> list[str]:
    texts = sd.negative_texts(value if value is not None else fallback, batch)
    if len(texts) != batch:
        raise ValueError(f"{name}: got {len(texts)} texts for {batch} prompts")
    return texts


def encode_sdxl_prompt(
    encode: EncodeFn, tokenizers: Sequence[Any], request: Any, cond: SDXLConditions, zero_negative: bool,
    given: tuple[Any, Any, Any, Any],
) -> tuple[Any, Any, Any, Any]:  # fmt: skip
    """``(pos (B, L, D), pos pooled (B, P), neg, neg pooled)`` (negatives None without CFG), as diffusers'
    ``encode_prompt``: each encoder's penultimate layer (``clip_skip`` more layers back), concatenated; the
    pooled text of ``text_encoder_2``; zeros for the negative when there is no negative prompt and the pipeline
    says ``force_zeros_for_empty_prompt``. ``given``: ``(pos, pos pooled, neg, neg pooled)`` embeddings or None."""
    pos, pos_pooled, neg, neg_pooled = given
    if pos is None:
        texts = sd.prompt_texts(request.prompt)
        second = _texts(cond.prompt_2, request.prompt, len(texts), "prompt_2")
        pos, pos_pooled = _encode_texts(encode, tokenizers, [texts, second], request.clip_skip)
    if request.guidance.parts == 1 or neg is not None:
        return pos, pos_pooled, neg, neg_pooled
    xp = arrays.namespace(pos)
    if request.negative_prompt is None and zero_negative:
        return pos, pos_pooled, xp.zeros_like(pos), xp.zeros_like(pos_pooled)
    batch = int(pos.shape[0])
    first = _texts(request.negative_prompt, "", batch, "negative_prompt")
    second = _texts(cond.negative_prompt_2, request.negative_prompt or "", batch, "negative_prompt_2")
    neg, neg_pooled = _encode_texts(encode, tokenizers, [first, second], None, int(pos.shape[1]))
    return pos, pos_pooled, neg, neg_pooled


# --- where the schedule is cut ---------------------------------------------------------------------


def _cutoff(fraction_done: float, num_train_timesteps: int) -> int:
    return int(round(num_train_timesteps - fraction_done * num_train_timesteps))


def end_call(timesteps: Any, first: int, num_train_timesteps: int, denoising_end: float) -> int:
    """The model call ``denoising_end`` stops before: ``first`` + the remaining calls at timesteps >= the cutoff."""
    ts = np.asarray(timesteps, np.float64)[first:]
    return first + int(np.sum(ts >= _cutoff(denoising_end, num_train_timesteps)))


def start_call(timesteps: Any, num_train_timesteps: int, denoising_start: float, order: int) -> int:
    """The first model call of a ``denoising_start`` run: the calls at timesteps below the cutoff remain (an odd
    count for second-order schedulers, as diffusers)."""
    ts = np.asarray(timesteps, np.float64)
    remaining = int(np.sum(ts < _cutoff(denoising_start, num_train_timesteps)))
    if order == 2 and remaining % 2 == 0:
        remaining += 1
    if remaining < 1:
        raise ValueError(f"denoising_start: {denoising_start} leaves no model call; lower it or add steps")
    return len(ts) - remaining
