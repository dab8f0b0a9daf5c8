"""The sample grid a training run writes every N steps: ``output_dir/samples/step-<step>.png``.

The same start noise (from the run's seed) and the same labels every time, so successive grids show
how the model improves rather than how the draw changes. A class-conditional model gets one column per
class. Sampling uses the EMA weights (what the exported pipeline holds) and never touches the training
randomness, so it does not change the run or its resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from diffusion_core.pipelines.image import image_grid, save_png
from diffusion_core.training.data import ImageDataset

SAMPLES_DIR = "samples"
SAMPLE_STEPS = 25  # DDIM steps per grid: enough for a readable picture, cheap next to training
GRID_IMAGES = 16  # unconditional grids are 4 x 4
MAX_GRID_ROWS = 4


class Sampler(Protocol):
    def sample_images(
        self, num_images: int, class_labels: np.ndarray | None, num_inference_steps: int, seed: int
    ) -> np.ndarray: ...  # (B, H, W, C) float in [0, 1]


def grid_layout(dataset: ImageDataset) -> tuple[np.ndarray | None, int]:
    """(labels of the grid's images or None, columns): one column per class, or a 4 x 4 unconditional grid."""
    classes = len(dataset.class_names)
    if dataset.labels is None or classes == 0:
        return None, int(np.sqrt(GRID_IMAGES))
    rows = min(MAX_GRID_ROWS, max(1, GRID_IMAGES // classes))
    return np.tile(np.arange(classes, dtype=np.int64), rows), classes


def sample_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / SAMPLES_DIR / f"step-{step:06d}.png"


def write_sample_grid(trainer: Sampler, dataset: ImageDataset, output_dir: str | Path, step: int, seed: int) -> Path:
    """Sample the current model and write the grid PNG for ``step`` (beside, then renamed); returns its path."""
    labels, cols = grid_layout(dataset)
    count = GRID_IMAGES if labels is None else len(labels)
    images = trainer.sample_images(count, labels, SAMPLE_STEPS, seed)  # (B, H, W, C) in [0, 1]
    pixels = (np.clip(np.asarray(images, np.float32), 0, 1) * 255).round().astype(np.uint8)
    return save_png(image_grid(pixels, cols), sample_path(output_dir, step))


def check_sample_every(sample_every: Any) -> None:
    if sample_every is not None and (not isinstance(sample_every, int) or sample_every < 1):
        raise ValueError(f"sample_every must be a positive int or None, got {sample_every!r}")
