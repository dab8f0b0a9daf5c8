"""Image-conditioned pipeline math, written once: img2img strength, inpaint masks, upscaler conditioning.

All array functions take the caller's namespace (numpy, torch or jax) and are free of value branches,
so they run inside ``jax.jit``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffusion_core import arrays

# --- img2img / inpaint: where the schedule starts -------------------------------------------------


def img2img_start(num_inference_steps: int, strength: float, order: int = 1) -> tuple[int, int]:
    """``(first model-call index, solver steps actually run)`` for ``strength`` in [0, 1].

    ``init = min(int(steps * strength), steps)``; the run skips the first ``steps - init`` solver
    steps (``order`` model calls each), as diffusers' ``get_timesteps``.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0.0, 1.0], got {strength!r}")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    init_steps = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_steps, 0)
    return t_start * order, num_inference_steps - t_start


# --- inpainting -----------------------------------------------------------------------------------


def binarize_mask(mask: Any) -> Any:
    """Mask values < 0.5 -> 0 (keep), >= 0.5 -> 1 (repaint)."""
    xp = arrays.namespace(mask)
    return xp.astype(mask >= 0.5, mask.dtype)


def masked_image(image: Any, mask: Any) -> Any:
    """The image with the repainted region zeroed: ``image * (mask < 0.5)``."""
    xp = arrays.namespace(image, mask)
    return image * xp.astype(mask < 0.5, image.dtype)


def _nearest_index(size_in: int, size_out: int) -> np.ndarray:
    """Source rows of nearest resizing ``floor(i * in / out)``, as ``torch.nn.functional.interpolate``."""
    return np.minimum(np.floor(np.arange(size_out) * (size_in / size_out)).astype(np.int64), size_in - 1)


def resize_nearest(x: Any, height: int, width: int) -> Any:
    """(B, C, H, W) -> (B, C, height, width) by nearest-neighbour sampling (F.interpolate's "nearest")."""
    xp = arrays.namespace(x)
    rows = arrays.host_to_like(_nearest_index(x.shape[2], height), x, integer=True)
    cols = arrays.host_to_like(_nearest_index(x.shape[3], width), x, integer=True)
    return xp.take(xp.take(x, rows, axis=2), cols, axis=3)


def mask_to_latents(mask: Any, latent_height: int, latent_width: int) -> Any:
    """A binarized (B, 1, H, W) pixel mask resized to the latent grid (nearest), as diffusers' inpaint."""
    return resize_nearest(binarize_mask(mask), latent_height, latent_width)


def repeat_to_batch(x: Any, batch_size: int, name: str) -> Any:
    """Tile (b, ...) to (batch_size, ...) when ``batch_size`` is a multiple of b."""
    b = x.shape[0]
    if batch_size % b:
        raise ValueError(f"{name}: batch {b} does not divide the requested batch size {batch_size}")
    xp = arrays.namespace(x)
    return xp.concat([x] * (batch_size // b), axis=0)


def inpaint_unet_input(scaled_latents: Any, mask: Any, masked_image_latents: Any) -> Any:
    """The 9-channel inpainting UNet input ``cat([x_t(4), mask(1), masked image latents(4)], axis=1)``."""
    xp = arrays.namespace(scaled_latents, mask, masked_image_latents)
    return xp.concat([scaled_latents, mask, masked_image_latents], axis=1)


def inpaint_blend(latents: Any, noised_image_latents: Any, mask: Any) -> Any:
    """4-channel UNets: keep the (re-noised) original outside the mask, ``(1 - m) * orig + m * x``."""
    return (1.0 - mask) * noised_image_latents + mask * latents


# --- x4 upscaler ----------------------------------------------------------------------------------


def check_noise_level(noise_level: int, max_noise_level: int) -> int:
    """The x4 upscaler's noise level: an int in [0, max_noise_level]."""
    if not isinstance(noise_level, (int, np.integer)) or not 0 <= noise_level <= max_noise_level:
        raise ValueError(f"noise_level must be an int in [0, {max_noise_level}] (max_noise_level), got {noise_level!r}")
    return int(noise_level)


def upscaler_condition(
    low_res_scheduler: Any, image: Any, noise: Any, noise_level: int, max_noise_level: int
) -> tuple[Any, Any]:
    """Noise the low-res image to ``noise_level`` with the low-res scheduler; returns ``(image, class_labels)``.

    ``class_labels`` is ``noise_level`` per image, int64 (B,), for the UNet's class embedding.
    """
    level = check_noise_level(noise_level, max_noise_level)
    labels = arrays.host_to_like(np.full((image.shape[0],), level), image, integer=True)
    return low_res_scheduler.add_noise(image, noise, labels), labels


# --- x2 latent upscaler (Karras preconditioning) ----------------------------------------------------


def latent_upscaler_image_cond(low_res_latents: Any, noise_level: float = 0.0) -> Any:
    """Nearest 2x-upsampled latents times ``(noise_level^2 + 1)^-1/2``: the UNet's extra input channels."""
    h, w = low_res_latents.shape[2], low_res_latents.shape[3]
    return resize_nearest(low_res_latents, 2 * h, 2 * w) * (noise_level**2 + 1) ** -0.5


def latent_upscaler_timestep_cond(pooled_text: Any, noise_level: float = 0.0) -> Any:
    """``cat([ones(64), zeros(64), pooled CLIP text], axis=1)``: the UNet's ``timestep_cond`` (noise level 0)."""
    if noise_level != 0.0:
        raise ValueError(f"noise_level: the x2 latent upscaler is conditioned on 0 only, got {noise_level!r}")
    xp = arrays.namespace(pooled_text)
    b = pooled_text.shape[0]
    ones = xp.ones((b, 64), dtype=pooled_text.dtype)
    zeros = xp.zeros((b, 64), dtype=pooled_text.dtype)
    return xp.concat([ones, zeros, pooled_text], axis=1)


def latent_upscaler_timestep(sigma: Any) -> Any:
    """The UNet's time input ``log(sigma) / 4``."""
    return arrays.namespace(sigma).log(sigma) * 0.25


def latent_upscaler_precondition(sample: Any, model_output: Any, sigma: Any) -> Any:
    """Karras et al. 2022 preconditioning: ``x / (s^2 + 1) + s / sqrt(s^2 + 1) * F`` (F drops its last channel)."""
    out = model_output[:, :-1, ...]  # (B, C, H, W): the last channel is unused
    return sample / (sigma**2 + 1) + sigma * (sigma**2 + 1) ** -0.5 * out
