"""The ControlNet recipe of ``StableDiffusionControlNetPipeline`` (Zhang et al. 2023), written once.

The call's per-net options (one ControlNet or several: ``controlnet_conditioning_scale``, ``image``,
``control_guidance_start``/``end`` per net), which steps each ControlNet acts on, how the control images join the
guidance batch, and guess mode (ControlNet sees only the conditional half; zeros for the unconditional).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffusion_core import arrays

__all__ = [
    "ControlSettings",
    "control_image_batch",
    "control_images",
    "control_settings",
    "controlnet_keep",
    "controlnet_keeps",
    "guess_mode_residuals",
]


@dataclass(frozen=True)
class ControlSettings:
    """A call's per-ControlNet options, checked (:func:`control_settings`): one entry per net, in net order."""

    scales: tuple[float, ...]  # controlnet_conditioning_scale
    starts: tuple[float, ...]  # control_guidance_start: first fraction of the model calls the net acts on
    ends: tuple[float, ...]  # control_guidance_end: the fraction after which it stops


def _number(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)


def _per_net(name: str, value: Any, count: int, accepted: str) -> tuple[float, ...]:
    """``value`` (one number for every net, or a list of one number per net) as ``count`` floats."""
    if _number(value):
        return (float(value),) * count
    if isinstance(value, (list, tuple)) and len(value) == count and all(_number(v) for v in value):
        return tuple(float(v) for v in value)
    raise ValueError(f"{name} must be {accepted}, or a list of {count} of them (one per ControlNet), got {value!r}")


def control_settings(count: int, conditioning_scale: Any, start: Any, end: Any) -> ControlSettings:
    """The per-net options of a call with ``count`` ControlNets: each of ``controlnet_conditioning_scale``,
    ``control_guidance_start``/``end`` one number for every net or a list of one per net (diffusers' forms), with
    ``0 <= start < end <= 1`` for every net."""
    scales = _per_net("controlnet_conditioning_scale", conditioning_scale, count, "a number")
    starts = _per_net("control_guidance_start", start, count, "a number in [0, 1]")
    ends = _per_net("control_guidance_end", end, count, "a number in [0, 1]")
    for name, values in (("control_guidance_start", starts), ("control_guidance_end", ends)):
        if not all(0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"{name} must be in [0, 1] for every ControlNet, got {list(values)}")
    bad = [k for k in range(count) if starts[k] >= ends[k]]
    if bad:
        raise ValueError(
            f"control_guidance_start must be smaller than control_guidance_end for every ControlNet; "
            f"ControlNet {bad[0]}: {starts[bad[0]]} >= {ends[bad[0]]}"
        )
    return ControlSettings(scales, starts, ends)


def control_images(image: Any, count: int, multi: bool, name: str = "image") -> list[Any]:
    """The control image argument (``name``) as one control input per ControlNet. One ControlNet: the argument
    itself. Several: a list of one input per net, or (diffusers' nested form) a list per prompt holding one image per
    net."""
    if image is None:
        raise ValueError(f"{name}: the ControlNet conditioning image is required (PIL image(s) or numpy in [0, 1])")
    if not multi:
        return [image]
    accepted = f"a list of {count} control images, one per ControlNet (or one such list per prompt)"
    if not isinstance(image, (list, tuple)):
        raise ValueError(f"{name}: with {count} ControlNets pass {accepted}, got {type(image).__name__}")
    if any(isinstance(i, (list, tuple)) for i in image):
        if not all(isinstance(i, (list, tuple)) and len(i) == count for i in image):
            raise ValueError(
                f"{name}: with {count} ControlNets every per-prompt list needs {count} images ({accepted})"
            )
        return [_joined(per_net) for per_net in zip(*image, strict=True)]
    if len(image) != count:
        raise ValueError(f"{name}: with {count} ControlNets pass {accepted}, got {len(image)} entries")
    return list(image)


def _joined(images: Sequence[Any]) -> Any:
    """One net's images of the nested form: numpy arrays (H, W, C) / (b, H, W, C) joined into one batch; PIL images
    stay a list."""
    if all(isinstance(i, np.ndarray) and i.ndim in (3, 4) for i in images):
        return np.concatenate([i if i.ndim == 4 else i[None] for i in images])
    return list(images)


def controlnet_keep(num_calls: int, start: float, end: float) -> np.ndarray:
    """(num_calls,) float32: 1 where the ControlNet acts, i.e. ``start <= i / n`` and ``(i + 1) / n <= end``."""
    i = np.arange(num_calls, dtype=np.float64)
    off = (i / num_calls < start) | ((i + 1) / num_calls > end)
    return (1.0 - off).astype(np.float32)


def controlnet_keeps(num_calls: int, starts: Sequence[float], ends: Sequence[float], first: int = 0) -> np.ndarray:
    """(num_calls, nets) float32, row i for model call i, column k for net k (window ``starts[k]``..``ends[k]``):
    :func:`controlnet_keep` over the calls that run, ``first`` to ``num_calls - 1`` (a mid-schedule start at img2img
    ``strength``: the window is a fraction of the remaining calls, as diffusers); the skipped rows are 0."""
    runs = num_calls - first
    keeps = [controlnet_keep(runs, s, e) for s, e in zip(starts, ends, strict=True)]
    return np.concatenate([np.zeros((first, len(keeps)), np.float32), np.stack(keeps, axis=1)])


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
