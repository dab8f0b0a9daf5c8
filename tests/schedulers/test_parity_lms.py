"""LMSDiscreteScheduler parity against diffusers 0.42 over its option matrix and orders."""

import functools

import numpy as np
import pytest

from diffusion_core import arrays, schedulers
from diffusion_core.schedulers import lms
from tests.schedulers import parity
from tests.schedulers.test_parity_euler import parametrize

NAME = "LMSDiscreteScheduler"

# The grid runs at n <= 10: a 50-step diffusers reference costs ~1 s here (scipy quad for every
# coefficient of every step); the extras below cover n=50.
GRID = parity.grid(
    {
        "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"],
        "prediction_type": ["epsilon", "v_prediction", "sample"],
        "timestep_spacing": ["leading", "linspace", "trailing"],
    }
)
EXTRAS = [
    {"use_karras_sigmas": True},
    {"use_karras_sigmas": True, "prediction_type": "v_prediction", "beta_schedule": "scaled_linear"},
    {"use_exponential_sigmas": True},
    {"use_exponential_sigmas": True, "timestep_spacing": "trailing", "prediction_type": "sample"},
    {"use_beta_sigmas": True},
    {"use_beta_sigmas": True, "timestep_spacing": "leading", "prediction_type": "v_prediction"},
    {"steps_offset": 1, "timestep_spacing": "leading"},
    {"trained_betas": [0.001 * (i + 1) for i in range(100)], "num_train_timesteps": 100},
    {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "timestep_spacing": "leading",
    },
]

# step(order=k): diffusers' keyword. Ours sizes the buffer at set_timesteps(order=K) (default 4),
# so k <= 4 runs through the plain harness; k > 4 needs the state built for it (below).
ORDERS = [({"order": k}, cfg) for k in (1, 2, 3) for cfg in ({}, {"use_karras_sigmas": True})]


@parametrize(GRID, steps=(1, 2, 10))
def test_lms_parity(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


@parametrize(EXTRAS + [{"prediction_type": p} for p in ("epsilon", "v_prediction", "sample")])
def test_lms_option_parity(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


@pytest.mark.parametrize(
    "index,num_steps,backend",
    [(i, n, b) for i in range(len(ORDERS)) for n in (2, 10, 50) for b in parity.BACKENDS if b != "jax" or n == 10],
)
def test_lms_order_parity(index, num_steps, backend):
    kwargs, config = ORDERS[index]
    parity.check_parity(NAME, config, num_steps, backend, step_kwargs=kwargs)


HIGH_ORDER_CONFIG, HIGH_ORDER_STEPS = {"beta_schedule": "scaled_linear", "timestep_spacing": "trailing"}, 12


@functools.cache
def _high_order_reference(order):
    return parity.run_reference(NAME, HIGH_ORDER_CONFIG, HIGH_ORDER_STEPS, step_kwargs={"order": order})


@pytest.mark.parametrize("backend", parity.BACKENDS)
@pytest.mark.parametrize("order", [5, 6])
def test_lms_high_order_parity(order, backend):
    """Orders above the default need set_timesteps(order=K); compare with diffusers' step(order=K)."""
    config, n = HIGH_ORDER_CONFIG, HIGH_ORDER_STEPS
    ref_x, ref_t = _high_order_reference(order)
    sched = schedulers.LMSDiscreteScheduler(**config)
    x = parity.to_backend(backend, parity.make_sample())
    xp = arrays.namespace(x)
    state = sched.set_timesteps(n, like=x, order=order)
    x = x * state.init_noise_sigma
    for _ in range(n):
        out = parity.dummy_model(xp, sched.scale_model_input(state, x), sched.current_timestep(state))
        x, state = sched.step(state, out, x, order=order)
    np.testing.assert_allclose(parity.to_numpy(state.timesteps), ref_t, rtol=1e-6, atol=1e-4)
    assert parity.rel_l2(parity.to_numpy(x), ref_x) <= parity.REL_TOL


def test_lms_weights_integrate_polynomials_exactly():
    """Order-k weights reproduce the integral of any degree < k polynomial slope."""
    sigmas = np.array([14.6, 9.0, 5.5, 3.1, 1.6, 0.7, 0.2, 0.0])
    table = lms.lms_table(sigmas, 4)  # (4, 7, 4), oldest slope first
    for k in range(1, 5):
        for i in range(len(sigmas) - 1):
            used = min(i + 1, k)
            past = sigmas[i - np.arange(4)[::-1]] if i >= 3 else np.pad(sigmas[: i + 1], (3 - i, 0))
            for p in range(used):
                exact = (sigmas[i + 1] ** (p + 1) - sigmas[i] ** (p + 1)) / (p + 1)
                approx = np.sum(table[k - 1, i] * past**p * (np.arange(4) >= 4 - used))
                np.testing.assert_allclose(approx, exact, rtol=1e-10, atol=1e-10)


def test_lms_order_validation():
    sched = schedulers.LMSDiscreteScheduler()
    like = np.zeros(parity.SHAPE, np.float32)
    with pytest.raises(ValueError, match="order"):
        sched.set_timesteps(4, like=like, order=0)
    state = sched.set_timesteps(4, like=like, order=2)
    with pytest.raises(ValueError, match="order"):
        sched.step(state, like, like, order=3)


@pytest.mark.parametrize(
    "config",
    [
        {"prediction_type": "flow"},
        {"timestep_spacing": "uniform"},
        {"use_karras_sigmas": True, "use_beta_sigmas": True},
        {"beta_schedule": "sigmoid"},
        {"rescale_betas_zero_snr": True},
    ],
)
def test_lms_rejects_invalid_config(config):
    with pytest.raises(ValueError):
        schedulers.LMSDiscreteScheduler(**config)


@pytest.mark.parametrize("custom", [{"timesteps": [900, 500, 100]}, {"sigmas": [10.0, 1.0, 0.0]}])
def test_lms_rejects_custom_schedules(custom):
    with pytest.raises(ValueError):
        schedulers.LMSDiscreteScheduler().set_timesteps(**custom)


@pytest.mark.parametrize("backend", parity.BACKENDS)
def test_lms_diffusers_full_loop_values(backend):
    """diffusers' test_scheduler_lms.py full-loop sum and mean (deterministic)."""
    total, mean = parity.run_diffusers_full_loop(NAME, parity.DIFFUSERS_TEST_CONFIG, backend)
    assert abs(total - 1006.388) < 1e-2
    assert abs(mean - 1.31) < 1e-3
