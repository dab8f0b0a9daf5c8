"""Every scheduler: the whole loop as one jitted ``lax.scan`` equals the eager loop, no retrace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_core import schedulers
from diffusion_core.flax import denoise_loop
from tests.schedulers import parity

# One stochastic-free and (where it exists) one noisy configuration per scheduler.
SCAN_CONFIGS = {
    "DDIMScheduler": [({}, {}), ({"thresholding": True}, {"eta": 0.7})],
    # learned variances need a 2C-channel model: their scan test is in test_parity_ddpm.py
    "DDPMScheduler": [({}, {}), ({"variance_type": "fixed_large", "thresholding": True}, {})],
    "PNDMScheduler": [({}, {}), ({"skip_prk_steps": True, "prediction_type": "v_prediction"}, {})],
    "LMSDiscreteScheduler": [
        ({}, {}),
        ({"use_karras_sigmas": True}, {}),
        ({"prediction_type": "v_prediction"}, {"order": 2}),
    ],
    "EulerDiscreteScheduler": [
        ({}, {}),
        ({"use_karras_sigmas": True}, {"s_churn": 0.5}),
        ({"interpolation_type": "log_linear", "prediction_type": "v_prediction"}, {"s_churn": 1.0, "s_tmin": 1.0}),
    ],
    "EulerAncestralDiscreteScheduler": [
        ({}, {}),
        ({"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, {}),
    ],
    "HeunDiscreteScheduler": [
        ({}, {}),
        ({"use_karras_sigmas": True}, {}),
        ({"prediction_type": "sample", "clip_sample": True}, {}),
    ],
    "KDPM2DiscreteScheduler": [({}, {}), ({"use_karras_sigmas": True, "prediction_type": "v_prediction"}, {})],
    "KDPM2AncestralDiscreteScheduler": [
        ({}, {}),
        ({"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, {}),
    ],
    "DPMSolverMultistepScheduler": [({}, {}), ({"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}, {})],
    "DPMSolverSinglestepScheduler": [
        ({}, {}),
        ({"solver_order": 3}, {}),
        ({"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "use_karras_sigmas": True}, {}),
    ],
    "UniPCMultistepScheduler": [
        ({}, {}),
        ({"solver_order": 3, "solver_type": "bh1"}, {}),
        ({"predict_x0": False, "disable_corrector": [1], "final_sigmas_type": "sigma_min", "thresholding": True}, {}),
    ],
    "DEISMultistepScheduler": [({}, {}), ({"solver_order": 3}, {})],
    "LCMScheduler": [({}, {}), ({"prediction_type": "v_prediction", "clip_sample": True}, {})],
    "EDMEulerScheduler": [
        ({}, {}),
        ({"sigma_schedule": "exponential", "prediction_type": "v_prediction"}, {"s_churn": 0.5}),
    ],
    "FlowMatchEulerDiscreteScheduler": [({}, {}), ({"shift": 3.0, "stochastic_sampling": True}, {})],
}

NUM_STEPS = 6
CASES = [
    pytest.param(name, cfg, kw, id=f"{name}-{i}")
    for name, entries in SCAN_CONFIGS.items()
    for i, (cfg, kw) in enumerate(entries)
]


def _model(x, t):
    return parity.dummy_model(jnp, x, t)


@pytest.mark.parametrize("name,config,step_kwargs", CASES)
def test_scan_matches_eager_and_does_not_retrace(name, config, step_kwargs):
    sched = schedulers.from_config({"_class_name": name, **config})
    x0 = jnp.asarray(parity.make_sample())
    state = sched.set_timesteps(NUM_STEPS, like=x0)
    n_calls = state.timesteps.shape[0]
    noises = jnp.stack([jnp.asarray(parity.make_noise(i)) for i in range(n_calls)])
    traces = []

    @jax.jit
    def run(x, st, noises):
        traces.append(1)  # runs once per trace
        return denoise_loop(sched, _model, x, st, noise_fn=lambda i: noises[i], step_kwargs=step_kwargs)

    x_start = x0 * state.init_noise_sigma
    jit_x, jit_state = run(x_start, state, noises)
    eager_x, eager_t = parity.run_ours(name, config, NUM_STEPS, "jax", step_kwargs)
    np.testing.assert_allclose(np.asarray(jit_x), eager_x, rtol=2e-5, atol=2e-5)
    assert int(jit_state.step_index) == n_calls
    # same shapes, new values: no second trace
    run(x_start * 0.5, sched.set_timesteps(NUM_STEPS, like=x0), noises * 2)
    assert len(traces) == 1
