"""Captioned images for text-to-image training: HF imagefolder's ``metadata.jsonl`` layout or arrays in memory.

A folder holds image files and ``metadata.jsonl``, one JSON object per line with ``"file_name"`` (relative to the
folder) and ``"text"`` (the caption), as diffusers' ``train_text_to_image.py`` / ``train_text_to_image_lora.py``
read through ``datasets``' imagefolder. The backends encode these once with the frozen VAE and text encoder into an
:class:`~diffusion_core.training.data.ImageDataset` of latents with per-example ``conditioning``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from diffusion_core.training.data import ImageDataset, _resize

METADATA_FILE = "metadata.jsonl"


class CaptionedImages(NamedTuple):
    images: np.ndarray  # (N, 3, H, W) float32 in [-1, 1]
    captions: tuple[str, ...]  # caption of image i


def captioned_images(images: np.ndarray, captions: Sequence[str]) -> CaptionedImages:
    """The in-memory form, checked: ``images`` (N, 3, H, W) in [-1, 1] and one caption per image."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) in [-1, 1], got shape {images.shape}")
    if not np.all(np.isfinite(images)) or images.min() < -1 or images.max() > 1:
        raise ValueError("images must be finite values in [-1, 1]")
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"captions must be a sequence of str, got {captions!r}")
    if len(captions) != len(images):
        raise ValueError(f"captions: {len(captions)} captions for {len(images)} images (need one per image)")
    return CaptionedImages(images, tuple(captions))


def _metadata_rows(root: Path) -> list[tuple[str, str]]:
    path = root / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"data: no {METADATA_FILE} in {str(root)!r} (one {{'file_name', 'text'}} per line)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"data: {METADATA_FILE} line {number} is not JSON ({err})") from err
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("file_name"), str)
            or not isinstance(row.get("text"), str)
        ):
            raise ValueError(f"data: {METADATA_FILE} line {number} needs str 'file_name' and 'text', got {line!r}")
        rows.append((row["file_name"], row["text"]))
    if not rows:
        raise ValueError(f"data: {METADATA_FILE} in {str(root)!r} lists no images")
    return rows


def load_captioned_folder(folder: str | Path, size: int) -> CaptionedImages:
    """The images listed in ``folder/metadata.jsonl`` (RGB, resized to ``size`` square) and their captions."""
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"data: {str(root)!r} is not a folder")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    images, captions = [], []
    for name, text in _metadata_rows(root):
        path = root / name
        if not path.is_file() or root.resolve() not in path.resolve().parents:
            raise FileNotFoundError(f"data: {METADATA_FILE} names {name!r}, which is not an image file in the folder")
        with Image.open(path) as im:
            images.append(_resize(np.asarray(im.convert("RGB"), np.float32) / 255.0, size))
        captions.append(text)
    return captioned_images(np.stack(images) * 2 - 1, captions)


def is_captioned_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a ``metadata.jsonl`` (a captioned, text-to-image dataset)."""
    return (Path(folder) / METADATA_FILE).is_file()


def latent_dataset(latents: np.ndarray, context: np.ndarray) -> ImageDataset:
    """What the trainer consumes: scaled VAE latents (N, C, h, w) and the text context (N, L, D) per example."""
    if len(latents) != len(context):
        raise ValueError(f"context: {len(context)} rows for {len(latents)} latents")
    return ImageDataset(np.asarray(latents, np.float32), None, (), np.asarray(context, np.float32))


def training_scheduler(scheduler: Any) -> Any:
    """The noise scheduler of a fine-tuning run: a DDPMScheduler with the pipeline scheduler's config, as
    diffusers' training scripts load it (``DDPMScheduler.from_pretrained(model, subfolder="scheduler")``)."""
    from diffusion_core import schedulers

    return schedulers.from_config({**dict(scheduler.config), "_class_name": "DDPMScheduler"})


def encode_captioned(
    data: CaptionedImages,
    encode_images: Callable[[np.ndarray], np.ndarray],
    encode_ids: Callable[[np.ndarray], np.ndarray],
    tokenizer: Any,
    vae_config: Mapping[str, Any],
    batch_size: int = 8,
) -> ImageDataset:
    """Encode every example once with the frozen networks: latents ``scale_latents(mode of the VAE posterior)``
    and the captions' text context. ``encode_images``: (b, 3, H, W) -> unscaled latents; ``encode_ids``: (b, L)
    token ids -> (b, L, D); both return numpy."""
    from diffusion_core.pipelines.stable_diffusion import scale_latents, tokenize

    latents, context = [], []
    for start in range(0, len(data.images), batch_size):
        part = slice(start, start + batch_size)
        latents.append(scale_latents(np.asarray(encode_images(data.images[part]), np.float32), vae_config))
        context.append(np.asarray(encode_ids(tokenize(tokenizer, data.captions[part])), np.float32))
    return latent_dataset(np.concatenate(latents), np.concatenate(context))


SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")  # what text-to-image training uses


def check_sd_pipeline(pipe: Any, argument: str = "pipe") -> None:
    """ValueError unless ``pipe`` has the Stable Diffusion parts text-to-image training uses."""
    missing = [name for name in SD_PARTS if getattr(pipe, name, None) is None]
    if missing:
        raise ValueError(f"{argument}: not a Stable Diffusion pipeline (no {', '.join(missing)})")
