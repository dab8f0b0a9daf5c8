"""A tiny captioned data set and the tiny SD pipeline of ``tests.pipelines.sd_tiny`` for text-to-image training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diffusion_core import training

SIZE = 32
CAPTIONS = ("a red square", "a blue circle", "a green line", "a red circle")


def images(n: int = 4, seed: int = 0) -> np.ndarray:
    """(n, 3, SIZE, SIZE) smooth colour patterns in [-1, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = []
    for _ in range(n):
        f = rng.uniform(1, 3, (3, 2))
        out.append(np.stack([np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy)) for c in range(3)]))
    return (0.9 * np.stack(out)).astype(np.float32)


def captioned(n: int = 4) -> training.CaptionedImages:
    return training.captioned_images(images(n), [CAPTIONS[i % len(CAPTIONS)] for i in range(n)])


def write_folder(folder: Path, n: int = 4) -> Path:
    """``n`` PNGs and their ``metadata.jsonl`` (HF imagefolder layout)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    data = captioned(n)
    rows = []
    for i, (image, text) in enumerate(zip(data.images, data.captions, strict=True)):
        pixels = np.round((image.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder
