"""LCM parity against diffusers 0.42 over its option matrix and set_timesteps arguments."""

import sys

import numpy as np
import pytest

from diffusion_core import schedulers
from tests.schedulers import parity

NAME = "LCMScheduler"

CASES = parity.grid(
    {
        "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"],
        "prediction_type": ["epsilon", "v_prediction", "sample"],
    },
    extras=[
        # LCM keeps timestep_spacing / steps_offset in its config but its schedule ignores them
        {"timestep_spacing": "trailing", "steps_offset": 1},
        {"timestep_spacing": "linspace"},
        {"clip_sample": True},
        {"clip_sample": True, "clip_sample_range": 0.5},
        {"set_alpha_to_one": False},
        {"thresholding": True},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.8, "sample_max_value": 2.0},
        {"timestep_scaling": 1.0},
        {"timestep_scaling": 100.0, "prediction_type": "v_prediction"},
        {"original_inference_steps": 100},
        # zero terminal SNR with epsilon divides by sqrt(alpha_bar) = 0 at t = 999 in diffusers (inf): v only
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
        {"trained_betas": [0.001 * (i + 1) for i in range(100)], "num_train_timesteps": 100},
    ],
)
# num_inference_steps > original_inference_steps is rejected by diffusers: n = 50 is left out here
FEW_ORIGINAL_STEPS = [{"original_inference_steps": 20}, {"original_inference_steps": 10, "beta_schedule": "linear"}]


@parity.parametrize_cases(CASES)
def test_lcm_parity(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


@parity.parametrize_cases(FEW_ORIGINAL_STEPS, steps=(1, 2, 10))
def test_lcm_few_original_steps_parity(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


CUSTOM = [
    ({}, [999, 759, 499, 259]),
    ({"prediction_type": "v_prediction"}, [800, 500, 20]),  # off the distillation schedule: warns, runs
    ({}, [399]),
]


@pytest.mark.parametrize("backend", parity.BACKENDS)
@pytest.mark.parametrize("config,timesteps", CUSTOM, ids=[str(t) for _, t in CUSTOM])
def test_lcm_custom_timesteps_parity(config, timesteps, backend):
    parity.check_parity(NAME, config, None, backend, custom={"timesteps": timesteps})


# ----- set_timesteps(original_inference_steps=..., strength=...) -------------------------------
def run_ours(set_kwargs, backend):
    from diffusion_core.arrays import namespace

    sched = schedulers.LCMScheduler()
    x = parity.to_backend(backend, parity.make_sample())
    xp = namespace(x)
    state = sched.set_timesteps(like=x, **set_kwargs)
    for i in range(state.timesteps.shape[0]):
        out = parity.dummy_model(xp, x, sched.current_timestep(state))
        x, state = sched.step(state, out, x, noise=parity.to_backend(backend, parity.make_noise(i)))
    return parity.to_numpy(x), parity.to_numpy(state.timesteps)


def run_reference(set_kwargs):
    import diffusers
    import torch

    ref = diffusers.LCMScheduler()
    ref.set_timesteps(**set_kwargs)
    module = sys.modules[type(ref).__module__]
    current = []
    original = parity._patch_randn(module, lambda: current[0].clone())
    try:
        x = torch.from_numpy(parity.make_sample())
        for i, t in enumerate(ref.timesteps):
            current[:] = [torch.from_numpy(parity.make_noise(i))]
            x = ref.step(parity.dummy_model(parity._torch_xp(), x, t), t, x).prev_sample
    finally:
        module.randn_tensor = original
    return x.numpy(), ref.timesteps.numpy()


SET_KWARGS = [
    {"num_inference_steps": 4, "original_inference_steps": 100},
    {"num_inference_steps": 4, "strength": 0.5},
    {"num_inference_steps": 8, "strength": 0.3, "original_inference_steps": 30},
    {"timesteps": [999, 759, 499, 259], "strength": 1.0},
    # strength cuts custom timesteps but diffusers keeps the uncut count: it noises every step
    {"timesteps": [999, 759, 499, 259], "strength": 0.5},
]


@pytest.mark.parametrize("backend", parity.BACKENDS)
@pytest.mark.parametrize("set_kwargs", SET_KWARGS, ids=parity.case_id)
def test_lcm_set_timesteps_options_parity(set_kwargs, backend):
    ref_x, ref_t = run_reference(set_kwargs)
    ours_x, ours_t = run_ours(set_kwargs, backend)
    np.testing.assert_array_equal(ours_t, ref_t)
    err = parity.rel_l2(ours_x, ref_x)
    assert err <= parity.REL_TOL, f"relative L2 {err:.3g} ({set_kwargs}, {backend})"


# ----- invalid input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        {"beta_schedule": "sigmoid"},  # DDPM-only schedule: diffusers' LCM raises too
        {"prediction_type": "flow"},
        {"original_inference_steps": 0},
        {"original_inference_steps": 12.5},
    ],
)
def test_lcm_rejects_bad_config(config):
    with pytest.raises(ValueError):
        schedulers.LCMScheduler(**config)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_inference_steps": 51},  # > original_inference_steps
        {"num_inference_steps": 4, "original_inference_steps": 1001},
        {"num_inference_steps": 4, "original_inference_steps": 0},
        {"num_inference_steps": 30, "strength": 0.5},  # int(50 * 0.5) < 30
        {"num_inference_steps": 4, "strength": 0.0},
        {"num_inference_steps": 4, "strength": 1.5},
        {"timesteps": [1000, 500]},
        {"timesteps": [999, 500], "strength": 0.1},  # cuts every custom timestep
        {"timesteps": [700, 800]},
    ],
)
def test_lcm_rejects_bad_set_timesteps(kwargs):
    with pytest.raises(ValueError):
        schedulers.LCMScheduler().set_timesteps(**kwargs)


def test_lcm_step_requires_noise():
    sched = schedulers.LCMScheduler()
    x = parity.make_sample()
    state = sched.set_timesteps(4, like=x)
    with pytest.raises(ValueError, match="noise"):
        sched.step(state, x, x)
