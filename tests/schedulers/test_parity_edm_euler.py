"""EDM Euler parity against diffusers 0.42 over its option matrix, churn, custom ramps and errors."""

import numpy as np
import pytest
import torch

from diffusion_core import schedulers
from tests.schedulers import parity

NAME = "EDMEulerScheduler"

CASES = parity.grid(
    {
        "sigma_schedule": ["karras", "exponential"],
        "prediction_type": ["epsilon", "v_prediction"],  # diffusers' precondition_outputs raises on "sample"
        "final_sigmas_type": ["zero", "sigma_min"],
    },
    extras=[
        {"sigma_min": 0.02, "sigma_max": 14.6, "sigma_data": 1.0},
        {"rho": 3.0, "sigma_data": 0.25},
        {"sigma_schedule": "exponential", "sigma_min": 0.1, "sigma_max": 20.0, "prediction_type": "v_prediction"},
        {"num_train_timesteps": 10},  # unused by sampling: 50 steps > 10 is fine in diffusers too
    ],
)

CHURN = [
    ({"s_churn": 0.5}, {}),
    ({"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 10.0, "s_noise": 1.003}, {"prediction_type": "v_prediction"}),
    ({"s_churn": 1.0, "s_tmin": 0.5}, {"sigma_schedule": "exponential", "final_sigmas_type": "sigma_min"}),
]


@parity.parametrize_cases(CASES)
def test_edm_euler_parity(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


@parity.parametrize_cases([c for _, c in CHURN], steps=(2, 10))
def test_edm_euler_churn_parity(config, num_steps, backend):
    kwargs = next(k for k, c in CHURN if c == config)
    parity.check_parity(NAME, config, num_steps, backend, step_kwargs=kwargs)


RAMPS = [[0.0, 0.2, 0.5, 0.9], [0.1, 0.3, 0.35, 0.6, 1.0], [0.0]]


@pytest.mark.parametrize("backend", parity.BACKENDS)
@pytest.mark.parametrize(
    "config", [{}, {"sigma_schedule": "exponential"}, {"prediction_type": "v_prediction"}], ids=parity.case_id
)
@pytest.mark.parametrize("ramp", RAMPS, ids=str)
def test_edm_euler_custom_sigmas_are_ramp_points(ramp, config, backend):
    """diffusers maps set_timesteps(sigmas=...) through the schedule as ramp points (and needs a tensor)."""
    ref_x, ref_t = parity.run_reference(NAME, config, None, custom={"sigmas": torch.tensor(ramp)})
    ours_x, ours_t = parity.run_ours(NAME, config, None, backend, custom={"sigmas": ramp})
    np.testing.assert_allclose(ours_t, ref_t, rtol=1e-6, atol=1e-6)
    assert parity.rel_l2(ours_x, ref_x) <= parity.REL_TOL


@pytest.mark.parametrize("backend", parity.BACKENDS)
def test_edm_euler_pred_original_sample_kwarg(backend):
    import diffusers

    ref = diffusers.EDMEulerScheduler()
    ref.set_timesteps(5)
    x, x0 = parity.make_sample(), parity.make_noise(3)
    ref.scale_model_input(torch.from_numpy(x), ref.timesteps[0])
    expected = ref.step(
        torch.zeros(x.shape), ref.timesteps[0], torch.from_numpy(x), pred_original_sample=torch.from_numpy(x0)
    ).prev_sample.numpy()
    sched = schedulers.EDMEulerScheduler()
    xb = parity.to_backend(backend, x)
    state = sched.set_timesteps(5, like=xb)
    got, _ = sched.step(state, xb * 0, xb, pred_original_sample=parity.to_backend(backend, x0))
    np.testing.assert_allclose(parity.to_numpy(got), expected, rtol=1e-5, atol=1e-5)


def test_edm_euler_add_noise_inverts_c_noise_without_state():
    sched = schedulers.EDMEulerScheduler()
    x0, noise = parity.make_sample(), parity.make_noise(0)
    state = sched.set_timesteps(7, like=x0)
    t = np.asarray(state.timesteps)[[0, 4]]
    sigma = np.asarray(state.sigmas)[[0, 4]].reshape(2, 1, 1, 1)
    np.testing.assert_allclose(sched.add_noise(x0, noise, t), x0 + sigma * noise, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sched.add_noise(x0, noise, t, state=state), x0 + sigma * noise, rtol=1e-5, atol=1e-5)


def test_edm_euler_needs_noise_only_with_churn():
    sched = schedulers.EDMEulerScheduler()
    assert not sched.needs_noise_for() and sched.needs_noise_for(s_churn=0.1)
    state = sched.set_timesteps(4, like=parity.make_sample())
    with pytest.raises(ValueError, match="noise"):
        sched.step(state, parity.make_sample(), parity.make_sample(), s_churn=0.5)


@pytest.mark.parametrize(
    "config,match",
    [
        ({"sigma_schedule": "linear"}, "sigma_schedule"),
        ({"prediction_type": "sample"}, "prediction_type"),
        ({"final_sigmas_type": "one"}, "final_sigmas_type"),
        ({"sigma_min": 0.0}, "sigma_min"),
        ({"sigma_data": -1.0}, "sigma_data"),
        ({"rho": 0}, "rho"),
    ],
)
def test_edm_euler_rejects_invalid_config(config, match):
    with pytest.raises(ValueError, match=match):
        schedulers.EDMEulerScheduler(**config)


@pytest.mark.parametrize(
    "kwargs,match", [({"num_inference_steps": 0}, "num_inference_steps"), ({"timesteps": [3.0, 1.0]}, "timesteps")]
)
def test_edm_euler_rejects_invalid_schedule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedulers.EDMEulerScheduler().set_timesteps(**kwargs)
