"""EulerAncestralDiscreteScheduler parity against diffusers 0.42 over its option matrix."""

import numpy as np
import pytest

from diffusion_core import schedulers
from tests.schedulers import parity
from tests.schedulers.test_parity_euler import parametrize

NAME = "EulerAncestralDiscreteScheduler"

# prediction_type="sample" is left out: diffusers raises NotImplementedError at its first step
# (and we reject it in the config).
CASES = parity.grid(
    {
        "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"],
        "prediction_type": ["epsilon", "v_prediction"],
        "timestep_spacing": ["leading", "linspace", "trailing"],
    },
    extras=[
        {"steps_offset": 1, "timestep_spacing": "leading"},
        # zero-SNR + epsilon divides by a zero alpha in diffusers (inf): only v_prediction is meaningful
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        {"trained_betas": [0.001 * (i + 1) for i in range(100)], "num_train_timesteps": 100},
        {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "steps_offset": 1,
            "timestep_spacing": "leading",
        },
    ],
)


@parametrize(CASES)
def test_euler_ancestral_parity(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


def test_euler_ancestral_requires_noise():
    sched = schedulers.EulerAncestralDiscreteScheduler()
    assert sched.needs_noise and sched.needs_noise_for()
    state = sched.set_timesteps(4, like=np.zeros(parity.SHAPE, np.float32))
    x = np.ones(parity.SHAPE, np.float32)
    with pytest.raises(ValueError, match="noise"):
        sched.step(state, x, x)


@pytest.mark.parametrize(
    "config",
    [
        {"prediction_type": "sample"},
        {"prediction_type": "flow"},
        {"timestep_spacing": "uniform"},
        {"beta_schedule": "exp"},
        {"use_karras_sigmas": True},
    ],
)
def test_euler_ancestral_rejects_invalid_config(config):
    with pytest.raises(ValueError):
        schedulers.EulerAncestralDiscreteScheduler(**config)


@pytest.mark.parametrize("custom", [{"timesteps": [900, 500, 100]}, {"sigmas": [10.0, 1.0, 0.0]}])
def test_euler_ancestral_rejects_custom_schedules(custom):
    with pytest.raises(ValueError):
        schedulers.EulerAncestralDiscreteScheduler().set_timesteps(**custom)


@pytest.mark.parametrize("backend", parity.BACKENDS)
@pytest.mark.parametrize(
    "config,expected_sum,expected_mean",
    [({}, 152.3192, 0.1983), ({"prediction_type": "v_prediction"}, 108.4439, 0.1412)],
)
def test_euler_ancestral_diffusers_full_loop_values(config, expected_sum, expected_mean, backend):
    """diffusers' test_scheduler_euler_ancestral.py sums, with its torch.manual_seed(0) noise stream."""
    config = {**parity.DIFFUSERS_TEST_CONFIG, **config}
    total, mean = parity.run_diffusers_full_loop(NAME, config, backend, noise_seed=0)
    assert abs(total - expected_sum) < 1e-2
    assert abs(mean - expected_mean) < 1e-3
