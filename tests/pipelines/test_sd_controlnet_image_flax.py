"""Flax ``StableDiffusionControlNetImg2ImgPipeline`` / ``StableDiffusionControlNetInpaintPipeline`` against diffusers
0.42.1, with two random ControlNets (every parameter random, the zero-initialised ones included).

Our VAE posterior draws come from the call's key, diffusers' from a torch generator: diffusers is given our draw (the
img2img image as 4-channel latents; the inpaint masked-image latents through its VAE-encode hook) and the same start
noise. Deterministic DDIM: pixels agree to 5e-3; each comparison first checks that the second ControlNet moves the
image by far more than that. Each test compiles its own program: slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.flax.pipelines.sd_program import vae_encode_sample
from diffusion_core.flax.pipelines.stable_diffusion import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
)
from diffusion_core.flax.sampling import per_example_keys
from diffusion_core.pipelines import conditioning
from diffusion_core.pipelines import stable_diffusion as sd
from tests.pipelines import sd_tiny

ATOL = 5e-3
LATENT = (4, 16, 16)
STEPS = 3


def _posterior_latents(pipe, pixels, key, stream):
    """Our scaled VAE posterior draw for image 0 of a call with ``key`` (what the pipeline encodes)."""
    draw = vae_encode_sample(pipe.vae, jnp.asarray(pixels), per_example_keys(key, pixels.shape[0]), stream)
    return np.asarray(sd.scale_latents(draw, pipe.vae.config))


def _pixels(image):
    return 2.0 * image.transpose(0, 3, 1, 2) - 1.0  # (1, 3, H, W) in [-1, 1]


def _load(folder, cls):
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is cls
    pipe.set_progress_bar_config(disable=True)
    return pipe, sd_tiny.load_diffusers(folder)


def _controls():
    return [sd_tiny.sample_image(seed=s) for s in (1, 2)]


def _torch_controls():
    return [torch.from_numpy(c).permute(0, 3, 1, 2) for c in _controls()]


def _check_second_net(pipe, common):
    both = pipe(**common).images
    first = pipe(**{**common, "controlnet_conditioning_scale": [common["controlnet_conditioning_scale"][0], 0.0]})
    assert np.abs(both - first.images).max() > 10 * ATOL
    return both


@pytest.mark.slow
def test_controlnet_img2img_matches_diffusers(tmp_path):
    folder = sd_tiny.save_multi_controlnet_pipeline(tmp_path / "i2i", kind="StableDiffusionControlNetImg2ImgPipeline")
    pipe, ref = _load(folder, StableDiffusionControlNetImg2ImgPipeline)
    image, key = sd_tiny.sample_image(seed=5), jax.random.key(3)
    noise = torch.randn((1, *LATENT), generator=torch.Generator().manual_seed(11))
    options = dict(
        prompt=sd_tiny.PROMPT, strength=0.8, num_inference_steps=STEPS, output_type="np",
        controlnet_conditioning_scale=[0.9, 1.5], control_guidance_end=[0.6, 1.0],
    )  # fmt: skip
    a = _check_second_net(pipe, dict(image=image, control_image=_controls(), key=key, latents=noise.numpy(), **options))
    latents4 = torch.from_numpy(_posterior_latents(pipe, _pixels(image), key, 0))
    b = ref(image=latents4, control_image=_torch_controls(), generator=torch.Generator().manual_seed(11), **options)
    np.testing.assert_allclose(a, b.images, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_controlnet_inpaint_matches_diffusers(tmp_path, monkeypatch):
    folder = sd_tiny.save_multi_controlnet_pipeline(
        tmp_path / "inpaint", kind="StableDiffusionControlNetInpaintPipeline", unet_in_channels=9
    )
    pipe, ref = _load(folder, StableDiffusionControlNetInpaintPipeline)
    image, mask, key = sd_tiny.sample_image(seed=5), sd_tiny.sample_mask(), jax.random.key(5)
    masked = conditioning.masked_image(_pixels(image), mask.transpose(0, 3, 1, 2))
    masked_latents = torch.from_numpy(_posterior_latents(pipe, masked, key, 1))
    monkeypatch.setattr(ref, "_encode_vae_image", lambda image, generator: masked_latents)
    noise = torch.randn((1, *LATENT), generator=torch.Generator().manual_seed(12))
    options = dict(
        prompt=sd_tiny.PROMPT, image=image, mask_image=mask, num_inference_steps=STEPS, output_type="np",
        controlnet_conditioning_scale=[0.9, 1.2],
    )  # fmt: skip
    a = _check_second_net(pipe, dict(control_image=_controls(), key=key, latents=noise.numpy(), **options))
    b = ref(control_image=_torch_controls(), latents=noise, **options)
    np.testing.assert_allclose(a, b.images, atol=ATOL, rtol=0)
