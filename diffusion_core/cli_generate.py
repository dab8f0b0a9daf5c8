"""The ``generate`` subcommand's work: which flags a pipeline takes, and the call that makes its images.

Two kinds of pipeline folders generate from nothing: pixel-space DDPM/DDIM (``--class`` for class-conditional
UNets) and text-to-image Stable Diffusion (``--prompt``, ``--negative-prompt``, ``--guidance``, ``--size``).
A flag the model cannot take is refused with one line naming it, before any weight is loaded. Under ``torchrun``
the torch pipelines split the images over the processes (``pipe.enable_distributed()``), image ``i`` still
starting from seed + i.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

PIXEL_PIPELINES = ("DDPMPipeline", "DDIMPipeline")
TEXT_TO_IMAGE_PIPELINES = ("StableDiffusionPipeline",)
TEXT_FLAGS = ("prompt", "negative_prompt", "size")  # argparse dests; shown as --prompt ...
DEFAULT_GUIDANCE = 7.5  # diffusers' StableDiffusionPipeline default
# Class guidance of models trained with class dropout (classes.json names their "no class" label); the shipped
# digits model's quality figures were measured with it (benchmarks/RESULTS.md).
DEFAULT_CLASS_GUIDANCE = 1.25


class UsageError(Exception):
    """A bad command-line argument (one line, exit status 2)."""


def parse_size(value: str) -> tuple[int, int]:
    """``--size``: ``HxW`` (``512x768``) or one number for a square, in pixels."""
    parts = value.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW in pixels (e.g. 512x768) or one number, got {value!r}")
    return sizes[0], sizes[1]


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def pipeline_class(model: str) -> str:
    """``model_index.json``'s pipeline class of a folder or Hub id (only configs are fetched)."""
    from diffusion_core.pipelines.hub import resolve_pipeline_configs

    try:
        return resolve_pipeline_configs(model)[1].class_name
    except FileNotFoundError as err:
        raise UsageError(f"--model: {err}") from err


def check_flags(model: str, class_name: str, args: argparse.Namespace) -> str:
    """``"pixel"`` or ``"text"``: the kind of ``class_name``, after refusing the flags it cannot take."""
    if class_name in PIXEL_PIPELINES:
        for dest in TEXT_FLAGS:
            if getattr(args, dest, None) is not None:
                raise UsageError(
                    f"{_flag(dest)}: the model {model!r} ({class_name}) takes no prompt or size; "
                    "leave it out (--class picks the class of a class-conditional model)"
                )
        return "pixel"
    if class_name in TEXT_TO_IMAGE_PIPELINES:
        if args.class_label:
            raise UsageError(f"--class: the model {model!r} ({class_name}) is text-to-image; use --prompt")
        if args.prompt is None:
            raise UsageError(f"--prompt: the model {model!r} ({class_name}) is text-to-image and needs a prompt")
        return "text"
    accepted = [*PIXEL_PIPELINES, *TEXT_TO_IMAGE_PIPELINES]
    raise UsageError(f"--model: generate runs {accepted}; {model!r} is a {class_name}")


def join_processes(backend: str) -> bool:
    """Under torchrun: join its process group (torch backend only); True on the process that writes files."""
    if "WORLD_SIZE" not in os.environ:
        return True
    if backend != "torch":
        raise UsageError(f"--backend: under torchrun the work splits over processes with torch, not {backend}")
    from diffusion_core.torch import distributed

    distributed.initialize("gloo")  # the command runs on the CPU; an already started group is used as it is
    return distributed.is_main_process()


def _set_scheduler(pipe: Any, scheduler: str | None) -> None:
    from diffusion_core import schedulers

    name = scheduler or "DDIMScheduler"
    try:
        pipe.scheduler = schedulers.from_config({**pipe.scheduler.config, "_class_name": name})
    except (KeyError, ValueError) as err:
        raise UsageError(f"--scheduler: {err}") from err
    pipe.set_progress_bar_config(disable=True)


def _randomness(backend: str, seed: int, num_images: int) -> dict[str, Any]:
    """Image i starts from seed + i (torch generators) or from ``fold_in(key(seed), i)`` (flax)."""
    if backend == "torch":
        import torch

        return {"generator": [torch.Generator().manual_seed(seed + i) for i in range(num_images)]}
    import jax

    return {"key": jax.random.key(seed)}


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def _class_labels(
    pipe: Any, model: str, num_images: int, class_labels: Sequence[int] | None, info: Any
) -> np.ndarray | None:
    """The label of each image: ``--class`` values in turn, or every class in turn; None when unconditional.

    ``info`` (the folder's ``classes.json``, or None) tells the real classes from the "no class" label.
    """
    classes = pipe.unet.config.get("num_class_embeds")
    if classes and info is not None:
        classes = min(classes, len(info.names))
    labels = None if not class_labels else np.resize(np.asarray(class_labels, np.int64), num_images)
    if labels is not None and not classes:
        raise UsageError(f"--class: the model {model!r} is not class-conditional; leave --class out")
    if labels is not None and (labels.min() < 0 or labels.max() >= classes):
        raise UsageError(f"--class: this model has classes 0 to {classes - 1}, got {sorted(set(class_labels))}")
    if labels is None and classes:  # no --class: cycle through every class (one per grid column for 10)
        labels = np.resize(np.arange(classes, dtype=np.int64), num_images)
    return labels


def _class_guidance(model: str, info: Any, guidance: float | None) -> dict[str, Any]:
    """The pipeline's guidance arguments for ``--guidance`` (None: the default) and the folder's ``classes.json``."""
    null = None if info is None else info.unconditional_class_label
    if null is None:
        if guidance is not None and guidance != 1.0:
            raise UsageError(
                f"--guidance: the model {model!r} has no 'no class' label to guide against (train it with "
                "--class-dropout); leave --guidance out"
            )
        return {}
    if guidance is not None and (not np.isfinite(guidance) or guidance < 0):
        raise UsageError(f"--guidance: expected a number >= 0, got {guidance}")
    return {
        "guidance_scale": DEFAULT_CLASS_GUIDANCE if guidance is None else guidance,
        "unconditional_class_label": null,
    }


def generate_images(
    model: str,
    backend: str,
    scheduler: str | None,
    steps: int,
    seed: int,
    num_images: int,
    class_labels: Sequence[int] | None,
    guidance: float | None = None,
) -> np.ndarray:
    """(B, H, W, C) uint8 images from a pixel-space DDPM/DDIM pipeline on ``backend``.

    A model whose ``classes.json`` names a "no class" label (trained with class dropout) samples with class
    guidance: ``guidance`` or :data:`DEFAULT_CLASS_GUIDANCE`.
    """
    from diffusion_core.pipelines.hub import resolve_pipeline_configs
    from diffusion_core.pipelines.unconditional import read_class_info

    if backend == "torch":
        from diffusion_core.torch import DDPMPipeline
    else:
        from diffusion_core.flax import DDPMPipeline
    info = read_class_info(resolve_pipeline_configs(model)[0])
    guided = _class_guidance(model, info, guidance)  # checked before any weight is read
    pipe = DDPMPipeline.from_pretrained(model)
    labels = _class_labels(pipe, model, num_images, class_labels, info)
    _set_scheduler(pipe, scheduler)
    if backend == "torch":
        pipe.enable_distributed()  # split over torchrun's processes (one process: the call runs whole)
    kwargs = {"batch_size": num_images, "num_inference_steps": steps, "output_type": "np", "class_labels": labels}
    kwargs.update(guided)
    return _to_uint8(pipe(**kwargs, **_randomness(backend, seed, num_images)).images)


def generate_text_images(model: str, args: argparse.Namespace) -> np.ndarray:
    """(B, H, W, 3) uint8 images of ``args.prompt`` from a text-to-image pipeline on ``args.backend``."""
    if args.backend == "torch":
        from diffusion_core.torch import DiffusionPipeline
    else:
        from diffusion_core.flax import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(model)
    _set_scheduler(pipe, args.scheduler)
    if args.backend == "torch":
        pipe.enable_distributed()
    height, width = args.size if args.size is not None else (None, None)
    kwargs = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "num_images_per_prompt": args.num_images,
        "num_inference_steps": args.steps,
        "guidance_scale": DEFAULT_GUIDANCE if args.guidance is None else args.guidance,
        "height": height,
        "width": width,
        "output_type": "np",
    }
    try:
        out = pipe(**kwargs, **_randomness(args.backend, args.seed, args.num_images))
    except ValueError as err:
        if "height" in str(err) or "width" in str(err):
            raise UsageError(f"--size: {err}") from err
        raise
    return _to_uint8(out.images)
