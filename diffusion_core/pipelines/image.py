"""Image conversions shared by every pipeline: [-1, 1] <-> [0, 1], NCHW <-> NHWC, numpy <-> PIL, resizing.

The array functions take the caller's namespace (numpy, torch or jax arrays); PIL conversions and
resizing are host-side numpy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_core import arrays
from diffusion_core.configuration import write_bytes_atomic

OUTPUT_TYPES = ("pil", "np", "latent")
_RESAMPLE = ("nearest", "bilinear", "bicubic", "lanczos")


def check_output_type(output_type: str, accepted: Sequence[str] = OUTPUT_TYPES) -> str:
    """Return ``output_type`` when accepted; ValueError naming the accepted values otherwise."""
    if output_type not in accepted:
        raise ValueError(f"output_type must be one of {list(accepted)}, got {output_type!r}")
    return output_type


def normalize(images: Any) -> Any:
    """[0, 1] -> [-1, 1] (the range models see)."""
    return 2.0 * images - 1.0


def denormalize(images: Any) -> Any:
    """[-1, 1] -> [0, 1], clipped (``(x / 2 + 0.5).clamp(0, 1)``)."""
    xp = arrays.namespace(images)
    return xp.clip(images / 2 + 0.5, 0.0, 1.0)


def nchw_to_nhwc(images: Any) -> Any:
    """(B, C, H, W) -> (B, H, W, C)."""
    return arrays.namespace(images).permute_dims(images, (0, 2, 3, 1))


def nhwc_to_nchw(images: Any) -> Any:
    """(B, H, W, C) -> (B, C, H, W)."""
    return arrays.namespace(images).permute_dims(images, (0, 3, 1, 2))


def numpy_to_pil(images: np.ndarray) -> list:
    """(B, H, W, C) or (H, W, C) floats in [0, 1] -> PIL images (rounded to uint8; one channel -> mode L)."""
    from PIL import Image

    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images: expected (B, H, W, C) with C in 1, 3, 4, got shape {images.shape}")
    pixels = (images * 255).round().astype(np.uint8)
    if pixels.shape[-1] == 1:
        return [Image.fromarray(p[..., 0], mode="L") for p in pixels]
    return [Image.fromarray(p) for p in pixels]


def pil_to_numpy(images: Any) -> np.ndarray:
    """One PIL image or a list of them -> (B, H, W, C) float32 in [0, 1]."""
    from PIL import Image

    if isinstance(images, Image.Image):
        images = [images]
    if not images or not all(isinstance(im, Image.Image) for im in images):
        raise ValueError("images: expected a PIL image or a non-empty list of PIL images")
    arrs = [np.asarray(im, dtype=np.float32) / 255.0 for im in images]
    arrs = [a[..., None] if a.ndim == 2 else a for a in arrs]
    if len({a.shape for a in arrs}) != 1:
        raise ValueError(f"images: all images must have one size, got {sorted({a.shape for a in arrs})}")
    return np.stack(arrs)  # (B, H, W, C)


def resize_pil(images: Any, height: int, width: int, resample: str = "lanczos") -> list:
    """Resize PIL images to (height, width) with one of nearest/bilinear/bicubic/lanczos."""
    from PIL import Image

    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {list(_RESAMPLE)}, got {resample!r}")
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise ValueError(f"height/width must be positive ints, got {height!r}, {width!r}")
    mode = getattr(Image.Resampling, resample.upper())
    images = [images] if isinstance(images, Image.Image) else list(images)
    return [im.resize((width, height), resample=mode) for im in images]


def round_to_multiple(height: int, width: int, multiple: int) -> tuple[int, int]:
    """Round (height, width) down to multiples of ``multiple`` (the VAE scale factor), as diffusers does."""
    return height - height % multiple, width - width % multiple


def images_to_output(images_nchw: np.ndarray, output_type: str) -> Any:
    """Model-space (B, C, H, W) numpy images in [-1, 1] -> (B, H, W, C) in [0, 1], or PIL for ``"pil"``."""
    check_output_type(output_type, ("pil", "np"))
    out = nchw_to_nhwc(denormalize(np.asarray(images_nchw, dtype=np.float32)))
    return numpy_to_pil(out) if output_type == "pil" else out


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """(B, H, W, C) -> one (rows * H, cols * W, C) canvas, filled row by row; ``cols`` defaults to ceil(sqrt(B))."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images: expected a non-empty (B, H, W, C) array, got shape {images.shape}")
    n, h, w, c = images.shape
    cols = int(np.ceil(np.sqrt(n))) if cols is None else cols
    if not isinstance(cols, int) or cols < 1:
        raise ValueError(f"cols must be a positive int or None, got {cols!r}")
    rows = -(-n // cols)
    canvas = np.zeros((rows * h, cols * w, c), images.dtype)  # unused cells stay black
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        canvas[r * h : (r + 1) * h, k * w : (k + 1) * w] = im
    return canvas


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write one (H, W, C) uint8 image (C = 1 or 3) as a PNG atomically (beside, then renamed); returns the path."""
    import io

    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"image: expected (H, W, 1 or 3) uint8, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())
    return Path(path)
