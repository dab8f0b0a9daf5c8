"""The shipped digits model: present, small, loads offline in both backends, and its samples are digits."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffusion_core import cli
from diffusion_core.training.presets import DIGITS_UNET_CONFIG, default_model_path


def test_shipped_model_is_a_small_diffusers_folder():
    root = default_model_path()
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    assert (root / "model_index.json").is_file() and (root / "scheduler" / "scheduler_config.json").is_file()
    assert weights.stat().st_size <= 10 * 2**20
    assert (root / "README.md").read_text().count("diffusion-core train") >= 1


def test_generate_without_model_uses_the_shipped_one_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    grid = tmp_path / "grid.png"
    assert cli.main(["generate", "--class", "4", "--num-images", "2", "--steps", "3", "--grid", str(grid)]) == 0
    size = DIGITS_UNET_CONFIG["sample_size"]
    assert Image.open(grid).size == (2 * size, size)


@pytest.mark.slow  # 200 samples x 50 guided steps, on both backends
@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_shipped_model_quality(backend):
    from tests.training.digits_quality import generate, quality

    figures = quality(*generate(None, backend, per_class=20))
    assert figures["svc_held_out_accuracy"] >= 0.97
    assert figures["classes_present"] == 10
    assert figures["class_match"] >= 0.9
    assert figures["frechet_ratio"] <= 1.5
    assert np.isfinite(figures["frechet_gen_vs_real"])
    assert figures["confident_fraction"] >= 0.9  # issue 9's bar (real held-out digits score ~90% here)
