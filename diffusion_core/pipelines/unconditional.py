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
) -> UnconditionalRequest:
    """Check a DDPM (``eta`` None) or DDIM call's arguments."""
    check_call(batch_size, num_inference_steps, output_type)
    shape = sample_shape(unet_config, batch_size)
    step = {} if eta is None else ddim_step_kwargs(scheduler, eta, use_clipped_model_output)
    return UnconditionalRequest(shape, int(num_inference_steps), check_latents(latents, shape), step, output_type)


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
