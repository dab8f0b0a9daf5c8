"""``diffusion-core generate`` on text-to-image folders (``--prompt``, ``--guidance``, ``--size``) and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_core import cli
from tests.pipelines import sd_tiny, tiny


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return sd_tiny.save_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    return tiny.save_diffusers_pipeline(tmp_path_factory.mktemp("ddpm") / "pipe", unet=tiny.MINI_UNET)


def _generate(folder, out, *extra):
    args = ["generate", "--model", str(folder), "--steps", "2", "--output-dir", str(out), *extra]
    assert cli.main(args) == 0
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.iterdir())])


def test_prompt_guidance_and_size_reach_the_pipeline(sd_folder, tmp_path):
    from diffusion_core.torch import StableDiffusionPipeline

    flags = ["--prompt", sd_tiny.PROMPT, "--negative-prompt", "blurry", "--guidance", "3", "--size", "32x48"]
    ours = _generate(sd_folder, tmp_path / "a", *flags, "--num-images", "2", "--seed", "4")
    assert ours.shape == (2, 32, 48, 3)
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    direct = pipe(
        sd_tiny.PROMPT,
        negative_prompt="blurry",
        guidance_scale=3.0,
        height=32,
        width=48,
        num_inference_steps=2,
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(4 + i) for i in range(2)],
        output_type="np",
    ).images
    np.testing.assert_array_equal(ours, (np.clip(direct, 0, 1) * 255).round().astype(np.uint8))
    other = _generate(sd_folder, tmp_path / "b", *flags[:4], "--guidance", "1", "--size", "32x48", "--seed", "4")
    assert np.abs(other[0].astype(int) - ours[0]).max() > 0  # guidance changes the image


@pytest.mark.slow  # the flax SD program compiles for tens of seconds on a shared CPU
def test_flax_text_to_image(sd_folder, tmp_path):
    images = _generate(sd_folder, tmp_path / "f", "--prompt", "a cat", "--backend", "flax", "--size", "32")
    assert images.shape == (16, 32, 32, 3)


def _error(args, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--prompt", "a cat"], "--prompt: the model"),
        (["--guidance", "2"], "--guidance: the model"),
        (["--size", "16x16"], "--size: the model"),
        (["--negative-prompt", "x"], "--negative-prompt: the model"),
    ],
)
def test_text_flags_on_a_pixel_model(ddpm_folder, capsys, extra, needle):
    assert needle in _error(["generate", "--model", str(ddpm_folder), "--grid", "g.png", *extra], capsys)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ([], "--prompt: the model"),
        (["--prompt", "a", "--class", "1"], "--class: the model"),
        (["--prompt", "a", "--size", "30x30", "--steps", "1"], "--size: height must be divisible by 8"),
        (["--prompt", "a", "--size", "big"], "--size"),
    ],
)
def test_text_model_refusals(sd_folder, capsys, extra, needle):
    assert needle in _error(["generate", "--model", str(sd_folder), "--grid", "g.png", *extra], capsys)


def test_a_pipeline_that_needs_an_input_image_is_refused(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionImg2ImgPipeline"}))
    err = _error(["generate", "--model", str(tmp_path), "--grid", "g.png", "--prompt", "a"], capsys)
    assert "--model: generate runs" in err and "StableDiffusionImg2ImgPipeline" in err
