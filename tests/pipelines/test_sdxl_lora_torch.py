"""LoRA on the PyTorch SDXL pipeline against diffusers 0.42.1 + peft: one PEFT file with UNet, ``text_encoder.``
and ``text_encoder_2.`` layers, at weight 1 and 0.5, fused and unloaded. Each parity test first checks that the
LoRA (and each part of it) changes the image by far more than the tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline
from tests.pipelines import lora_tiny, sd_tiny, sdxl_tiny

ATOL = 2e-3
EFFECT = 50 * ATOL
SIZE = 32
STEPS = 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_lora")
    return {"base": sdxl_tiny.save_sdxl_pipeline(root / "base"), "lora": lora_tiny.save_sdxl_peft_lora(root / "lora")}


@pytest.fixture
def ours(folders):
    pipe = DiffusionPipeline.from_pretrained(folders["base"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, torch_reference: bool = False) -> np.ndarray:
    latents = sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2))
    latents = torch.from_numpy(latents) if torch_reference else latents
    common = dict(prompt=sd_tiny.PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np")
    return pipe(latents=latents, **common).images


def _reference(folders, weight: float | None = None):
    ref = sd_tiny.load_diffusers(folders["base"])
    ref.load_lora_weights(folders["lora"], adapter_name="x")
    if weight is not None:
        ref.set_adapters("x", weight)
    return ref


def test_file_holds_all_three_parts(folders):
    with safe_open(folders["lora"] / "pytorch_lora_weights.safetensors", "np") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}


def test_sdxl_lora_matches_diffusers_at_weight_one_and_half(folders, ours):
    base = _run(ours)
    ours.load_lora_weights(folders["lora"], adapter_name="x")
    image = _run(ours)
    assert np.abs(image - base).max() > EFFECT
    np.testing.assert_allclose(image, _run(_reference(folders), torch_reference=True), atol=ATOL, rtol=0)
    ours.set_adapters("x", 0.5)
    half = _run(ours)
    assert np.abs(half - image).max() > EFFECT
    np.testing.assert_allclose(half, _run(_reference(folders, 0.5), torch_reference=True), atol=ATOL, rtol=0)


def test_each_text_encoder_part_matters(folders, tmp_path, ours):
    """The second text encoder's layers alone move the image (less than the whole LoRA: 10x the tolerance) and
    match diffusers: the ``text_encoder_2.`` keys are applied."""
    tensors = load_file(folders["lora"] / "pytorch_lora_weights.safetensors")
    only_te2 = {k: v for k, v in tensors.items() if k.startswith("text_encoder_2.")}
    save_file(only_te2, tmp_path / "te2.safetensors")
    base = _run(ours)
    ours.load_lora_weights(tmp_path, weight_name="te2.safetensors", adapter_name="te2")
    image = _run(ours)
    assert np.abs(image - base).max() > 10 * ATOL
    ref = sd_tiny.load_diffusers(folders["base"])
    ref.load_lora_weights(tmp_path, weight_name="te2.safetensors", adapter_name="te2")
    np.testing.assert_allclose(image, _run(ref, torch_reference=True), atol=ATOL, rtol=0)


def test_fuse_then_unload_restores_the_base_image(folders, ours):
    base = _run(ours)
    ours.load_lora_weights(folders["lora"], adapter_name="x")
    loaded = _run(ours)
    ours.fuse_lora()
    np.testing.assert_allclose(_run(ours), loaded, atol=ATOL, rtol=0)
    ours.unfuse_lora()
    ours.unload_lora_weights()
    np.testing.assert_allclose(_run(ours), base, atol=1e-5, rtol=0)
