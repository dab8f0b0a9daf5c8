"""The DDPM/DDIM (unconditional, pixel-space) pipeline recipe: the validated request, shapes, step options.

Backends bind it to their UNet, noise source and loop driver; the call flow is
``request = unconditional_request(...)``; ``x = (latents or noise) * init_noise_sigma`` -> denoise loop ->
:func:`finish`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_core import arrays
from diffusion_core.pipelines.base import ImagePipelineOutput
from diffusion_core.pipelines.guidance import classifier_free_guidance, do_classifier_free_guidance
from diffusion_core.pipelines.image import check_output_type, images_to_output
from diffusion_core.pipelines.model_index import CLASSES_FILE
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
    guidance_scale: float = 1.0  # classifier-free guidance over the class (> 1: on)
    unconditional_class_label: int | None = None  # the "no class" label the guidance contrasts with

    @property
    def guided(self) -> bool:
        return do_classifier_free_guidance(self.guidance_scale)

    @property
    def guiding_label(self) -> int | None:
        """The "no class" label the call's guidance contrasts with; None when guidance is off."""
        return self.unconditional_class_label if self.guided else None


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
    guidance_scale: float = 1.0,
    unconditional_class_label: int | None = None,
) -> UnconditionalRequest:
    """Check a DDPM (``eta`` None) or DDIM call's arguments."""
    check_call(batch_size, num_inference_steps, output_type)
    shape = sample_shape(unet_config, batch_size)
    step = {} if eta is None else ddim_step_kwargs(scheduler, eta, use_clipped_model_output)
    labels = check_class_labels(class_labels, batch_size, unet_config)
    latents = check_latents(latents, shape)
    scale, null = check_class_guidance(guidance_scale, unconditional_class_label, unet_config)
    return UnconditionalRequest(shape, int(num_inference_steps), latents, step, output_type, labels, scale, null)


def check_class_guidance(
    guidance_scale: Any, unconditional_class_label: Any, unet_config: Mapping[str, Any]
) -> tuple[float, int | None]:
    """``guidance_scale`` as a float (> 1: guidance on) and the "no class" label it needs.

    Guidance over the class contrasts each image's class with ``unconditional_class_label``: the label a model
    trained with class dropout learned as "no class" (``TrainConfig.class_dropout``; one past the real classes,
    recorded in the folder's ``classes.json``).
    """
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating, np.integer)):
        raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}")
    if not np.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    classes = unet_config.get("num_class_embeds")
    guided = do_classifier_free_guidance(float(guidance_scale))
    if guided and not classes:
        raise ValueError(f"guidance_scale={guidance_scale}: guidance needs a class-conditional UNet (num_class_embeds)")
    null = unconditional_class_label
    if null is not None:
        if isinstance(null, bool) or not isinstance(null, (int, np.integer)):
            raise ValueError(f"unconditional_class_label must be an int, got {null!r}")
        if not classes:
            raise ValueError("unconditional_class_label: the UNet is not class-conditional (no num_class_embeds)")
        if not 0 <= null < classes:
            raise ValueError(f"unconditional_class_label must lie in [0, {classes}), got {null}")
    elif guided:
        raise ValueError(
            f"unconditional_class_label: guidance_scale={guidance_scale} contrasts each class with the model's "
            f"'no class' label (trained with class dropout; e.g. {classes - 1}); pass it, or guidance_scale=1"
        )
    return float(guidance_scale), None if null is None else int(null)


def class_model(unet: Callable[[Any, Any, Any], Any], labels: Any, null: Any, scale: Any) -> Callable[[Any, Any], Any]:
    """The model function ``(sample, t) -> prediction`` of a DDPM/DDIM loop (torch or jax arrays).

    ``unet(sample, t, labels)`` is the backend's network call. With a "no class" label ``null`` (the request's
    :attr:`UnconditionalRequest.guiding_label`, or a traced copy) it runs once on ``cat([sample, sample])`` with
    ``cat([null labels, labels])`` and returns ``uncond + scale * (cond - uncond)``.
    """
    if labels is None or null is None:
        return lambda sample, t: unet(sample, t, labels)
    null_labels = labels * 0 + null

    def guided(sample: Any, t: Any) -> Any:
        xp = arrays.namespace(sample)
        out = unet(xp.concat([sample, sample]), t, xp.concat([null_labels, labels]))
        return classifier_free_guidance(out, scale)[0]

    return guided


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


@dataclass(frozen=True)
class ClassInfo:
    """What a class-conditional pipeline folder's ``classes.json`` says (written by ``train``)."""

    names: tuple[str, ...]  # label i's name
    unconditional_class_label: int | None = None  # the "no class" label (trained with class dropout), or None


def write_class_info(folder: str | os.PathLike, info: ClassInfo) -> None:
    """Write ``classes.json`` into a pipeline folder being assembled (the caller installs the folder atomically)."""
    data = {"class_names": list(info.names), "unconditional_class_label": info.unconditional_class_label}
    (Path(folder) / CLASSES_FILE).write_text(json.dumps(data, indent=2) + "\n")


def read_class_info(folder: str | os.PathLike) -> ClassInfo | None:
    """A pipeline folder's ``classes.json``, or None when it has none."""
    path = Path(folder) / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        names = tuple(str(n) for n in data["class_names"])
        null = data.get("unconditional_class_label")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected {{'class_names': [...], 'unconditional_class_label': int|null}}") from err
    if null is not None and (isinstance(null, bool) or not isinstance(null, int) or null < len(names)):
        raise ValueError(f"{path}: unconditional_class_label must be an int >= {len(names)} or null, got {null!r}")
    return ClassInfo(names, null)


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
