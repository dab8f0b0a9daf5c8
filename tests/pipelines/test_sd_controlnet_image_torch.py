"""PyTorch ``StableDiffusionControlNetImg2ImgPipeline`` / ``StableDiffusionControlNetInpaintPipeline`` against
diffusers 0.42.1, with two random ControlNets (every parameter random, the zero-initialised ones included).

diffusers' ControlNet img2img takes no start latents, so both sides run on the same torch generator seed (same
draw order: VAE posterior, then start noise; inpaint also the masked-image posterior). Pixels agree to 2e-3; each
comparison first checks that the second ControlNet moves the image by far more than that.
"""

import diffusers
import numpy as np
import pytest
import torch

from diffusion_core.torch import MultiControlNetModel
from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.torch.pipelines.stable_diffusion import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
)
from tests.pipelines import sd_tiny

ATOL = 2e-3
SIZE = 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn_image")
    img2img = sd_tiny.save_multi_controlnet_pipeline(root / "img2img", kind="StableDiffusionControlNetImg2ImgPipeline")
    inpaint = sd_tiny.save_multi_controlnet_pipeline(
        root / "inpaint9", kind="StableDiffusionControlNetInpaintPipeline", unet_in_channels=9
    )
    return img2img, inpaint


@pytest.fixture(scope="module")
def img2img(folders):
    return _pair(folders[0])


@pytest.fixture(scope="module")
def inpaint(folders):
    return _pair(folders[1])


def _pair(folder):
    ours = DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return ours, sd_tiny.load_diffusers(folder)


def _controls():
    return [torch.from_numpy(sd_tiny.sample_image(seed=s)).permute(0, 3, 1, 2) for s in (1, 2)]


def _both(ours, ref, **kwargs):
    common = dict(prompt=sd_tiny.PROMPT, num_inference_steps=3, output_type="np", **kwargs)
    a = ours(control_image=[c.numpy().transpose(0, 2, 3, 1) for c in _controls()], generator=_gen(), **common)
    b = ref(control_image=_controls(), generator=_gen(), **common)
    return a.images, b.images


def _gen():
    return torch.Generator().manual_seed(0)


def _second_net_matters(ours, **kwargs):
    common = dict(prompt=sd_tiny.PROMPT, num_inference_steps=3, output_type="np", **kwargs)
    control = [c.numpy().transpose(0, 2, 3, 1) for c in _controls()]
    both = ours(control_image=control, generator=_gen(), **common).images
    common["controlnet_conditioning_scale"] = [kwargs["controlnet_conditioning_scale"][0], 0.0]
    first = ours(control_image=control, generator=_gen(), **common).images
    assert np.abs(both - first).max() > 10 * ATOL


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(strength=0.7),
        dict(
            strength=0.8, control_guidance_start=[0.0, 0.3], controlnet_conditioning_scale=[0.9, 3.0], guess_mode=True
        ),
    ],
    ids=["strength", "windows-guess-mode"],
)
def test_controlnet_img2img_matches_diffusers(img2img, kwargs):
    ours, ref = img2img
    assert type(ours) is StableDiffusionControlNetImg2ImgPipeline and type(ours.controlnet) is MultiControlNetModel
    kwargs = {"image": sd_tiny.sample_image(seed=5), "controlnet_conditioning_scale": [0.9, 1.2], **kwargs}
    _second_net_matters(ours, **kwargs)
    a, b = _both(ours, ref, **kwargs)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_controlnet_inpaint_matches_diffusers(inpaint, strength):
    """A 9-channel inpainting UNet: the ControlNets see the 4-channel latents, the UNet the mask channels too."""
    ours, ref = inpaint
    assert type(ours) is StableDiffusionControlNetInpaintPipeline
    kwargs = dict(
        image=sd_tiny.sample_image(seed=5), mask_image=sd_tiny.sample_mask(), strength=strength,
        controlnet_conditioning_scale=[0.9, 1.2],
    )  # fmt: skip
    _second_net_matters(ours, **kwargs)
    a, b = _both(ours, ref, **kwargs)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_controlnet_inpaint_with_a_text_to_image_unet_blends_like_diffusers(img2img):
    """A 4-channel UNet with one ControlNet: the known region is re-noised and kept after every step."""
    ours, ref = img2img
    nets = ours.controlnet.nets
    pipe = StableDiffusionControlNetInpaintPipeline(**{**ours.components, "controlnet": nets[0]})
    pipe.set_progress_bar_config(disable=True)
    ref_pipe = diffusers.StableDiffusionControlNetInpaintPipeline(
        **{**ref.components, "controlnet": ref.controlnet.nets[0]}
    )
    ref_pipe.set_progress_bar_config(disable=True)
    common = dict(
        prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(seed=5), mask_image=sd_tiny.sample_mask(),
        num_inference_steps=3, output_type="np", strength=0.8,
    )  # fmt: skip
    a = pipe(control_image=sd_tiny.sample_image(seed=1), generator=_gen(), **common).images
    b = ref_pipe(control_image=_controls()[0], generator=_gen(), **common).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_control_image_is_required_and_checked(img2img):
    ours = img2img[0]
    call = dict(prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(), num_inference_steps=2)
    with pytest.raises(ValueError, match="control_image: the ControlNet conditioning image is required"):
        ours(**call)
    with pytest.raises(ValueError, match="control_image: with 2 ControlNets"):
        ours(control_image=sd_tiny.sample_image(), **call)
    with pytest.raises(ValueError, match="strength"):
        ours(control_image=[sd_tiny.sample_image()] * 2, strength=1.5, **call)
