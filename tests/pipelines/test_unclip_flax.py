"""UnCLIPPipeline (flax) vs our torch one on a tiny random-weight Karlo.

unCLIP samples with noise at every step, and jax keys cannot reproduce torch generators: the flax
pipeline is compared with our torch pipeline (itself matched to diffusers with the same generator in
test_unclip_torch.py) on the same explicit start latents and the same per-step noise for all three stages.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from diffusion_core.flax import DiffusionPipeline as FlaxPipeline
from diffusion_core.flax.pipelines import UnCLIPPipeline
from diffusion_core.pipelines import unclip as uc
from diffusion_core.torch import DiffusionPipeline as TorchPipeline
from tests.pipelines import unclip_tiny

ATOL = 5e-3
STEPS = dict(prior_num_inference_steps=5, decoder_num_inference_steps=4, super_res_num_inference_steps=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return unclip_tiny.save_unclip_pipeline(tmp_path_factory.mktemp("unclip") / "karlo")


@pytest.fixture(scope="module")
def ours(folder):
    pipe = FlaxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def explicit_inputs(configs, prompt, **kwargs):
    """A request with every stage's start latents fixed, and per-stage, per-call step noise."""
    rng = np.random.default_rng(0)
    shapes = uc.stage_shapes(configs, len(uc.sd.prompt_texts(prompt)) * kwargs.get("num_images_per_prompt", 1))
    latents = {f"{s}_latents": rng.standard_normal(shapes[s]).astype(np.float32) for s in uc.STAGES}
    request = uc.unclip_request(configs, prompt, **STEPS, **latents, **kwargs)

    def noise(stage):
        return lambda i: (
            np.random.default_rng(100 + 10 * uc.STAGES.index(stage) + i)
            .standard_normal(shapes[stage])
            .astype(np.float32)
        )

    return request, {s: noise(s) for s in uc.STAGES}


# the guided default runs by default (it compiles the three stage loops: ~40 s on CPU); the rest is slow
@pytest.mark.parametrize(
    "kwargs",
    [{}, pytest.param({"prior_guidance_scale": 1.0, "decoder_guidance_scale": 1.0}, marks=pytest.mark.slow)],
    ids=["guided", "unguided"],
)
def test_flax_matches_our_torch_on_explicit_latents_and_noise(folder, ours, kwargs):
    torch_pipe = TorchPipeline.from_pretrained(folder)
    request, noise = explicit_inputs(torch_pipe._configs(), unclip_tiny.PROMPT, **kwargs)
    expected = torch_pipe._generate(request, None, noise)
    got = ours._generate(request, None, noise)
    assert expected.std() > 0.05
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_key_call_is_deterministic_and_per_image(ours):
    call = dict(output_type="np", **STEPS)
    a = ours(unclip_tiny.PROMPT, key=jax.random.key(0), **call).images
    b = ours(unclip_tiny.PROMPT, key=jax.random.key(0), **call).images
    c = ours(unclip_tiny.PROMPT, key=jax.random.key(1), **call).images
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, 64, 64, 3) and np.abs(a - c).max() > 1e-2


def test_loads_every_component_from_model_index(ours):
    assert type(ours) is UnCLIPPipeline
    names = {n: type(c).__name__ for n, c in ours.components.items()}
    assert names["text_proj"] == "UnCLIPTextProjModel" and names["prior"] == "PriorTransformer"
    assert names["super_res_first"] == "UNet2DModel" and names["decoder_scheduler"] == "UnCLIPScheduler"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt="a"), "key"),
        (dict(prompt="a", key=jax.random.key(0), prior_num_inference_steps=1), "prior_num_inference_steps"),
        (
            dict(prompt="a", key=jax.random.key(0), decoder_latents=np.zeros((2, 3, 32, 32), np.float32)),
            "decoder_latents",
        ),
    ],
)
def test_bad_arguments_raise(ours, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ours(**kwargs)
