"""Scheduler parity inside the SD pipeline at 5 steps, on both backends, with a guard against vacuous passes.

At 2 steps DPM-Solver++ and UniPC give the same image, order 1 equals order 2, and DDIM vs Euler differ by
less than the old Flax tolerance, so a pipeline running the wrong scheduler could pass. Here each case
swaps the scheduler with the public idiom (``pipe.scheduler = schedulers.from_config({...})``), runs 5
steps from the same numpy start latents and compares pixels with diffusers 0.42.1. The guard: diffusers'
own image for the case must differ from its image for a neighbouring alternative (DPM order 2 vs 1, UniPC
vs DPM-Solver++, DDIM vs Euler, ...) by more than 5x the tolerance, or the test fails as vacuous.

Measured on the tiny pipeline (CPU, float32, 5 steps): parity <= 1.1e-6 (torch) and <= 7.2e-7 (flax);
smallest guard gap DDIM vs Euler 1.4e-3, then UniPC vs DPM++ 7.1e-3, LMS vs Euler 8.7e-3. ATOL = 2e-5
leaves ~20x headroom on parity and puts the guard threshold (1e-4) 14x below the smallest gap.
"""

import diffusers
import numpy as np
import pytest
import torch

from diffusion_core import schedulers
from tests.pipelines import sd_tiny

ATOL = 2e-5
GUARD = 5  # the alternative must differ by more than GUARD * ATOL
STEPS = 5
SIZE = 32  # pixels; latents (1, 4, 16, 16) with the tiny VAE
GUIDANCE = 6.0
# id: (class, options, alternative case for the guard)
CASES = {
    "ddim": ("DDIMScheduler", {}, "euler"),
    "euler": ("EulerDiscreteScheduler", {}, "ddim"),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}, "euler"),
    "dpm_order1": ("DPMSolverMultistepScheduler", {"solver_order": 1}, "dpm_order2"),
    "dpm_order2": ("DPMSolverMultistepScheduler", {"solver_order": 2}, "dpm_order1"),
    "unipc": ("UniPCMultistepScheduler", {}, "dpm_order2"),
    "heun": ("HeunDiscreteScheduler", {}, "euler"),
    "lms": ("LMSDiscreteScheduler", {}, "euler"),
    "pndm": ("PNDMScheduler", {}, "ddim"),
}
# Flax compiles one program per scheduler (~12 s on a shared CPU): two cases run by default, the rest are slow.
FLAX_FAST = ("ddim", "dpm_order2")


def _flax_params():
    return [c if c in FLAX_FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return sd_tiny.save_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd")


@pytest.fixture(scope="module")
def reference(sd_folder):
    """diffusers' image per case, computed once (a torch generator seeded 0 draws any step noise)."""
    pipe = sd_tiny.load_diffusers(sd_folder)
    base = dict(pipe.scheduler.config)
    images = {}

    def image(case):
        if case not in images:
            name, options, _ = CASES[case]
            pipe.scheduler = getattr(diffusers, name).from_config({**base, **options})
            images[case] = pipe(
                sd_tiny.PROMPT,
                latents=torch.from_numpy(_latents()),
                generator=torch.Generator().manual_seed(0),
                **_call_options(),
            ).images
        return images[case]

    return image


def _latents():
    return sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2))


def _call_options():
    return dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np")


def _swap(pipe, base, case):
    name, options, _ = CASES[case]
    pipe.scheduler = schedulers.from_config({**base, "_class_name": name, **options})
    assert type(pipe.scheduler).__name__ == name


def _assert_not_vacuous(reference, case):
    alternative = CASES[case][2]
    gap = float(np.abs(reference(case) - reference(alternative)).max())
    assert gap > GUARD * ATOL, f"vacuous: {case} and {alternative} differ by {gap:.2e} <= {GUARD} x {ATOL}"


@pytest.fixture(scope="module")
def torch_pipe(sd_folder):
    from diffusion_core.torch import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)


@pytest.fixture(scope="module")
def flax_pipe(sd_folder):
    pytest.importorskip("jax")
    from diffusion_core.flax import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)


@pytest.mark.parametrize("case", CASES)
def test_torch_scheduler_matches_diffusers_at_5_steps(torch_pipe, reference, case):
    """Stochastic EulerAncestral draws its step noise from the same torch generator as diffusers: exact parity."""
    pipe, base = torch_pipe
    _swap(pipe, base, case)
    ours = pipe(sd_tiny.PROMPT, latents=_latents(), generator=torch.Generator().manual_seed(0), **_call_options())
    np.testing.assert_allclose(ours.images, reference(case), atol=ATOL, rtol=0)
    _assert_not_vacuous(reference, case)


@pytest.mark.parametrize("case", _flax_params())
def test_flax_scheduler_matches_diffusers_at_5_steps(flax_pipe, reference, case):
    import jax

    pipe, base = flax_pipe
    _swap(pipe, base, case)
    images = pipe(sd_tiny.PROMPT, latents=_latents(), key=jax.random.key(0), **_call_options()).images
    assert np.isfinite(images).all() and images.shape == (1, SIZE, SIZE, 3)
    if pipe.scheduler.needs_noise:
        # flax draws step noise from jax keys, diffusers from a torch generator: no shared noise, so no
        # pixel parity; instead the same key repeats the image and another key changes it
        again = pipe(sd_tiny.PROMPT, latents=_latents(), key=jax.random.key(0), **_call_options()).images
        other = pipe(sd_tiny.PROMPT, latents=_latents(), key=jax.random.key(1), **_call_options()).images
        np.testing.assert_array_equal(again, images)
        assert np.abs(other - images).max() > GUARD * ATOL
        gap = float(np.abs(images - reference(CASES[case][2])).max())
        assert gap > GUARD * ATOL, f"vacuous: {case} is within {gap:.2e} of {CASES[case][2]}"
        return
    np.testing.assert_allclose(images, reference(case), atol=ATOL, rtol=0)
    _assert_not_vacuous(reference, case)
