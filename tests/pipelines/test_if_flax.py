"""Flax DeepFloyd IF pipelines: the same recipe as torch, loaded from diffusers-saved tiny folders.

DDPM draws fresh noise at every step, so a pixel comparison with diffusers (torch generator) is impossible
here: our flax run is compared with our torch run (itself equal to diffusers, tests/pipelines/test_if_torch.py)
on the same explicit start latents, per-step noise and stage II augmentation noise. Key-driven calls are checked
for reproducibility and per-image independence.
"""

from __future__ import annotations

import inspect

import jax
import numpy as np
import pytest

from diffusion_core.flax.pipelines.deepfloyd_if import (
    IFImg2ImgPipeline,
    IFInpaintingPipeline,
    IFPipeline,
    IFSuperResolutionPipeline,
)
from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline as FlaxPipeline
from diffusion_core.pipelines import deepfloyd_if as dif
from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline as TorchPipeline
from tests.pipelines import if_tiny

ATOL = 5e-3
STEPS = 3


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("if_flax")
    out = {}
    for kind in (if_tiny.STAGE_I, if_tiny.STAGE_II, if_tiny.IMG2IMG, if_tiny.INPAINT, if_tiny.INPAINT_SR):
        folder = if_tiny.save_if_pipeline(root / kind, kind)
        flax_pipe, torch_pipe = FlaxPipeline.from_pretrained(folder), TorchPipeline.from_pretrained(folder)
        torch_pipe.set_progress_bar_config(disable=True)
        out[kind] = (flax_pipe, torch_pipe)
    return out


def _request(pipe, batch: int, **kwargs) -> dif.IFRequest:
    pos, neg = if_tiny.text_embeds(batch)
    n = batch * kwargs.get("num_images_per_prompt", 1)
    shape = (n, 3, kwargs.get("height", 16), kwargs.get("width", 16))
    latents = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    return dif.if_request(
        pipe.unet.config, prompt=None, prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=STEPS,
        output_type="np", guidance_scale=kwargs.pop("guidance_scale", 7.0), latents=latents, **kwargs,
    )  # fmt: skip


def _noise(request: dif.IFRequest) -> dif.ExplicitNoise:
    rng = np.random.default_rng(8)
    steps = rng.standard_normal((STEPS, *request.shape)).astype(np.float32)
    image = rng.standard_normal(request.shape).astype(np.float32) if request.image is not None else None
    return dif.ExplicitNoise(steps, image)


@pytest.mark.parametrize(
    "kwargs",
    [dict(height=16, width=16), dict(guidance_scale=1.0, height=16, width=24, num_images_per_prompt=2)],
    ids=["cfg", "no-cfg-wide-two-per-prompt"],
)
def test_stage_i_flax_matches_torch_on_explicit_noise(pipes, kwargs):
    flax_pipe, torch_pipe = pipes[if_tiny.STAGE_I]
    assert type(flax_pipe) is IFPipeline
    request = _request(flax_pipe, 1, **kwargs)
    noise = _noise(request)
    a = flax_pipe._run(request, None, True, True, noise).images
    b = torch_pipe._run(request, None, True, True, noise).images
    assert a.shape == b.shape and if_tiny.unsaturated(b) > 0.2
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_stage_ii_flax_matches_torch_on_explicit_noise(pipes):
    flax_pipe, torch_pipe = pipes[if_tiny.STAGE_II]
    assert type(flax_pipe) is IFSuperResolutionPipeline
    image = if_tiny.low_res_images(2).transpose(0, 2, 3, 1)  # numpy NHWC, as diffusers reads numpy
    request = _request(flax_pipe, 2, height=32, width=32, image=image, noise_level=100, stage2=True)
    noise = _noise(request)
    a = flax_pipe._run(request, None, True, True, noise).images
    b = torch_pipe._run(request, None, True, True, noise).images
    assert a.shape == (2, 32, 32, 3) and if_tiny.unsaturated(b) > 0.2
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_img2img_flax_matches_torch_on_explicit_noise(pipes):
    flax_pipe, torch_pipe = pipes[if_tiny.IMG2IMG]
    assert type(flax_pipe) is IFImg2ImgPipeline
    image = if_tiny.low_res_images(1, size=16).transpose(0, 2, 3, 1)
    request = _request(flax_pipe, 1, image=image, strength=0.7)  # enters the 3-step schedule at call 1
    noise = _noise(request)
    a = flax_pipe._run(request, None, True, True, noise).images
    b = torch_pipe._run(request, None, True, True, noise).images
    assert a.shape == (1, 16, 16, 3) and if_tiny.unsaturated(b) > 0.2
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_inpainting_flax_matches_torch_on_explicit_noise(pipes):
    """The mask blend after every step runs inside the compiled scan (image and mask are program inputs)."""
    flax_pipe, torch_pipe = pipes[if_tiny.INPAINT]
    assert type(flax_pipe) is IFInpaintingPipeline
    image = if_tiny.low_res_images(1, size=16).transpose(0, 2, 3, 1)
    request = _request(flax_pipe, 1, image=image, strength=1.0, mask_image=if_tiny.mask(16))
    noise = _noise(request)
    a = flax_pipe._run(request, None, True, True, noise).images
    b = torch_pipe._run(request, None, True, True, noise).images
    assert if_tiny.unsaturated(b) > 0.2
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_inpainting_super_resolution_flax_matches_torch_on_explicit_noise(pipes):
    """Stage II, started from ``original_image`` at ``strength`` under a mask: every hook of the recipe at once."""
    flax_pipe, torch_pipe = pipes[if_tiny.INPAINT_SR]
    assert type(flax_pipe).__name__ == if_tiny.INPAINT_SR
    low = if_tiny.low_res_images(1).transpose(0, 2, 3, 1)
    original = if_tiny.low_res_images(1, size=32, seed=6).transpose(0, 2, 3, 1)
    request = _request(
        flax_pipe, 1, image=low, original_image=original, strength=0.8, noise_level=100, stage2=True,
        mask_image=if_tiny.mask(32), height=32, width=32,  # height/width: the latents' size (the output's)
    )  # fmt: skip
    noise = _noise(request)
    a = flax_pipe._run(request, None, True, True, noise).images
    b = torch_pipe._run(request, None, True, True, noise).images
    assert a.shape == (1, 32, 32, 3) and if_tiny.unsaturated(b) > 0.2
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def text_folders(tmp_path_factory):
    return if_tiny.save_if_text_pipeline(tmp_path_factory.mktemp("if_text_flax"))[1]


@pytest.mark.parametrize("form", ["tokenizer_json", "spiece"])
def test_prompts_through_t5_flax_matches_torch_on_explicit_noise(text_folders, form):
    """``IFPipeline.from_pretrained`` of diffusers' save with a T5 encoder and tokenizer (both tokenizer forms):
    ``prompt=`` / ``negative_prompt=`` through our flax T5 give our torch images (torch == diffusers in
    test_if_torch) on the same explicit noise."""
    from diffusion_core.flax.models.t5 import T5EncoderModel

    folder = text_folders[form]
    flax_pipe, torch_pipe = FlaxPipeline.from_pretrained(folder), TorchPipeline.from_pretrained(folder)
    torch_pipe.set_progress_bar_config(disable=True)
    assert type(flax_pipe) is IFPipeline and isinstance(flax_pipe.text_encoder, T5EncoderModel)
    shape = (2, 3, 16, 16)
    request = dif.if_request(
        flax_pipe.unet.config, prompt=["A Red Fox  ", "a photo of a cat on a red chair " * 12],
        negative_prompt="blurry", num_inference_steps=STEPS, output_type="np", guidance_scale=7.0,
        latents=np.random.default_rng(7).standard_normal(shape).astype(np.float32), clean_caption=False, height=16,
        width=16,
    )  # fmt: skip
    noise = _noise(request)
    a = flax_pipe._run(request, None, False, True, noise).images
    b = torch_pipe._run(request, None, False, True, noise).images
    assert a.shape == (2, 16, 16, 3) and if_tiny.unsaturated(b) > 0.2
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_keys_reproduce_and_images_are_independent(pipes):
    """Image b draws from fold_in(key, b): the same key repeats, the first image does not depend on the batch."""
    flax_pipe, _ = pipes[if_tiny.STAGE_I]
    pos, neg = if_tiny.text_embeds(2)
    common = dict(num_inference_steps=2, output_type="np", height=16, width=16)
    two = flax_pipe(prompt_embeds=pos, negative_prompt_embeds=neg, key=jax.random.key(0), **common).images
    again = flax_pipe(prompt_embeds=pos, negative_prompt_embeds=neg, key=jax.random.key(0), **common).images
    one = flax_pipe(prompt_embeds=pos[:1], negative_prompt_embeds=neg[:1], key=jax.random.key(0), **common).images
    other = flax_pipe(prompt_embeds=pos, negative_prompt_embeds=neg, key=jax.random.key(1), **common).images
    np.testing.assert_array_equal(two, again)
    np.testing.assert_allclose(one[0], two[0], atol=1e-5)
    assert np.abs(two - other).max() > 1e-2


def test_missing_key_raises(pipes):
    flax_pipe, _ = pipes[if_tiny.STAGE_I]
    pos, neg = if_tiny.text_embeds(1)
    with pytest.raises(ValueError, match="key"):
        flax_pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=1, height=16, width=16)


@pytest.mark.parametrize("kind", [if_tiny.INPAINT, if_tiny.INPAINT_SR])
def test_inpainting_pipelines_name_the_missing_mask(pipes, kind):
    flax_pipe, _ = pipes[kind]
    pos, neg = if_tiny.text_embeds(1)
    with pytest.raises(ValueError, match=rf"mask_image: {kind} needs a mask \(1 where the image is redrawn\)"):
        flax_pipe(image=np.zeros((1, 16, 16, 3), np.float32), prompt_embeds=pos, negative_prompt_embeds=neg)


IF_RECIPE_PARTS = (
    "_schedule",
    "_start",
    "_model_fn",
    "_augment",
    "_blend",
    "_blend_inputs",
    "encode_prompt",
    "_finish",
)


@pytest.mark.parametrize("kind", if_tiny.ALL)
def test_both_backends_bind_the_same_core_recipe(kind):
    """Each IF pipeline is defined once: both backend classes subclass the core recipe and redefine none of it."""
    from diffusion_core import flax as dc_flax
    from diffusion_core import torch as dc_torch

    classes = [getattr(dc_torch, kind), getattr(dc_flax, kind)]
    for cls in classes:
        assert issubclass(cls, dif.IFRecipe)
        backend = [k for k in cls.__mro__ if k.__module__.startswith(("diffusion_core.torch", "diffusion_core.flax"))]
        for part in IF_RECIPE_PARTS:
            assert not any(part in vars(k) for k in backend), f"{cls.__module__}.{kind} redefines {part}"
    assert classes[0]._components == classes[1]._components and classes[0]._stage2 == classes[1]._stage2
    torch_args = [p for p in inspect.signature(classes[0].__call__).parameters if p != "generator"]
    flax_args = [p for p in inspect.signature(classes[1].__call__).parameters if p not in ("key", "parallel", "mesh")]
    assert torch_args == flax_args
