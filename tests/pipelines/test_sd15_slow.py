"""Slow: the SD-1.5 architecture (UNet, VAE, CLIP ViT-L/14 text encoder) with random weights runs
text-to-image end to end at 256x256 on both backends and gives diffusers' pixels."""

from __future__ import annotations

import diffusers
import jax
import numpy as np
import pytest
import torch

from benchmarks.pipelines import PROMPT, write_pipeline
from diffusion_core.flax import DiffusionPipeline as FlaxPipeline
from diffusion_core.torch import DiffusionPipeline as TorchPipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15")
    write_pipeline("sd15", root)
    return root / "sd15"


def test_sd15_architecture_text_to_image_256_on_both_backends(sd15_folder):
    latents = np.random.default_rng(0).standard_normal((1, 4, 32, 32)).astype(np.float32)
    kw = dict(num_inference_steps=2, guidance_scale=7.5, height=256, width=256, output_type="np")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd15_folder, safety_checker=None)
    with torch.inference_mode():
        expect = ref(PROMPT, latents=torch.from_numpy(latents), **kw).images
    ours_t = TorchPipeline.from_pretrained(sd15_folder)(PROMPT, latents=latents, **kw).images
    ours_f = FlaxPipeline.from_pretrained(sd15_folder)(PROMPT, latents=latents, key=jax.random.key(0), **kw).images
    assert expect.shape == ours_t.shape == np.asarray(ours_f).shape == (1, 256, 256, 3)
    np.testing.assert_allclose(ours_t, expect, atol=2e-3, rtol=0)
    np.testing.assert_allclose(np.asarray(ours_f), expect, atol=5e-3, rtol=0)
