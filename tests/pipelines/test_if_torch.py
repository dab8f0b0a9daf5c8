"""PyTorch DeepFloyd IF (``IFPipeline``, ``IFSuperResolutionPipeline``) against diffusers 0.42.1: the same generator
gives the same images (tiny random UNets, given T5 embeddings or prompts through a tiny T5 encoder and a trained T5
tokenizer, DDPM learned_range + thresholding, stochastic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_core.torch.pipelines.deepfloyd_if import (
    IFImg2ImgPipeline,
    IFInpaintingPipeline,
    IFPipeline,
    IFSuperResolutionPipeline,
)
from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline
from tests.pipelines import if_tiny
from tests.pipelines.tiny import swap_config

ATOL = 2e-3


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("if")
    out = {}
    for kind in if_tiny.ALL:
        ref = if_tiny.diffusers_if(kind)
        ref.save_pretrained(root / kind)
        ours = DiffusionPipeline.from_pretrained(root / kind)
        ours.set_progress_bar_config(disable=True)
        out[kind] = (ours, ref)
    return out


def _call_both(ours, ref, batch: int, image: np.ndarray | None = None, ours_extra=None, ref_extra=None, **kwargs):
    """Our images and diffusers' for the same arguments and seed; ``image`` (N, 3, h, w) in [-1, 1] reaches ours as
    numpy (B, h, w, 3) and diffusers as a torch (N, 3, h, w) tensor, the forms each reads as they are."""
    pos, neg = if_tiny.text_embeds(batch)
    common = dict(prompt_embeds=pos, num_inference_steps=3, output_type="np", **kwargs)
    if kwargs.get("guidance_scale", 7.0) > 1:
        common["negative_prompt_embeds"] = neg
    torch_args = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in common.items()}
    if image is not None:
        common["image"], torch_args["image"] = image.transpose(0, 2, 3, 1), torch.from_numpy(image)
    a = ours(generator=torch.Generator().manual_seed(0), **common, **(ours_extra or {})).images
    b = ref(generator=torch.Generator().manual_seed(0), **torch_args, **(ref_extra or {})).images
    return a, b


def test_loads_by_class_name_without_text_encoder_or_safety_checker(pipes):
    ours, _ = pipes[if_tiny.STAGE_I]
    assert type(ours) is IFPipeline
    assert ours.text_encoder is None and ours.safety_checker is None and ours.watermarker is None
    sr, _ = pipes[if_tiny.STAGE_II]
    assert type(sr) is IFSuperResolutionPipeline and sr.image_noising_scheduler is not None


@pytest.mark.parametrize(
    "kwargs",
    [dict(height=16, width=16), dict(guidance_scale=1.0, height=16, width=16), dict(num_images_per_prompt=2)],
    ids=["cfg", "no-cfg", "two-per-prompt-default-size"],
)
def test_stage_i_matches_diffusers(pipes, kwargs):
    ours, ref = pipes[if_tiny.STAGE_I]
    a, b = _call_both(ours, ref, 2 if "num_images_per_prompt" not in kwargs else 1, **kwargs)
    assert a.shape == b.shape
    assert if_tiny.unsaturated(b) > 0.2
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(), dict(noise_level=20, guidance_scale=1.0)], ids=["cfg", "no-cfg"])
def test_stage_ii_matches_diffusers(pipes, kwargs):
    ours, ref = pipes[if_tiny.STAGE_II]
    image = if_tiny.low_res_images(2)
    a, b = _call_both(ours, ref, 2, image=image, height=32, width=32, **kwargs)
    assert a.shape == (2, 32, 32, 3)
    assert if_tiny.unsaturated(b) > 0.2
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "kwargs", [dict(strength=0.6), dict(strength=1.0, guidance_scale=1.0, num_images_per_prompt=2)], ids=["0.6", "1.0"]
)
def test_img2img_matches_diffusers(pipes, kwargs):
    ours, ref = pipes[if_tiny.IMG2IMG]
    assert type(ours) is IFImg2ImgPipeline
    n = kwargs.get("num_images_per_prompt", 1)
    a, b = _call_both(ours, ref, 2 // n, image=if_tiny.low_res_images(2 // n, size=16), **kwargs)
    assert a.shape == (2, 16, 16, 3)
    assert if_tiny.unsaturated(b) > 0.2
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(), dict(strength=0.6, guidance_scale=1.0)], ids=["cfg", "0.6-no-cfg"])
def test_inpainting_matches_diffusers_and_keeps_the_unmasked_image(pipes, kwargs):
    ours, ref = pipes[if_tiny.INPAINT]
    assert type(ours) is IFInpaintingPipeline
    image, m = if_tiny.low_res_images(2, size=16), if_tiny.mask(16)
    ref_mask = {"mask_image": torch.from_numpy(m)[None, None]}  # diffusers' tensor form; ours gets (H, W) numpy
    a, b = _call_both(ours, ref, 2, image=image, ours_extra={"mask_image": m}, ref_extra=ref_mask, **kwargs)
    assert if_tiny.unsaturated(b) > 0.2
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    keep = m < 0.5  # outside the mask: the input image, in [0, 1]
    np.testing.assert_allclose(a[:, keep], np.clip(image.transpose(0, 2, 3, 1)[:, keep] / 2 + 0.5, 0, 1), atol=1e-6)


def test_inpainting_pil_inputs_resize_as_diffusers(pipes):
    """PIL image and mask are resized to the UNet's sample_size (short side; bicubic), as diffusers does."""
    from PIL import Image

    ours, ref = pipes[if_tiny.INPAINT]
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    mask = Image.fromarray((np.pad(np.ones((6, 10)), ((3, 3), (5, 5))) * 255).astype(np.uint8))
    pos, neg = (torch.from_numpy(e) for e in if_tiny.text_embeds(1))
    common = dict(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=2, output_type="np")
    a = ours(image=image, mask_image=mask, generator=torch.Generator().manual_seed(0), **common).images
    b = ref(image=image, mask_image=mask, generator=torch.Generator().manual_seed(0), **common).images
    assert a.shape == b.shape == (1, 32, 56, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_img2img_checks_strength(pipes):
    ours, _ = pipes[if_tiny.IMG2IMG]
    pos, neg = if_tiny.text_embeds(1)
    image = if_tiny.low_res_images(1, size=16).transpose(0, 2, 3, 1)
    with pytest.raises(ValueError, match="strength"):
        ours(image=image, strength=1.5, prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=2)


@pytest.mark.parametrize(
    ("name", "variance"),
    [("DPMSolverMultistepScheduler", None), ("DPMSolverMultistepScheduler", "learned_range")],
)
def test_scheduler_swap_splits_variance_as_diffusers(pipes, name, variance):
    """A scheduler without ``variance_type`` gets the first half of the UNet output; DPM-Solver with
    ``variance_type="learned_range"`` gets both halves and keeps the first itself (diffusers' rule). (diffusers'
    IF cannot run DDIM: its config has no variance_type; see the DDIM test below.)"""
    import diffusers

    from diffusion_core import schedulers

    ours, ref = pipes[if_tiny.STAGE_I]
    config = swap_config(ours.scheduler, name)  # DDPM's variance_type dropped
    if variance is not None:
        config["variance_type"] = variance
    saved = ours.scheduler, ref.scheduler
    try:
        ours.scheduler = schedulers.from_config(config)
        ref.scheduler = getattr(diffusers, name).from_config(config)
        a, b = _call_both(ours, ref, 1, height=16, width=16)
    finally:
        ours.scheduler, ref.scheduler = saved
    assert if_tiny.unsaturated(b) > 0.2
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_ddim_swap_gets_the_noise_half():
    """DDIM has no variance_type: it steps on the first C channels, deterministically at eta=0 (diffusers' IF
    raises AttributeError on this swap, so there is no reference to compare with)."""
    from diffusion_core import schedulers

    ref = if_tiny.diffusers_if(if_tiny.STAGE_I)
    ours = IFPipeline(
        unet=_our_unet(ref.unet), scheduler=schedulers.from_config(swap_config(ref.scheduler, "DDIMScheduler"))
    )
    ours.set_progress_bar_config(disable=True)
    pos, neg = if_tiny.text_embeds(1)
    common = dict(
        prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=2, output_type="np", height=16, width=16
    )
    lat = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    a = ours(latents=lat, generator=torch.Generator().manual_seed(0), **common).images
    b = ours(latents=lat, generator=torch.Generator().manual_seed(1), **common).images
    np.testing.assert_array_equal(a, b)
    assert if_tiny.unsaturated(a) > 0.2


def _our_unet(ref_unet):
    from diffusion_core.torch.models.unet_2d_condition import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(dict(ref_unet.config)).eval()
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    return unet


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(prompt="a cat"), "prompt_embeds"),  # no T5 here
        (dict(height=15), "height"),
        (dict(output_type="latent"), "output_type"),
        (dict(latents=np.zeros((1, 3, 8, 8), np.float32)), "latents"),
        (dict(clean_caption="yes"), "clean_caption"),
    ],
)
def test_stage_i_bad_arguments(pipes, kwargs, named):
    ours, _ = pipes[if_tiny.STAGE_I]
    pos, neg = if_tiny.text_embeds(1)
    args = {"prompt_embeds": pos, "negative_prompt_embeds": neg, "num_inference_steps": 1, **kwargs}
    if "prompt" in kwargs:
        args.pop("prompt_embeds")
        args.pop("negative_prompt_embeds")
    with pytest.raises(ValueError, match=named):
        ours(**args)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(noise_level=1000), "noise_level"),
        (dict(image=None), "image"),
        (dict(image=np.zeros((3, 8, 8, 3))), "image"),
    ],
)
def test_stage_ii_bad_arguments(pipes, kwargs, named):
    ours, _ = pipes[if_tiny.STAGE_II]
    pos, neg = if_tiny.text_embeds(1)
    args = dict(
        prompt_embeds=pos,
        negative_prompt_embeds=neg,
        image=if_tiny.low_res_images(1).transpose(0, 2, 3, 1),
        num_inference_steps=1,
    )
    with pytest.raises(ValueError, match=named):
        ours(**{**args, **kwargs})


def test_latents_fix_the_start(pipes):
    """The same ``latents`` and generator give the same images; another start gives others."""
    ours, _ = pipes[if_tiny.STAGE_I]
    pos, neg = if_tiny.text_embeds(1)
    lat = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    common = dict(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=2, output_type="np")
    a = ours(latents=lat, generator=torch.Generator().manual_seed(1), **common).images
    b = ours(latents=lat, generator=torch.Generator().manual_seed(1), **common).images
    c = ours(latents=-lat, generator=torch.Generator().manual_seed(1), **common).images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2


@pytest.mark.parametrize(
    "mask",
    [None, np.zeros((3, 16, 16), np.float32), np.zeros((8, 8), np.float32), np.zeros((1, 2, 16, 16), np.float32)],
    ids=["missing", "three-for-one-prompt", "wrong-size", "two-channels"],
)
def test_inpainting_checks_the_mask(pipes, mask):
    ours, _ = pipes[if_tiny.INPAINT]
    pos, neg = if_tiny.text_embeds(1)
    image = if_tiny.low_res_images(1, size=16).transpose(0, 2, 3, 1)
    with pytest.raises(ValueError, match="mask_image"):
        ours(image=image, mask_image=mask, prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=1)


@pytest.mark.parametrize("kind", [if_tiny.IMG2IMG_SR, if_tiny.INPAINT_SR])
def test_super_resolution_variants_match_diffusers(pipes, kind):
    """Stage II from ``original_image`` at ``strength`` (and under a mask), next to the augmented low-res image."""
    ours, ref = pipes[kind]
    assert type(ours).__name__ == kind
    low, original = if_tiny.low_res_images(2), if_tiny.low_res_images(2, size=32, seed=6)
    ours_extra = {"original_image": original.transpose(0, 2, 3, 1)}
    ref_extra = {"original_image": torch.from_numpy(original)}
    if kind == if_tiny.INPAINT_SR:
        ours_extra["mask_image"] = if_tiny.mask(32)
        ref_extra["mask_image"] = torch.from_numpy(if_tiny.mask(32))[None, None]
    a, b = _call_both(ours, ref, 2, image=low, ours_extra=ours_extra, ref_extra=ref_extra, noise_level=100)
    assert a.shape == (2, 32, 32, 3)
    assert if_tiny.unsaturated(b) > 0.2
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def text_pipes(tmp_path_factory):
    """diffusers' stage I with a tiny T5 and a trained T5 tokenizer; its save loaded here in both tokenizer forms."""
    ref, folders = if_tiny.save_if_text_pipeline(tmp_path_factory.mktemp("if_text"))
    ours = {form: DiffusionPipeline.from_pretrained(folder) for form, folder in folders.items()}
    for pipe in ours.values():
        pipe.set_progress_bar_config(disable=True)
    return ours, ref


TEXT_CALL = dict(
    prompt=["A Red Fox  ", "An astronaut riding a horse on the moon, trending on artstation. " * 12],
    negative_prompt=["blurry", "dark water"], num_inference_steps=2, output_type="np", height=16, width=16,
    clean_caption=False,
)  # fmt: skip  # the second prompt is longer than 77 tokens: truncated, as diffusers does


@pytest.mark.parametrize("form", ["tokenizer_json", "spiece"])
def test_prompts_through_t5_from_pretrained_match_diffusers(text_pipes, form):
    """``IFPipeline.from_pretrained`` with a T5EncoderModel and a T5Tokenizer (``tokenizer.json`` as diffusers saved
    it, or DeepFloyd's ``spiece.model``): ``prompt=`` / ``negative_prompt=`` give diffusers' images."""
    from diffusion_core.tokenizers import T5Tokenizer
    from diffusion_core.torch.models.t5 import T5EncoderModel

    ours, ref = text_pipes[0][form], text_pipes[1]
    assert type(ours) is IFPipeline
    assert isinstance(ours.tokenizer, T5Tokenizer) and isinstance(ours.text_encoder, T5EncoderModel)
    a = ours(generator=torch.Generator().manual_seed(0), **TEXT_CALL).images
    b = ref(generator=torch.Generator().manual_seed(0), **TEXT_CALL).images
    assert if_tiny.unsaturated(b) > 0.2
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    other = ours(generator=torch.Generator().manual_seed(0), **{**TEXT_CALL, "prompt": ["a cat", "a dog"]}).images
    assert np.abs(other - a).max() > 1e-5  # the text reaches the images (weakly: small random UNet weights)


def test_prompt_without_cfg_and_several_images_per_prompt_match_diffusers(text_pipes):
    ours, ref = text_pipes[0]["spiece"], text_pipes[1]
    call = dict(prompt="a photo of a cat", guidance_scale=1.0, num_images_per_prompt=2, num_inference_steps=2,
                output_type="np", height=16, width=16, clean_caption=False)  # fmt: skip
    a = ours(generator=torch.Generator().manual_seed(1), **call).images
    b = ref(generator=torch.Generator().manual_seed(1), **call).images
    assert a.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_saved_pipeline_loads_in_diffusers(pipes, tmp_path):
    """Our save_pretrained of a stage II pipeline (absent components as [null, null]) is a diffusers IF folder."""
    import diffusers

    ours, ref = pipes[if_tiny.STAGE_II]
    ours.save_pretrained(tmp_path / "sr")
    again = diffusers.IFSuperResolutionPipeline.from_pretrained(tmp_path / "sr")
    again.set_progress_bar_config(disable=True)
    a, b = _call_both(ours, again, 1, image=if_tiny.low_res_images(1), height=32, width=32, noise_level=50)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    assert again.image_noising_scheduler.config.beta_schedule == "squaredcos_cap_v2"


@pytest.mark.parametrize("kind", [if_tiny.INPAINT, if_tiny.INPAINT_SR])
def test_inpainting_pipelines_name_the_missing_mask(pipes, kind):
    ours, _ = pipes[kind]
    pos, neg = if_tiny.text_embeds(1)
    with pytest.raises(ValueError, match=rf"mask_image: {kind} needs a mask \(1 where the image is redrawn\)"):
        ours(image=np.zeros((1, 16, 16, 3), np.float32), prompt_embeds=pos, negative_prompt_embeds=neg)
