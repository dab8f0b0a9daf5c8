"""The DDPM/DDIM (unconditional, pixel-space) pipeline recipe: the validated request, shapes, step options.

Backends bind it to their UNet, noise source and loop driver; the call flow is
``request = unconditional_request(...)``; ``x = (latents or noise) * init_noise_sigma`` -> denoise loop ->
:func:`finish`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffusion_core.pipelines.base import ImagePipelineOutput
from diffusion_core.pipelines.image import check_output_type, images_to_output
from diffusion_core.schedulers import Scheduler

DDPM_DEFAULT_STEPS = 1000
DDIM_DEFAULT_STEPS = 50


def check_call(batch_size: int, num_inference_steps: int, output_type: str) -> None:
    """Validate the common call arguments."""
    check_output_type(output_type, ("pil", "np"))
    if isinstance(batch_size, (str, list, tuple)):
        raise ValueError(
            f"an unconditional pipeline takes no prompt: its first argument is batch_size (a positive int), "
            f"got {batch_size!r}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")


def sample_shape(unet_config: Mapping[str, Any], batch_size: int) -> tuple[int, int, int, int]:
    """(B, C, H, W) of the generated images from the UNet's ``in_channels`` and ``sample_size``."""
    size = unet_config["sample_size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (int(batch_size), int(unet_config["in_channels"]), int(height), int(width))


def check_latents(latents: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """``latents`` as a float numpy array of exactly ``shape`` (None passes through)."""
    if latents is None:
        return None
    arr = np.asarray(latents)
    if arr.dtype.kind != "f":
        raise ValueError(f"latents must be a floating numpy array, got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"latents must have shape {tuple(shape)} (batch, channels, height, width), got {arr.shape}")
    return arr


@dataclass(frozen=True, eq=False)
class UnconditionalRequest:
    """A DDPM/DDIM call's arguments, checked once (:func:`unconditional_request`)."""

    shape: tuple[int, int, int, int]  # (B, C, H, W) of the generated images
    num_inference_steps: int
    latents: np.ndarray | None  # the starting draw, or None: the backend draws it
    step_kwargs: Mapping[str, Any]  # scheduler step options (DDIM: eta, use_clipped_model_output)
    output_type: str
    class_labels: np.ndarray | None = None  # (B,) int64 for a class-conditional UNet


def unconditional_request(
    unet_config: Mapping[str, Any],
    scheduler: Scheduler,
    *,
    batch_size: int,
    num_inference_steps: int,
    latents: Any = None,
    output_type: str = "pil",
    eta: float | None = None,
    use_clipped_model_output: bool | None = None,
    class_labels: Any = None,
) -> UnconditionalRequest:
    """Check a DDPM (``eta`` None) or DDIM call's arguments."""
    check_call(batch_size, num_inference_steps, output_type)
    shape = sample_shape(unet_config, batch_size)
    step = {} if eta is None else ddim_step_kwargs(scheduler, eta, use_clipped_model_output)
    labels = check_class_labels(class_labels, batch_size, unet_config)
    latents = check_latents(latents, shape)
    return UnconditionalRequest(shape, int(num_inference_steps), latents, step, output_type, labels)


def check_class_labels(class_labels: Any, batch_size: int, unet_config: Mapping[str, Any]) -> np.ndarray | None:
    """``class_labels`` as (B,) int64 in ``[0, num_class_embeds)``; required exactly for class-conditional UNets.

    One int applies to the whole batch.
    """
    classes = unet_config.get("num_class_embeds")
    if class_labels is None:
        if classes:
            raise ValueError(f"class_labels: the UNet is class-conditional ({classes} classes); pass class_labels")
        return None
    if not classes:
        raise ValueError("class_labels: the UNet is not class-conditional (no num_class_embeds)")
    labels = np.asarray(class_labels)
    if labels.dtype.kind not in "iu" or labels.ndim > 1:
        raise ValueError(f"class_labels must be an int or a 1-D sequence of ints, got {class_labels!r}")
    labels = np.broadcast_to(labels, (batch_size,)) if labels.ndim == 0 else labels
    if labels.shape != (batch_size,):
        raise ValueError(f"class_labels: expected {batch_size} labels (one per image), got {labels.shape[0]}")
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"class_labels must lie in [0, {classes}), got {labels.tolist()}")
    return labels.astype(np.int64)


def ddim_step_kwargs(scheduler: Scheduler, eta: float, use_clipped_model_output: bool | None) -> dict[str, Any]:
    """Step options for ``DDIMPipeline``: ``eta`` / ``use_clipped_model_output`` where the scheduler's
    ``step_options`` list them (DDIM); other schedulers accept only the defaults."""
    if isinstance(eta, bool) or not (isinstance(eta, (int, float)) and eta >= 0.0):
        raise ValueError(f"eta must be a number >= 0, got {eta!r}")
    given = {"eta": float(eta)}
    if use_clipped_model_output is not None:
        given["use_clipped_model_output"] = bool(use_clipped_model_output)
    taken = {name: value for name, value in given.items() if name in scheduler.step_options}
    if eta != 0.0 and "eta" not in taken or use_clipped_model_output and "use_clipped_model_output" not in taken:
        raise ValueError(
            f"eta/use_clipped_model_output: {type(scheduler).__name__} takes neither (its step options: "
            f"{sorted(scheduler.step_options)})"
        )
    return taken


def as_ddim(scheduler: Scheduler) -> Scheduler:
    """``DDIMScheduler.from_config(scheduler.config)``: what ``DDIMPipeline`` runs, as in diffusers."""
    from diffusion_core.schedulers import get_scheduler_class

    if isinstance(scheduler, get_scheduler_class("DDIMScheduler")):
        return scheduler
    return get_scheduler_class("DDIMScheduler").from_config(dict(scheduler.config))


def finish(images_nchw: np.ndarray, output_type: str, return_dict: bool) -> ImagePipelineOutput | tuple:
    """(B, C, H, W) numpy images in [-1, 1] -> the call's result (``.images`` or a 1-tuple)."""
    images = images_to_output(images_nchw, output_type)
    return ImagePipelineOutput(images) if return_dict else (images,)
