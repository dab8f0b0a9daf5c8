"""PyTorch img2img / inpaint / InstructPix2Pix pipelines against diffusers 0.42.1 (tiny checkpoints, real CLIP vocab).

diffusers' img2img takes no ``latents`` and its inpaint ignores the image when given them, so strength < 1
runs compare with the same torch generators (same draw order); strength 1 and pix2pix also with numpy latents.
"""

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_core import schedulers
from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.torch.pipelines.stable_diffusion import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
)
from tests.pipelines import sd_tiny, tiny

ATOL = 2e-3
SIZE = 32
KINDS = ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionInstructPix2PixPipeline")
SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """{kind: (ours, diffusers)} loaded from one diffusers-saved folder per kind."""
    root = tmp_path_factory.mktemp("sd_image")
    out = {}
    for kind in KINDS:
        folder = sd_tiny.save_sd_pipeline(root / kind, kind)
        ours = DiffusionPipeline.from_pretrained(folder)
        ours.set_progress_bar_config(disable=True)
        ref = sd_tiny.load_diffusers(folder)
        ORIGINAL[id(ours)] = (ours.scheduler, ref.scheduler)
        out[kind] = (ours, ref)
    folder = sd_tiny.save_sd_pipeline(root / "inpaint4", "StableDiffusionInpaintPipeline", unet_in_channels=4)
    ours = DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    out["inpaint4"] = (ours, sd_tiny.load_diffusers(folder))
    ORIGINAL[id(ours)] = (ours.scheduler, out["inpaint4"][1].scheduler)
    return out


ORIGINAL = {}  # id(our pipeline) -> the loaded (ours, diffusers) schedulers; every swap starts from them


def _with_scheduler(pair, name):
    ours, ref = pair
    ours_sched, ref_sched = ORIGINAL[id(ours)]
    ours.scheduler = schedulers.from_config(tiny.swap_config(ours_sched, name))
    ref.scheduler = getattr(diffusers, name).from_config(ref_sched.config)


def _run(pair, seed=0, latents=None, generators=None, **kwargs):
    """Both pipelines on the same inputs and torch generator seed(s); returns (ours, reference) np images."""
    ours, ref = pair

    def gen():
        if generators is not None:
            return [torch.Generator().manual_seed(s) for s in generators]
        return torch.Generator().manual_seed(seed)

    common = dict(output_type="np", **kwargs)
    a = ours(generator=gen(), latents=latents, **common).images
    b_lat = None if latents is None else torch.from_numpy(latents)
    b = ref(generator=gen(), **({} if b_lat is None else {"latents": b_lat}), **common).images
    return a, b


def test_classes_dispatch_from_model_index(pipes):
    assert type(pipes[KINDS[0]][0]) is StableDiffusionImg2ImgPipeline
    assert type(pipes[KINDS[1]][0]) is StableDiffusionInpaintPipeline
    assert type(pipes[KINDS[2]][0]) is StableDiffusionInstructPix2PixPipeline


@pytest.mark.parametrize("scheduler", SCHEDULERS[:3])
def test_img2img_matches_diffusers_per_scheduler(pipes, scheduler):
    pair = pipes["StableDiffusionImg2ImgPipeline"]
    _with_scheduler(pair, scheduler)
    a, b = _run(pair, prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(), strength=0.6, num_inference_steps=4)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(guidance_scale=1.0, strength=0.8),
        dict(negative_prompt=sd_tiny.NEGATIVE, strength=1.0),
        dict(num_images_per_prompt=2, generators=(5, 6), strength=0.5),
        dict(num_images_per_prompt=2, strength=0.7),
    ],
    ids=["no-cfg", "negative-strength-1", "generator-list", "one-generator-two-images"],
)
def test_img2img_options_match_diffusers(pipes, kwargs):
    pair = pipes["StableDiffusionImg2ImgPipeline"]
    _with_scheduler(pair, "DDIMScheduler")
    a, b = _run(pair, prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(), num_inference_steps=3, **kwargs)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_img2img_pil_input_is_resized_like_diffusers(pipes):
    _with_scheduler(pipes["StableDiffusionImg2ImgPipeline"], "DDIMScheduler")
    pixels = (sd_tiny.sample_image(37, 35)[0] * 255).astype(np.uint8)
    a, b = _run(pipes["StableDiffusionImg2ImgPipeline"], prompt=sd_tiny.PROMPT, image=Image.fromarray(pixels),
                strength=0.75, num_inference_steps=2)  # fmt: skip
    assert a.shape == (1, 36, 34, 3)  # rounded down to the VAE scale factor (2)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_img2img_latents_are_the_start_noise(pipes):
    ours = pipes["StableDiffusionImg2ImgPipeline"][0]
    noise = sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2))
    common = dict(prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(), strength=0.6, num_inference_steps=3)
    one = ours(latents=noise, generator=torch.Generator().manual_seed(0), output_type="np", **common).images
    two = ours(latents=noise, generator=torch.Generator().manual_seed(0), output_type="np", **common).images
    other = ours(latents=noise + 1.0, generator=torch.Generator().manual_seed(0), output_type="np", **common).images
    np.testing.assert_array_equal(one, two)
    assert np.abs(one - other).max() > 1e-3


@pytest.mark.parametrize(
    "scheduler, strength",
    [(s, k) for s in SCHEDULERS for k in (1.0, 0.6)],
)
def test_inpaint_matches_diffusers(pipes, scheduler, strength):
    pair = pipes["StableDiffusionInpaintPipeline"]
    _with_scheduler(pair, scheduler)
    kwargs = dict(prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(), mask_image=sd_tiny.sample_mask(), height=SIZE,
                  width=SIZE, strength=strength, num_inference_steps=3)  # fmt: skip
    a, b = _run(pair, **kwargs)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    if strength == 1.0:  # numpy latents are the start noise: diffusers scales them by init_noise_sigma too
        a, b = _run(pair, latents=sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2)), **kwargs)
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("scheduler", ("DDIMScheduler", "DPMSolverMultistepScheduler", "HeunDiscreteScheduler"))
@pytest.mark.parametrize("kwargs", [dict(), dict(guidance_scale=1.0), dict(strength=0.6)], ids=["cfg", "no-cfg", "0.6"])
def test_inpaint_with_a_4_channel_unet_blends_like_diffusers(pipes, scheduler, kwargs):
    pair = pipes["inpaint4"]
    _with_scheduler(pair, scheduler)
    inputs = dict(image=sd_tiny.sample_image(), mask_image=sd_tiny.sample_mask(), height=SIZE, width=SIZE)
    a, b = _run(pair, prompt=sd_tiny.PROMPT, num_inference_steps=3, **inputs, **kwargs)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    keep = sd_tiny.sample_mask()[0, ..., 0] == 0
    image = sd_tiny.sample_image()[0]
    assert np.abs(a[0][keep] - image[keep]).mean() < np.abs(a[0][~keep] - image[~keep]).mean()


def test_inpaint_pil_inputs_and_cfg_off_match_diffusers(pipes):
    pair = pipes["StableDiffusionInpaintPipeline"]
    _with_scheduler(pair, "DDIMScheduler")
    image = Image.fromarray((sd_tiny.sample_image()[0] * 255).astype(np.uint8))
    mask = Image.fromarray((sd_tiny.sample_mask()[0, ..., 0] * 255).astype(np.uint8))
    a, b = _run(pair, prompt=[sd_tiny.PROMPT, "a cat"], image=image, mask_image=mask, height=SIZE, width=SIZE,
                guidance_scale=1.0, num_inference_steps=2)  # fmt: skip
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(guidance_scale=1.0),
        dict(image_guidance_scale=1.0, guidance_scale=4.0),
        dict(image_guidance_scale=0.5),
    ],
    ids=["3-way", "no-guidance", "image-scale-1", "image-scale-below-1"],
)
@pytest.mark.parametrize("scheduler", ("DDIMScheduler", "EulerDiscreteScheduler"))
def test_pix2pix_matches_diffusers(pipes, kwargs, scheduler):
    pair = pipes["StableDiffusionInstructPix2PixPipeline"]
    _with_scheduler(pair, scheduler)
    latents = sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2))
    a, b = _run(pair, latents=latents, prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(), num_inference_steps=3,
                **kwargs)  # fmt: skip
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_pix2pix_images_per_prompt_with_generators(pipes):
    pair = pipes["StableDiffusionInstructPix2PixPipeline"]
    _with_scheduler(pair, "EulerDiscreteScheduler")
    a, b = _run(pair, generators=(1, 2), prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(), num_images_per_prompt=2,
                num_inference_steps=2)  # fmt: skip
    assert a.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_bad_image_arguments_raise(pipes):
    img2img = pipes["StableDiffusionImg2ImgPipeline"][0]
    inpaint = pipes["StableDiffusionInpaintPipeline"][0]
    image, mask = sd_tiny.sample_image(), sd_tiny.sample_mask()
    with pytest.raises(ValueError, match="image: this pipeline needs it"):
        img2img("a", num_inference_steps=2)
    with pytest.raises(ValueError, match="strength must be in"):
        img2img("a", image=image, strength=1.5, num_inference_steps=2)
    with pytest.raises(ValueError, match="leaves no denoising step"):
        img2img("a", image=image, strength=0.1, num_inference_steps=2)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        img2img("a", image=image * 2 - 1, num_inference_steps=2)
    with pytest.raises(ValueError, match="mask_image: this pipeline needs it"):
        inpaint("a", image=image, height=SIZE, width=SIZE, num_inference_steps=2)
    with pytest.raises(ValueError, match="numpy images must be 32x32"):
        inpaint("a", image=image, mask_image=mask[:, :16], height=SIZE, width=SIZE, num_inference_steps=2)
    wrong = StableDiffusionInpaintPipeline(**pipes["StableDiffusionInstructPix2PixPipeline"][0].components)  # 8-ch
    with pytest.raises(ValueError, match="in_channels=9"):
        wrong("a", image=image, mask_image=mask, height=SIZE, width=SIZE, num_inference_steps=2)


@pytest.mark.parametrize(
    "scheduler", ["UniPCMultistepScheduler", "DEISMultistepScheduler", "DPMSolverSinglestepScheduler"]
)  # noqa: E501
@pytest.mark.parametrize("strength", [0.5, 0.75])
def test_multistep_mid_schedule_start_matches_diffusers(pipes, scheduler, strength):
    """A mid-schedule start warms the solver up again from the first executed step (set_timesteps(begin_index=))."""
    pair = pipes["StableDiffusionImg2ImgPipeline"]
    _with_scheduler(pair, scheduler)
    a, b = _run(pair, prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(), strength=strength, num_inference_steps=8)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
