"""Training data on the host: the digits set, a folder of images, and the exactly reproducible batch order.

Which examples, timesteps and noise step ``s`` sees is a pure function of ``(seed, s)``, so a resumed
run needs only the step counter to continue the uninterrupted run's data order and randomness.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class ImageDataset(NamedTuple):
    images: np.ndarray  # (N, C, H, W) float32 in [-1, 1]
    labels: np.ndarray | None  # (N,) int64 class ids, or None (unconditional)
    class_names: tuple[str, ...]  # label i's name; () when unconditional
    conditioning: np.ndarray | None = None  # (N, L, D) per-example text context (encoder_hidden_states), or None


class StepBatch(NamedTuple):
    images: np.ndarray  # (B, C, H, W) float32
    labels: np.ndarray | None  # (B,) int64
    noise: np.ndarray  # (B, C, H, W) float32, standard normal
    timesteps: np.ndarray  # (B,) int64 in [0, num_train_timesteps)
    conditioning: np.ndarray | None = None  # (B, L, D) float32 text context, or None


def _resize(gray_or_rgb: np.ndarray, size: int) -> np.ndarray:
    """(H, W) or (H, W, C) float in [0, 1] -> (C, size, size), bilinear."""
    from PIL import Image

    planes = gray_or_rgb[..., None] if gray_or_rgb.ndim == 2 else gray_or_rgb
    out = [
        np.asarray(Image.fromarray(planes[..., c].astype(np.float32), mode="F").resize((size, size), 2))
        for c in range(planes.shape[-1])
    ]
    return np.stack(out).astype(np.float32)


def load_digits(size: int = 16) -> ImageDataset:
    """scikit-learn's 1,797 8x8 handwritten digits, upscaled (bilinear) to ``size``, one channel, classes 0-9."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:
        raise ValueError("data: 'digits' needs scikit-learn (pip install scikit-learn)") from err
    digits = sk_load_digits()
    images = np.stack([_resize(im / 16.0, size) for im in digits.images])  # (N, 1, size, size) in [0, 1]
    return ImageDataset((images * 2 - 1).clip(-1, 1), digits.target.astype(np.int64), tuple(str(d) for d in range(10)))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(folder: str | Path, size: int, channels: int = 3) -> ImageDataset:
    """Images in ``folder`` (resized to ``size`` square); one sub-folder per class makes it class-conditional."""
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"data: {str(root)!r} is not a folder")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = [(d.name, _image_files(d)) for d in class_dirs] if class_dirs else [("", _image_files(root))]
    mode = "L" if channels == 1 else "RGB"
    images, labels = [], []
    for label, (_, files) in enumerate(groups):
        for path in files:
            with Image.open(path) as im:
                arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
            images.append(_resize(arr, size))
            labels.append(label)
    if not images:
        raise ValueError(f"data: no images ({', '.join(IMAGE_SUFFIXES)}) in {str(root)!r}")
    stacked = np.stack(images) * 2 - 1
    if not class_dirs:
        return ImageDataset(stacked, None, ())
    return ImageDataset(stacked, np.asarray(labels, np.int64), tuple(name for name, _ in groups))


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> np.ndarray:
    """Example indices of step ``step``: consecutive slices of one fresh permutation per epoch. (B,)"""
    positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs = positions // num_examples
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, 0, int(epoch)]).permutation(num_examples)
        mask = epochs == epoch
        out[mask] = perm[positions[mask] % num_examples]
    return out


def unconditional_label(dataset: ImageDataset) -> int:
    """The label id a class-conditional model trained with class dropout learns as "no class": one past the last
    real class (its UNet has ``num_class_embeds = len(class_names) + 1``; DiT's convention)."""
    return len(dataset.class_names)


def num_class_embeds(dataset: ImageDataset, class_dropout: float) -> int | None:
    """The UNet's ``num_class_embeds`` for ``dataset``: its classes, plus the "no class" label under class dropout;
    None for unlabelled data (an unconditional UNet)."""
    classes = len(dataset.class_names)
    if dataset.labels is None or classes == 0:
        return None
    return classes + (1 if class_dropout > 0 else 0)


def step_batch(
    dataset: ImageDataset, step: int, batch_size: int, seed: int, num_train_timesteps: int, class_dropout: float = 0.0
) -> StepBatch:
    """Everything random that step ``step`` consumes, drawn from ``(seed, step)`` alone.

    With ``class_dropout`` p > 0 each label is replaced by :func:`unconditional_label` with probability p (the
    model learns the unconditional prediction too, for classifier-free guidance); the draw comes after the noise,
    so the other draws do not depend on p.
    """
    idx = batch_indices(step, batch_size, len(dataset.images), seed)
    images = dataset.images[idx]
    rng = np.random.default_rng([seed, 1, step])
    timesteps = rng.integers(0, num_train_timesteps, size=batch_size, dtype=np.int64)
    noise = rng.standard_normal(images.shape, dtype=np.float32)
    labels = None if dataset.labels is None else dataset.labels[idx]
    if labels is not None and class_dropout > 0:
        labels = np.where(rng.random(batch_size) < class_dropout, unconditional_label(dataset), labels)
    context = None if dataset.conditioning is None else dataset.conditioning[idx]
    return StepBatch(images, labels, noise, timesteps, context)
