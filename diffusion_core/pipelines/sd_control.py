"""The ControlNet recipe of ``StableDiffusionControlNetPipeline`` (Zhang et al. 2023), written once.

Which steps the ControlNet acts on (``control_guidance_start``/``end``), how the control image joins the
guidance batch, and guess mode (ControlNet sees only the conditional half; zeros for the unconditional).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from diffusion_core import arrays

__all__ = ["check_control_options", "control_image_batch", "controlnet_keep", "guess_mode_residuals"]


def check_control_options(conditioning_scale: Any, start: Any, end: Any) -> None:
    """``controlnet_conditioning_scale`` a number; ``0 <= control_guidance_start < control_guidance_end <= 1``."""
    if isinstance(conditioning_scale, bool) or not isinstance(conditioning_scale, (int, float)):
        raise ValueError(f"controlnet_conditioning_scale must be a number (one ControlNet), got {conditioning_scale!r}")
    for name, value in (("control_guidance_start", start), ("control_guidance_end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if start >= end:
        raise ValueError(f"control_guidance_start ({start}) must be smaller than control_guidance_end ({end})")


def controlnet_keep(num_calls: int, start: float, end: float) -> np.ndarray:
    """(num_calls,) float32: 1 where the ControlNet acts, i.e. ``start <= i / n`` and ``(i + 1) / n <= end``."""
    i = np.arange(num_calls, dtype=np.float64)
    off = (i / num_calls < start) | ((i + 1) / num_calls > end)
    return (1.0 - off).astype(np.float32)


def control_image_batch(image: Any, batch_size: int, num_images_per_prompt: int, parts: int, guess_mode: bool) -> Any:
    """(b, 3, H, W) control images -> the ControlNet batch: each image repeated per generated image
    (b == 1: to the whole batch; else b must be the prompt count), then twice for CFG unless ``guess_mode``."""
    b = image.shape[0]
    if b != 1 and b * num_images_per_prompt != batch_size:
        raise ValueError(
            f"image: {b} control images for {batch_size // num_images_per_prompt} prompts; pass 1 or one each"
        )
    xp = arrays.namespace(image)
    out = xp.repeat(image, batch_size if b == 1 else num_images_per_prompt, axis=0)  # (B, 3, H, W)
    return xp.concat([out] * parts, axis=0) if parts > 1 and not guess_mode else out


def guess_mode_residuals(down: Sequence[Any], mid: Any, parts: int) -> tuple[list[Any], Any]:
    """Guess mode with CFG: the ControlNet ran on the conditional half only; zeros feed the unconditional half."""
    if parts == 1:
        return list(down), mid
    xp = arrays.namespace(mid)

    def pad(r: Any) -> Any:
        return xp.concat([xp.zeros_like(r)] * (parts - 1) + [r], axis=0)

    return [pad(r) for r in down], pad(mid)
