"""Every scheduler: the whole loop as one jitted ``lax.scan`` equals the eager loop, no retrace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backends.flax import denoise_loop
from diffusion_core import schedulers
from tests.schedulers import parity

# One stochastic-free and (where it exists) one noisy configuration per scheduler.
SCAN_CONFIGS = {
    "DDIMScheduler": [({}, {}), ({"thresholding": True}, {"eta": 0.7})],
    "DDPMScheduler": [({}, {}), ({"variance_type": "learned_range"}, {})],
    "PNDMScheduler": [({}, {}), ({"skip_prk_steps": True}, {})],
    "LMSDiscreteScheduler": [({}, {}), ({"use_karras_sigmas": True}, {})],
    "EulerDiscreteScheduler": [({}, {}), ({"use_karras_sigmas": True}, {"s_churn": 0.5})],
    "EulerAncestralDiscreteScheduler": [({}, {})],
    "HeunDiscreteScheduler": [({}, {}), ({"use_karras_sigmas": True}, {})],
    "KDPM2DiscreteScheduler": [({}, {})],
    "KDPM2AncestralDiscreteScheduler": [({}, {})],
    "DPMSolverMultistepScheduler": [({}, {}), ({"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}, {})],
    "DPMSolverSinglestepScheduler": [({}, {}), ({"solver_order": 3}, {})],
    "UniPCMultistepScheduler": [({}, {}), ({"solver_order": 3, "solver_type": "bh1"}, {})],
    "DEISMultistepScheduler": [({}, {}), ({"solver_order": 3}, {})],
    "LCMScheduler": [({}, {})],
    "EDMEulerScheduler": [({}, {})],
    "FlowMatchEulerDiscreteScheduler": [({}, {})],
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
