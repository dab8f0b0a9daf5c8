"""The sample grid every N steps: where it lands, what it holds, and that it leaves the run unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from diffusion_core import training
from diffusion_core.pipelines.image import image_grid
from diffusion_core.training import samples
from tests.training import tiny
from tests.training.harness import CONFIG, make_trainer

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def test_grid_layout_one_column_per_class_or_four_by_four():
    labels, cols = samples.grid_layout(tiny.dataset())
    assert cols == 3 and labels.tolist() == [0, 1, 2] * 4
    ten = training.ImageDataset(np.zeros((10, 1, 8, 8), np.float32), np.arange(10), tuple("0123456789"))
    assert samples.grid_layout(ten)[0].tolist() == list(range(10))
    plain = training.ImageDataset(np.zeros((4, 1, 8, 8), np.float32), None, ())
    assert samples.grid_layout(plain) == (None, 4)


def test_torch_grid_every_n_steps_from_the_ema_weights(tmp_path):
    trainer = make_trainer("torch")
    trainer.fit(tiny.dataset(), 4, tmp_path, progress=False, sample_every=2)
    written = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert written == ["step-000002.png", "step-000004.png"]
    grid = np.asarray(Image.open(tmp_path / "samples" / "step-000004.png"))
    assert grid.shape == (4 * 8, 3 * 8)  # 4 rows of the 3 classes, one channel
    from diffusion_core.torch import DDIMPipeline

    pipe = DDIMPipeline.from_pretrained(tmp_path)  # the exported pipeline holds the EMA weights
    labels = np.tile(np.arange(3), 4)
    images = pipe(
        batch_size=12,
        generator=[torch.Generator().manual_seed(CONFIG.seed + i) for i in range(12)],
        num_inference_steps=samples.SAMPLE_STEPS,
        output_type="np",
        class_labels=labels,
    ).images
    expected = image_grid((np.clip(images, 0, 1) * 255).round().astype(np.uint8), 3)[..., 0]
    np.testing.assert_array_equal(grid, expected)


def test_sampling_does_not_change_the_run(tmp_path):
    make_trainer("torch").fit(tiny.dataset(), 4, tmp_path / "plain", progress=False)
    make_trainer("torch").fit(tiny.dataset(), 4, tmp_path / "sampled", progress=False, sample_every=1)
    plain, sampled = load_file(tmp_path / "plain" / WEIGHTS), load_file(tmp_path / "sampled" / WEIGHTS)
    for key, value in plain.items():
        np.testing.assert_array_equal(sampled[key], value, err_msg=key)


@pytest.mark.slow  # flax jit compiles take minutes on a shared CPU
def test_flax_grid(tmp_path):
    make_trainer("flax").fit(tiny.dataset(), 2, tmp_path, progress=False, sample_every=1)
    grids = [np.asarray(Image.open(tmp_path / "samples" / f"step-00000{s}.png")) for s in (1, 2)]
    assert grids[0].shape == (32, 24) and not np.array_equal(grids[0], grids[1])


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3"])
def test_bad_sample_every(tmp_path, bad):
    with pytest.raises(ValueError, match="sample_every must be a positive int or None"):
        make_trainer("torch").fit(tiny.dataset(), 1, tmp_path, progress=False, sample_every=bad)
