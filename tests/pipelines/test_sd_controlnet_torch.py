"""PyTorch ``StableDiffusionControlNetPipeline`` against diffusers 0.42.1 (tiny checkpoint, non-zero ControlNet)."""

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_core import schedulers
from diffusion_core.pipelines import sd_control
from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.torch.pipelines.stable_diffusion import StableDiffusionControlNetPipeline
from tests.pipelines import sd_tiny, tiny

ATOL = 2e-3
SIZE = 32
KIND = "StableDiffusionControlNetPipeline"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = sd_tiny.save_sd_pipeline(tmp_path_factory.mktemp("controlnet") / "cn", KIND)
    ours = DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return ours, sd_tiny.load_diffusers(folder)


def _run(pair, batch=1, scheduler=None, **kwargs):
    ours, ref = pair
    ours_pipe = ours
    if scheduler is not None:
        ours_pipe = StableDiffusionControlNetPipeline(
            **{**ours.components, "scheduler": schedulers.from_config(tiny.swap_config(ours.scheduler, scheduler))}
        )
        ours_pipe.set_progress_bar_config(disable=True)
        ref = diffusers.StableDiffusionControlNetPipeline(
            **{**ref.components, "scheduler": getattr(diffusers, scheduler).from_config(ref.scheduler.config)}
        )
        ref.set_progress_bar_config(disable=True)
    lat = sd_tiny.start_latents((batch, 4, SIZE // 2, SIZE // 2))
    image = sd_tiny.sample_image()
    common = dict(prompt=sd_tiny.PROMPT, num_inference_steps=3, output_type="np", **kwargs)
    a = ours_pipe(image=image, latents=lat, **common).images
    b = ref(image=torch.from_numpy(image).permute(0, 3, 1, 2), latents=torch.from_numpy(lat), **common).images
    return a, b


def test_loads_with_its_controlnet(pair):
    assert type(pair[0]) is StableDiffusionControlNetPipeline
    assert type(pair[0].controlnet).__name__ == "ControlNetModel"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(guidance_scale=1.0),
        dict(guess_mode=True),
        dict(guess_mode=True, guidance_scale=1.0),
        dict(control_guidance_start=0.3, control_guidance_end=0.7, controlnet_conditioning_scale=0.5),
        dict(num_images_per_prompt=2, negative_prompt=sd_tiny.NEGATIVE),
    ],
    ids=["cfg", "no-cfg", "guess-mode", "guess-mode-no-cfg", "keep-window", "two-images"],
)
def test_controlnet_matches_diffusers(pair, kwargs):
    a, b = _run(pair, batch=kwargs.get("num_images_per_prompt", 1), **kwargs)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "scheduler", ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
)
def test_controlnet_scheduler_swap_matches_diffusers(pair, scheduler):
    a, b = _run(pair, scheduler=scheduler)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_controlnet_changes_the_image_and_pil_control_works(pair):
    ours = pair[0]
    lat = sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2))
    image = sd_tiny.sample_image()
    common = dict(prompt=sd_tiny.PROMPT, num_inference_steps=2, output_type="np", latents=lat)
    on = ours(image=image, **common).images
    off = ours(image=image, controlnet_conditioning_scale=0.0, **common).images
    pil = ours(image=Image.fromarray((image[0] * 255).round().astype(np.uint8)), **common).images
    assert np.abs(on - off).max() > 1e-2
    np.testing.assert_allclose(pil, on, atol=2e-2, rtol=0)  # uint8 quantisation of the control image only


def test_keep_schedule_and_bad_options():
    np.testing.assert_array_equal(sd_control.controlnet_keep(4, 0.25, 0.75), [0, 1, 1, 0])
    np.testing.assert_array_equal(sd_control.controlnet_keep(3, 0.0, 1.0), [1, 1, 1])
    with pytest.raises(ValueError, match="smaller than control_guidance_end"):
        sd_control.control_settings(1, 1.0, 0.5, 0.5)
    with pytest.raises(ValueError, match="control_guidance_end must be"):
        sd_control.control_settings(1, 1.0, 0.0, 1.5)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale"):
        sd_control.control_settings(1, [1.0, 0.5], 0.0, 1.0)


def test_missing_control_image_raises(pair):
    with pytest.raises(ValueError, match="image: the ControlNet conditioning image is required"):
        pair[0](sd_tiny.PROMPT, num_inference_steps=2)


def test_saved_controlnet_pipeline_loads_in_diffusers(pair, tmp_path):
    pair[0].save_pretrained(tmp_path / "saved")
    again = sd_tiny.load_diffusers(tmp_path / "saved")
    assert type(again).__name__ == KIND
    a, b = _run((pair[0], again))
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
