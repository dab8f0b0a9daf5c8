"""PNDM parity against diffusers 0.42 over its option matrix, plus diffusers' own full-loop expectation."""

import pytest

from diffusion_core import schedulers
from tests.schedulers import parity

NAME = "PNDMScheduler"

AXES = {
    "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"],
    "prediction_type": ["epsilon", "v_prediction"],  # diffusers' PNDM raises on "sample" at step time
    "timestep_spacing": ["leading", "linspace", "trailing"],
}
EXTRAS = [
    {"set_alpha_to_one": True},
    {"steps_offset": 1},
    {"set_alpha_to_one": True, "beta_start": 0.01, "timestep_spacing": "trailing"},
    {"trained_betas": [0.001 * (i + 1) for i in range(100)], "num_train_timesteps": 100},
    {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "set_alpha_to_one": False,
        "steps_offset": 1,
    },  # Stable Diffusion 1.x
]


def _float32_fragile(config) -> bool:
    """squaredcos_cap_v2 + v_prediction starting at t=999 (alpha_bar = 2.4e-9): diffusers' float32
    eps = sqrt(a) v + sqrt(1 - a) x then x * sqrt(a_prev / a) cancels catastrophically (3e-4 relative
    error against diffusers run in float64, which we match to 1e-7); see test_pndm_fragile_vs_float64."""
    return (
        config.get("beta_schedule") == "squaredcos_cap_v2"
        and config.get("prediction_type") == "v_prediction"
        and config.get("timestep_spacing") in ("linspace", "trailing")
    )


def _params(cases, steps, jax_steps):
    """numpy and torch on every step count; jax eager is slow, so only on ``jax_steps``."""
    out = []
    for c in cases:
        for n in steps:
            for b in parity.BACKENDS:
                if b != "jax" or n in jax_steps:
                    out.append(pytest.param(c, n, b, id=f"{parity.case_id(c)}-n{n}-{b}"))
    return out


SKIP_CASES = [{**c, "skip_prk_steps": True} for c in parity.grid(AXES, EXTRAS)]
PRK_CASES = parity.grid(AXES, EXTRAS)
FRAGILE = [c for c in SKIP_CASES + PRK_CASES if _float32_fragile(c)]


@pytest.mark.parametrize(
    "config,num_steps,backend",
    _params([c for c in SKIP_CASES if not _float32_fragile(c)], parity.STEP_COUNTS, (1, 10)),
)
def test_pndm_plms_parity(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


# the PRK warm-up needs 4 grid points: diffusers fails to build its timesteps for 1-3 steps
@pytest.mark.parametrize(
    "config,num_steps,backend", _params([c for c in PRK_CASES if not _float32_fragile(c)], (4, 10, 50), (4, 10))
)
def test_pndm_prk_parity(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


def _reference_float64(config, n):
    """diffusers' PNDM loop with its alphas_cumprod and the sample in float64."""
    import diffusers
    import torch

    ref = diffusers.PNDMScheduler.from_config(dict(config))
    ref.set_timesteps(n)
    ref.alphas_cumprod = torch.cumprod(1 - ref.betas.double(), 0)
    ref.final_alpha_cumprod = ref.alphas_cumprod[0]
    x = torch.from_numpy(parity.make_sample()).double()
    for t in ref.timesteps:
        x = ref.step(parity.dummy_model(parity._torch_xp(), x, t), t, x).prev_sample
    return x.numpy()


@pytest.mark.parametrize("config", FRAGILE, ids=parity.case_id)
@pytest.mark.parametrize("num_steps", [2, 10])
def test_pndm_fragile_vs_float64(config, num_steps):
    if num_steps < 4 and not config.get("skip_prk_steps"):
        num_steps = 4
    ours, _ = parity.run_ours(NAME, config, num_steps, "numpy")
    assert parity.rel_l2(ours, _reference_float64(config, num_steps)) <= parity.REL_TOL


@pytest.mark.parametrize("backend", parity.BACKENDS)
@pytest.mark.parametrize(
    "prediction_type,total,mean", [("epsilon", 198.1318, 0.2580), ("v_prediction", 67.3986, 0.0878)]
)
def test_pndm_diffusers_full_loop_expectation(prediction_type, total, mean, backend):
    """diffusers' test_scheduler_pndm.py full loop (T=1000, 10 steps, PRK then PLMS, model x * t / (t + 1))."""
    got_sum, got_mean = parity.run_diffusers_full_loop(NAME, {"prediction_type": prediction_type}, backend)
    assert abs(got_sum - total) < 1e-2
    assert abs(got_mean - mean) < 1e-3


def test_pndm_timesteps_repeat_in_prk_phase():
    state = schedulers.PNDMScheduler().set_timesteps(10, like=parity.make_sample())
    assert state.timesteps.tolist() == [
        900,
        850,
        850,
        800,
        800,
        750,
        750,
        700,
        700,
        650,
        650,
        600,
        600,
        500,
        400,
        300,
        200,
        100,
        0,
    ]


@pytest.mark.parametrize(
    "config,steps,match",
    [
        ({"prediction_type": "sample"}, 10, "prediction_type"),
        ({"timestep_spacing": "uniform"}, 10, "timestep_spacing"),
        ({"beta_schedule": "sigmoid"}, 10, "beta_schedule"),
        ({}, 3, "PRK warm-up"),
        ({"skip_prk_steps": True}, 0, "num_inference_steps"),
        ({"skip_prk_steps": True, "steps_offset": 200}, 10, "steps_offset"),  # past num_train_timesteps
    ],
)
def test_pndm_rejects_invalid(config, steps, match):
    with pytest.raises(ValueError, match=match):
        schedulers.PNDMScheduler(**config).set_timesteps(steps, like=parity.make_sample())


def test_pndm_rejects_custom_schedules():
    with pytest.raises(ValueError, match="timesteps"):
        schedulers.PNDMScheduler().set_timesteps(timesteps=[900, 500, 100])
