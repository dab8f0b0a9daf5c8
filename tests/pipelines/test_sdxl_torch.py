"""PyTorch SDXL pipelines against diffusers 0.42.1 on tiny random-weight base/refiner folders (real CLIP vocab).

Each parity test loads a diffusers-saved folder with our ``DiffusionPipeline.from_pretrained`` and compares pixels
(``output_type="np"``) with diffusers on the same folder and start latents; each option is first checked to change
the image by far more than the tolerance, so the comparison cannot pass on a degenerate reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.torch.pipelines.stable_diffusion_xl import (
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from tests.pipelines import sd_tiny, sdxl_tiny

ATOL = 2e-3
SIZE = 32  # pixels; latents (B, 4, 16, 16) with the tiny VAE (scale factor 2)
STEPS = 3
LATENT_SHAPE = (4, SIZE // 2, SIZE // 2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = sdxl_tiny.save_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "base")
    ours = DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return ours, sd_tiny.load_diffusers(folder)


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    folder = sdxl_tiny.save_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "refiner", refiner=True)
    ours = DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return ours, sd_tiny.load_diffusers(folder)


def _run(pipe, lat, ours: bool, **kwargs):
    common = dict(num_inference_steps=STEPS, output_type="np", **kwargs)
    if lat is not None:
        common["latents"] = lat if ours else torch.from_numpy(lat)
    return pipe(**common).images


def _both(pipes, batch=1, **kwargs):
    lat = sd_tiny.start_latents((batch, 4, SIZE // 2, SIZE // 2))
    kwargs = dict(height=SIZE, width=SIZE, **kwargs)
    return _run(pipes[0], lat, True, **kwargs), _run(pipes[1], lat, False, **kwargs)


def test_loads_by_model_index_class_name(base, refiner):
    assert type(base[0]) is StableDiffusionXLPipeline
    assert type(refiner[0]) is StableDiffusionXLImg2ImgPipeline
    assert refiner[0].text_encoder is None and refiner[0].tokenizer is None
    assert refiner[0].settings == {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": True}
    # as SDXL ships them: the second tokenizer pads with "!" (id 0), the first with <|endoftext|>
    assert sd.tokenize(base[0].tokenizer_2, ["a"])[0, -1] == 0 and sd.tokenize(base[0].tokenizer, ["a"])[0, -1] == 49407


PLAIN = dict(prompt=sd_tiny.PROMPT)
OPTIONS = {
    "negative_and_second_prompts": dict(negative_prompt=sd_tiny.NEGATIVE, prompt_2="a red bird", negative_prompt_2="x"),
    "no_guidance": dict(guidance_scale=1.0),
    "denoising_end": dict(denoising_end=0.5),
    "size_conditioning_and_rescale": dict(
        original_size=(64, 48),
        crops_coords_top_left=(3, 4),
        target_size=(40, 40),
        guidance_rescale=0.7,
        negative_original_size=(20, 30),
        negative_target_size=(32, 32),
    ),  # fmt: skip
    "clip_skip": dict(clip_skip=1),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_text_to_image_matches_diffusers(base, name):
    a, b = _both(base, **PLAIN, **OPTIONS[name])
    assert a.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    plain = _both(base, **PLAIN)[1]
    assert np.abs(plain - b).max() > 20 * ATOL  # the option changes the image


def test_batch_images_per_prompt_and_ddim(base):
    ours, ref = base
    old = ours.scheduler, ref.scheduler
    restore = sd_tiny.swap_schedulers(ours, ref, "DDIMScheduler")
    try:
        a, b = _both(base, batch=4, prompt=[sd_tiny.PROMPT, "a cat"], num_images_per_prompt=2,
                     negative_original_size=(8, 8), negative_target_size=(16, 16))  # fmt: skip
    finally:
        restore()
    assert (ours.scheduler, ref.scheduler) == old
    assert a.shape == (4, SIZE, SIZE, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_prompt_embeds_and_latent_output(base):
    ours, ref = base
    with torch.no_grad():
        pos, neg, pooled, neg_pooled = ref.encode_prompt(sd_tiny.PROMPT, negative_prompt=sd_tiny.NEGATIVE)
    embeds = dict(prompt_embeds=pos, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                  negative_pooled_prompt_embeds=neg_pooled)  # fmt: skip
    lat = sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2))
    a = ours(**{k: v.numpy() for k, v in embeds.items()}, latents=lat, num_inference_steps=STEPS, output_type="latent")
    b = ref(**embeds, latents=torch.from_numpy(lat), num_inference_steps=STEPS, output_type="latent")
    np.testing.assert_allclose(a.images.numpy(), b.images.numpy(), atol=1e-4, rtol=0)
    text = ours(prompt=sd_tiny.PROMPT, negative_prompt=sd_tiny.NEGATIVE, latents=lat, num_inference_steps=STEPS,
                output_type="latent")  # fmt: skip
    np.testing.assert_allclose(text.images.numpy(), a.images.numpy(), atol=1e-5, rtol=0)


def test_refiner_img2img_matches_diffusers(refiner):
    image = sd_tiny.sample_image(SIZE, SIZE)
    kwargs = dict(prompt=sd_tiny.PROMPT, image=image, strength=0.7, aesthetic_score=7.0, negative_aesthetic_score=2.0)
    a = _run(refiner[0], None, True, generator=torch.Generator().manual_seed(0), **kwargs)
    b = _run(refiner[1], None, False, generator=torch.Generator().manual_seed(0), **kwargs)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    c = _run(refiner[1], None, False, generator=torch.Generator().manual_seed(0), **{**kwargs, "aesthetic_score": 2.0})
    assert np.abs(c - b).max() > 20 * ATOL


def test_img2img_latents_are_the_start_as_given(refiner):
    """``latents=`` is used as it is (no noise added), as diffusers' SDXL img2img."""
    lat = sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2), seed=3)
    kwargs = dict(prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(SIZE, SIZE), strength=0.6)
    a = _run(refiner[0], lat, True, **kwargs)
    b = _run(refiner[1], lat, False, **kwargs)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_base_to_refiner_ensemble_matches_diffusers(base, refiner):
    lat = sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2))
    steps = dict(num_inference_steps=5, prompt=sd_tiny.PROMPT)
    first = [p(latents=x, height=SIZE, width=SIZE, denoising_end=0.8, output_type="latent", **steps).images
             for p, x in ((base[0], lat), (base[1], torch.from_numpy(lat)))]  # fmt: skip
    np.testing.assert_allclose(first[0].numpy(), first[1].numpy(), atol=1e-4, rtol=0)
    a = refiner[0](image=first[0], denoising_start=0.8, output_type="np", **steps).images
    b = refiner[1](image=first[1], denoising_start=0.8, output_type="np", **steps).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (dict(prompt_2=3), "prompt_2"),
        (dict(denoising_end=1.5), "denoising_end"),
        (dict(original_size=(32,)), "original_size"),
        (dict(crops_coords_top_left=(-1, 0)), "crops_coords_top_left"),
        (dict(prompt=None, prompt_embeds=np.zeros((1, 77, 64), np.float32)), "pooled_prompt_embeds"),
    ],
)
def test_bad_arguments_raise(base, options, named):
    with pytest.raises(ValueError, match=named):
        base[0](**{"prompt": sd_tiny.PROMPT, **options}, num_inference_steps=2, output_type="latent")


def test_refiner_bad_arguments_raise(refiner):
    image = sd_tiny.sample_image(SIZE, SIZE)
    with pytest.raises(ValueError, match="denoising_start"):
        refiner[0](prompt="x", image=image, denoising_start=0.9, denoising_end=0.5)
    with pytest.raises(ValueError, match="image"):
        refiner[0](prompt="x")
    refiner[0].settings["requires_aesthetics_score"] = False
    try:
        with pytest.raises(ValueError, match="requires_aesthetics_score"):
            refiner[0](prompt="x", image=image, num_inference_steps=10)
    finally:
        refiner[0].settings["requires_aesthetics_score"] = True


def test_float16_vae_decodes_in_float32_when_force_upcast(base, monkeypatch):
    """SDXL's VAE overflows in float16: with ``force_upcast`` (the default) it runs in float32, then is cast back."""
    ours = base[0]
    assert ours.vae.config["force_upcast"] is True
    seen = []
    decode = ours.vae.decode
    monkeypatch.setattr(ours.vae, "decode", lambda z: seen.append((ours.vae.dtype, z.dtype)) or decode(z))
    lat = sd_tiny.start_latents((1, *LATENT_SHAPE))
    ours.vae.to(torch.float16)
    try:
        half = ours(prompt=sd_tiny.PROMPT, latents=lat, num_inference_steps=2, output_type="np").images
        assert ours.vae.dtype == torch.float16
    finally:
        ours.vae.to(torch.float32)
    full = ours(prompt=sd_tiny.PROMPT, latents=lat, num_inference_steps=2, output_type="np").images
    assert seen == [(torch.float32, torch.float32)] * 2
    np.testing.assert_allclose(half, full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", [4, 9])
def test_inpaint_matches_diffusers(tmp_path, channels):
    folder = sdxl_tiny.save_sdxl_inpaint_pipeline(tmp_path / "inpaint", channels)
    ours = DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    assert type(ours) is StableDiffusionXLInpaintPipeline
    ref = sd_tiny.load_diffusers(folder)
    image, mask = sd_tiny.sample_image(SIZE, SIZE), sd_tiny.sample_mask(SIZE, SIZE)
    kwargs = dict(prompt=sd_tiny.PROMPT, image=image, mask_image=mask, height=SIZE, width=SIZE, denoising_end=0.9)
    for strength in (0.9999, 1.0):
        a = _run(ours, None, True, generator=torch.Generator().manual_seed(0), strength=strength, **kwargs)
        b = _run(ref, None, False, generator=torch.Generator().manual_seed(0), strength=strength, **kwargs)
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    assert np.abs(b[0] - image[0]).max() > 20 * ATOL


@pytest.mark.parametrize(
    "options",
    [dict(), dict(guess_mode=True, controlnet_conditioning_scale=0.7), dict(control_guidance_end=0.5)],
    ids=["default", "guess-mode", "guidance-window"],
)
def test_controlnet_matches_diffusers(controlnet, options):
    control = sd_tiny.sample_image(SIZE, SIZE, seed=4)
    a, b = _both(controlnet, prompt=sd_tiny.PROMPT, image=control, **options)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    other = _both(controlnet, prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(SIZE, SIZE, seed=5), **options)[1]
    assert np.abs(other - b).max() > 5 * ATOL  # the control image matters


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory):
    folder = sdxl_tiny.save_sdxl_controlnet_pipeline(tmp_path_factory.mktemp("sdxl") / "controlnet")
    ours = DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    assert type(ours) is StableDiffusionXLControlNetPipeline
    return ours, sd_tiny.load_diffusers(folder)


def test_multi_controlnet_matches_diffusers(tmp_path):
    """Two ControlNets (``MultiControlNetModel``), each given the SDXL added conditioning, per-net images, scales
    and guidance windows."""
    folder = sdxl_tiny.save_sdxl_controlnet_pipeline(tmp_path / "multi", nets=2)
    ours = DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    assert type(ours) is StableDiffusionXLControlNetPipeline and len(ours.controlnet.nets) == 2
    pipes = ours, sd_tiny.load_diffusers(folder)
    images = [sd_tiny.sample_image(SIZE, SIZE, seed=s) for s in (4, 5)]
    options = dict(controlnet_conditioning_scale=[0.8, 1.3], control_guidance_end=[1.0, 0.5])
    a = _run(pipes[0], sd_tiny.start_latents((1, *LATENT_SHAPE)), True, prompt=sd_tiny.PROMPT, image=images, **options)
    torch_images = [torch.from_numpy(im).permute(0, 3, 1, 2) for im in images]
    lat = sd_tiny.start_latents((1, *LATENT_SHAPE))
    b = _run(pipes[1], lat, False, prompt=sd_tiny.PROMPT, image=torch_images, **options)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    swapped = _run(pipes[1], lat, False, prompt=sd_tiny.PROMPT, image=torch_images[::-1], **options)
    assert np.abs(swapped - b).max() > 5 * ATOL  # each net sees its own image
