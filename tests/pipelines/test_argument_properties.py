"""Property tests (hypothesis) over Stable Diffusion call arguments: any combination either generates
images or raises a ValueError with a message — never another exception."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusion_core.flax import DiffusionPipeline as FlaxPipeline
from diffusion_core.torch import DDPMPipeline
from diffusion_core.torch import DiffusionPipeline as TorchPipeline
from tests.pipelines import sd_tiny

SIZE = 32
NUMBERS = st.one_of(st.floats(-5, 20), st.integers(-3, 20), st.just(float("nan")), st.just(float("inf")))
GARBAGE = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.lists(st.integers(), max_size=2))
PROMPTS = st.one_of(
    st.text(max_size=20), st.lists(st.text(max_size=10), min_size=0, max_size=3), st.integers(), st.none()
)
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return sd_tiny.save_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd")


def _call_or_value_error(pipe, prompt, **kwargs) -> None:
    try:
        out = pipe(prompt, output_type="np", **kwargs)
    except ValueError as e:
        assert str(e)
        return
    images = np.asarray(out.images)
    assert images.ndim == 4 and images.shape[-1] == 3 and np.isfinite(images).all()


def test_torch_call_arguments_give_images_or_value_errors(sd_folder):
    pipe = TorchPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)

    @SETTINGS
    @given(
        prompt=PROMPTS,
        negative_prompt=st.one_of(st.none(), PROMPTS),
        guidance_scale=st.one_of(NUMBERS, GARBAGE),
        steps=st.one_of(st.integers(-1, 2), GARBAGE, st.floats(0, 3)),
        per_prompt=st.one_of(st.integers(-1, 2), GARBAGE),
        size=st.one_of(st.sampled_from([SIZE, 16, 12, 0, -8]), GARBAGE),
        eta=st.one_of(NUMBERS, GARBAGE),
        output_type=st.sampled_from(["np", "pil", "latent", "jpeg"]),
        clip_skip=st.one_of(st.none(), st.integers(-1, 3), GARBAGE),
        latents=st.sampled_from([None, "right", "wrong-shape", "int"]),
        generator=st.sampled_from([None, "one", "list-3"]),
    )
    def check(prompt, negative_prompt, guidance_scale, steps, per_prompt, size, eta, output_type, clip_skip,
              latents, generator):  # fmt: skip
        starts = {
            None: None,
            "right": sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2)),
            "wrong-shape": sd_tiny.start_latents((1, 4, 3, 3)),
            "int": np.zeros((1, 4, SIZE // 2, SIZE // 2), np.int64),
        }
        gens = {
            None: None,
            "one": torch.Generator().manual_seed(0),
            "list-3": [torch.Generator().manual_seed(i) for i in range(3)],
        }
        kwargs = dict(
            negative_prompt=negative_prompt, guidance_scale=guidance_scale, num_inference_steps=steps,
            num_images_per_prompt=per_prompt, height=size, width=size, eta=eta, clip_skip=clip_skip,
            latents=starts[latents], generator=gens[generator],
        )  # fmt: skip
        try:
            out = pipe(prompt, output_type=output_type, **kwargs)
        except ValueError as e:
            assert str(e)
            return
        assert len(out.images) >= 1

    check()


def test_flax_call_arguments_give_images_or_value_errors(sd_folder):
    """Shapes stay fixed (one compiled program); the arguments checked before compiling vary freely."""
    pipe = FlaxPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)

    @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(
        prompt=st.one_of(st.just("a cat"), st.text(max_size=20), st.integers(), st.none(), st.just([])),
        guidance_scale=st.one_of(NUMBERS, GARBAGE),
        steps=st.one_of(st.just(2), st.integers(-1, 1), GARBAGE),
        eta=st.one_of(st.just(0.0), NUMBERS, GARBAGE),
        key=st.sampled_from(["typed", "none", "bad"]),
    )
    def check(prompt, guidance_scale, steps, eta, key):
        keys = {"typed": jax.random.key(0), "none": None, "bad": "seed"}
        _call_or_value_error(
            pipe, prompt, guidance_scale=guidance_scale, num_inference_steps=steps, eta=eta, key=keys[key],
            height=SIZE, width=SIZE,
        )  # fmt: skip

    check()


def test_negative_guidance_is_refused_on_both_backends(sd_folder):
    for cls in (TorchPipeline, FlaxPipeline):
        pipe = cls.from_pretrained(sd_folder)
        for value in (-1, -0.5, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
                pipe("a cat", guidance_scale=value, num_inference_steps=1, height=SIZE, width=SIZE)


def test_unconditional_pipelines_say_they_take_no_prompt(tmp_path):
    from diffusion_core.flax import DDPMPipeline as FlaxDDPMPipeline
    from tests.pipelines import tiny

    folder = tiny.save_diffusers_pipeline(tmp_path / "ddpm")
    for cls in (DDPMPipeline, FlaxDDPMPipeline):
        with pytest.raises(ValueError, match="an unconditional pipeline takes no prompt"):
            cls.from_pretrained(folder)("a cat")
