"""PyTorch x4 (``StableDiffusionUpscalePipeline``) and x2 latent (``StableDiffusionLatentUpscalePipeline``)
upscalers against diffusers 0.42.1 on tiny checkpoints (real CLIP vocab)."""

import numpy as np
import pytest
import torch

from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.torch.pipelines.stable_diffusion import (
    StableDiffusionLatentUpscalePipeline,
    StableDiffusionUpscalePipeline,
)
from tests.pipelines import sd_tiny

ATOL = 2e-3
X4 = "StableDiffusionUpscalePipeline"
X2 = "StableDiffusionLatentUpscalePipeline"


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("upscale")
    out = {}
    for kind in (X4, X2):
        folder = sd_tiny.save_sd_pipeline(root / kind, kind)
        ours = DiffusionPipeline.from_pretrained(folder)
        ours.set_progress_bar_config(disable=True)
        out[kind] = (ours, sd_tiny.load_diffusers(folder))
    return out


def _pt_image(image):
    return torch.from_numpy(image).permute(0, 3, 1, 2) * 2 - 1  # diffusers takes [-1, 1] NCHW tensors as they are


def test_upscalers_load_by_class_name(pipes):
    assert type(pipes[X4][0]) is StableDiffusionUpscalePipeline
    assert pipes[X4][0].max_noise_level == 350 and pipes[X4][0].low_res_scheduler is not None
    assert type(pipes[X2][0]) is StableDiffusionLatentUpscalePipeline


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(guidance_scale=1.0), dict(noise_level=50), dict(num_images_per_prompt=2, negative_prompt="blurry")],
    ids=["cfg", "no-cfg", "noise-level", "two-images"],
)
def test_x4_upscaler_matches_diffusers(pipes, kwargs):
    ours, ref = pipes[X4]
    n = kwargs.get("num_images_per_prompt", 1)
    image = sd_tiny.sample_image(16, 16)
    lat = sd_tiny.start_latents((n, 4, 16, 16))  # latents live at the low-res size
    common = dict(prompt=sd_tiny.PROMPT, num_inference_steps=3, output_type="np", **kwargs)
    a = ours(image=image, latents=lat, generator=torch.Generator().manual_seed(0), **common).images
    b = ref(image=_pt_image(image), latents=torch.from_numpy(lat), generator=torch.Generator().manual_seed(0),
            **common).images  # fmt: skip
    assert a.shape == (n, 32, 32, 3)  # the tiny VAE upsamples 2x
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_x4_upscaler_checks_noise_level_and_image_count(pipes):
    ours = pipes[X4][0]
    with pytest.raises(ValueError, match="noise_level must be an int in"):
        ours(sd_tiny.PROMPT, image=sd_tiny.sample_image(16, 16), noise_level=351, num_inference_steps=2)
    with pytest.raises(ValueError, match="one image per prompt"):
        ours([sd_tiny.PROMPT] * 2, image=sd_tiny.sample_image(16, 16), num_inference_steps=2)


@pytest.mark.parametrize("source", ["latents", "image"])
@pytest.mark.parametrize(
    "kwargs", [dict(), dict(guidance_scale=1.0), dict(negative_prompt="blurry")], ids=["cfg", "no-cfg", "negative"]
)
def test_x2_latent_upscaler_matches_diffusers(pipes, source, kwargs):
    ours, ref = pipes[X2]
    lat = sd_tiny.start_latents((1, 4, 16, 16))
    if source == "latents":
        low = sd_tiny.start_latents((1, 4, 8, 8), seed=3)
        ours_in, ref_in = low, torch.from_numpy(low)
    else:
        image = sd_tiny.sample_image(16, 16)
        ours_in, ref_in = image, _pt_image(image)
    common = dict(prompt=sd_tiny.PROMPT, num_inference_steps=3, output_type="np", **kwargs)
    a = ours(image=ours_in, latents=lat, generator=torch.Generator().manual_seed(0), **common).images
    b = ref(image=ref_in, latents=torch.from_numpy(lat), generator=torch.Generator().manual_seed(0), **common).images
    assert a.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_x2_takes_latents_from_a_text_to_image_run(pipes):
    ours, ref = pipes[X2]
    low = torch.from_numpy(sd_tiny.start_latents((1, 4, 8, 8), seed=5))
    lat = sd_tiny.start_latents((1, 4, 16, 16))
    common = dict(prompt=sd_tiny.PROMPT, num_inference_steps=2, output_type="latent")
    (a,) = ours(image=low, latents=lat, return_dict=False, **common)
    b = ref(image=low, latents=torch.from_numpy(lat), **common).images
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        ours(prompt_embeds=np.zeros((1, 77, 8), np.float32), image=low, num_inference_steps=2)


@pytest.mark.parametrize("kind", [X4, X2])
def test_saved_upscalers_load_in_diffusers(pipes, kind, tmp_path):
    ours = pipes[kind][0]
    ours.save_pretrained(tmp_path / "saved")
    again = sd_tiny.load_diffusers(tmp_path / "saved")
    assert type(again).__name__ == kind
    image = sd_tiny.sample_image(16, 16)
    lat = sd_tiny.start_latents((1, 4, 16, 16))
    common = dict(prompt=sd_tiny.PROMPT, num_inference_steps=2, output_type="np")
    a = ours(image=image, latents=lat, generator=torch.Generator().manual_seed(0), **common).images
    b = again(image=_pt_image(image), latents=torch.from_numpy(lat), generator=torch.Generator().manual_seed(0),
              **common).images  # fmt: skip
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
