"""UnCLIPPipeline (torch) vs diffusers 0.42's on a tiny random-weight Karlo: the same generator gives the same images.

The first step of each stage (t = 999 on the cosine schedule) divides the model output by
sqrt(alpha_bar_999) ~ 3e-5, so float32 round-off of the networks (1e-6 relative) is amplified
there; the step counts below keep every stage's comparison within 2e-3 (3 decoder / 2 super-resolution
steps amplify the decoder's 1e-6 differences to ~1e-2 under guidance scale 8).
"""

from __future__ import annotations

import huggingface_hub
import numpy as np
import pytest
import torch

from diffusion_core.torch import DiffusionPipeline
from diffusion_core.torch.pipelines import UnCLIPPipeline
from tests.pipelines import tiny, unclip_tiny

ATOL = 2e-3
STEPS = dict(prior_num_inference_steps=5, decoder_num_inference_steps=4, super_res_num_inference_steps=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return unclip_tiny.save_unclip_pipeline(tmp_path_factory.mktemp("unclip") / "karlo")


@pytest.fixture(scope="module")
def ours(folder):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ref(folder):
    return unclip_tiny.load_diffusers(folder)


def _both(ours_pipe, ref_pipe, prompt=unclip_tiny.PROMPT, seed=0, **kwargs):
    call = {**STEPS, "output_type": "np", **kwargs}
    a = ours_pipe(prompt, generator=torch.Generator().manual_seed(seed), **call).images
    b = ref_pipe(prompt, generator=torch.Generator().manual_seed(seed), **call).images
    return a, b


def test_loads_every_component_from_model_index(ours):
    assert type(ours) is UnCLIPPipeline
    names = {n: type(c).__name__ for n, c in ours.components.items()}
    assert names["text_proj"] == "UnCLIPTextProjModel" and names["prior"] == "PriorTransformer"
    assert names["decoder"] == "UNet2DConditionModel" and names["super_res_last"] == "UNet2DModel"
    assert names["text_encoder"] == "CLIPTextModelWithProjection"
    assert {names[f"{s}_scheduler"] for s in ("prior", "decoder", "super_res")} == {"UnCLIPScheduler"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"prior_guidance_scale": 1.0, "decoder_guidance_scale": 1.0},  # unguided
        {"prior_guidance_scale": 4.0, "decoder_guidance_scale": 1.0},  # guided: both stages run two halves
        {"decoder_num_inference_steps": 3, "super_res_num_inference_steps": 2, "decoder_guidance_scale": 2.0},
    ],
    ids=["defaults", "unguided", "prior_only_scale", "other_steps"],
)
def test_images_match_diffusers_with_the_same_generator(ours, ref, kwargs):
    a, b = _both(ours, ref, **kwargs)
    assert a.shape == (1, 64, 64, 3) and b.std() > 0.05  # not a flat reference
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_prompt_list_and_images_per_prompt_match_diffusers(ours, ref):
    a, b = _both(ours, ref, prompt=[unclip_tiny.PROMPT, "a cat"], num_images_per_prompt=2)
    assert a.shape == (4, 64, 64, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_numpy_latents_fix_every_stage(ours, ref):
    """numpy start draws for all three stages; step noise still comes from the generator, in diffusers' order."""
    rng = np.random.default_rng(0)  # seed 5: one pixel of 12288 at 3.6e-3 (the t = 999 amplification, see top)
    latents = {
        "prior_latents": rng.standard_normal((1, 32)).astype(np.float32),
        "decoder_latents": rng.standard_normal((1, 3, 32, 32)).astype(np.float32),
        "super_res_latents": rng.standard_normal((1, 3, 64, 64)).astype(np.float32),
    }
    a = ours(unclip_tiny.PROMPT, generator=torch.Generator().manual_seed(1), output_type="np", **STEPS, **latents)
    torch_latents = {k: torch.from_numpy(v) for k, v in latents.items()}
    b = ref(unclip_tiny.PROMPT, generator=torch.Generator().manual_seed(1), output_type="np", **STEPS, **torch_latents)
    np.testing.assert_allclose(a.images, b.images, atol=ATOL, rtol=0)
    again = ours(unclip_tiny.PROMPT, generator=torch.Generator().manual_seed(1), output_type="np", **STEPS,
                 **{k: torch.from_numpy(v) for k, v in latents.items()})  # fmt: skip
    np.testing.assert_array_equal(again.images, a.images)  # torch latents are taken too


def test_pil_output_and_return_dict(ours):
    out = ours(unclip_tiny.PROMPT, generator=torch.Generator().manual_seed(0), **STEPS)
    assert out.images[0].size == (64, 64)
    (images,) = ours(
        unclip_tiny.PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", return_dict=False, **STEPS
    )
    assert images.shape == (1, 64, 64, 3)


def test_saved_pipeline_loads_in_diffusers_and_here(ours, tmp_path):
    ours.save_pretrained(tmp_path / "saved")
    again_ref = unclip_tiny.load_diffusers(tmp_path / "saved")
    again = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    again.set_progress_bar_config(disable=True)
    a, b = _both(ours, again_ref)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(a, _both(again, again_ref)[0])


def test_hub_style_offline_load(folder, ours, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    tiny.hub_cache(cache, "tiny/karlo", folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    pipe = DiffusionPipeline.from_pretrained("tiny/karlo")
    pipe.set_progress_bar_config(disable=True)
    call = dict(generator=None, output_type="np", prior_latents=np.zeros((1, 32), np.float32), **STEPS)
    a = pipe(unclip_tiny.PROMPT, **{**call, "generator": torch.Generator().manual_seed(3)}).images
    b = ours(unclip_tiny.PROMPT, **{**call, "generator": torch.Generator().manual_seed(3)}).images
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=3), "prompt"),
        (dict(prompt="a", prior_num_inference_steps=1), "prior_num_inference_steps"),
        (dict(prompt="a", decoder_num_inference_steps=2.5), "decoder_num_inference_steps"),
        (dict(prompt="a", super_res_latents=np.zeros((1, 3, 8, 8), np.float32)), "super_res_latents"),
        (dict(prompt="a", prior_latents=np.zeros((1, 32), np.int64)), "prior_latents"),
        (dict(prompt="a", decoder_guidance_scale=float("nan")), "decoder_guidance_scale"),
        (dict(prompt="a", num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(prompt="a", output_type="pt"), "output_type"),
    ],
)
def test_bad_arguments_raise(ours, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ours(**kwargs)
