"""UniPCMultistep parity against diffusers 0.42 over its option matrix."""

import numpy as np
import pytest

from diffusion_core import schedulers
from tests.schedulers import parity

NAME = "UniPCMultistepScheduler"
SIGMA_MIN = {"final_sigmas_type": "sigma_min"}
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}

CASES = parity.grid(
    {
        "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"],
        "prediction_type": ["epsilon", "v_prediction", "sample"],
        "timestep_spacing": ["leading", "linspace", "trailing"],
    },
    extras=[
        {"timestep_spacing": "leading", "steps_offset": 1},
        {"lower_order_final": False, **SIGMA_MIN},  # with a zero final sigma diffusers' last step is NaN
        {"lower_order_final": False, "solver_order": 3, "solver_type": "bh1", **SIGMA_MIN},
        {"disable_corrector": [0]},
        {"disable_corrector": [1, 3, 5], "solver_order": 3},
        {"use_karras_sigmas": True},
        {"use_karras_sigmas": True, "prediction_type": "v_prediction", **SIGMA_MIN},
        {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 20.0},
        {"use_exponential_sigmas": True},
        {"use_exponential_sigmas": True, **SIGMA_MIN},
        {"use_beta_sigmas": True},
        {**FLOW},
        {**FLOW, "flow_shift": 3.0, "solver_order": 3, **SIGMA_MIN},
        {**FLOW, "shift_terminal": 0.1},
        {**FLOW, "use_karras_sigmas": True},
        {"use_flow_sigmas": True, "prediction_type": "v_prediction"},
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        {"rescale_betas_zero_snr": True},  # finite with epsilon: UniPC floors the last alpha_bar at 2**-24
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "leading"},
        {"thresholding": True},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.8, "sample_max_value": 2.0, "solver_order": 3},
        {"thresholding": True, "predict_x0": False, **SIGMA_MIN},  # ignored for noise prediction
        {"trained_betas": [0.001 * (i + 1) for i in range(100)], "num_train_timesteps": 100},
        {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "use_karras_sigmas": True},
        {"solver_type": "midpoint"},  # alias of bh2
        {"solver_order": 4, **SIGMA_MIN},
    ],
)

# every solver variant; bh1 and noise prediction need sigma_min for parity (diffusers' last step
# onto sigma = 0 is 0 * inf = NaN there; ours takes the finite limit, tested below)
SOLVER_CASES = parity.grid(
    {
        "solver_order": [1, 2, 3],
        "solver_type": ["bh1", "bh2"],
        "predict_x0": [True, False],
        "final_sigmas_type": ["sigma_min"],
    },
    extras=[{"solver_order": k} for k in (1, 3)]
    + [{"predict_x0": False, "prediction_type": p, "solver_order": 3, **SIGMA_MIN} for p in ("v_prediction", "sample")],
)

JAX_STEPS = (1, 10)  # jax eager is slow; numpy/torch cover every step count


def _params(cases):
    return (
        parity.parametrize_cases(cases, backends=("numpy", "torch")).args[1]
        + parity.parametrize_cases(cases, steps=JAX_STEPS, backends=("jax",)).args[1]
    )


def _skip_reason(config, n):
    """Step counts left out of a case, and why (None: run it)."""
    if config.get("shift_terminal") and n == 1:
        return "diffusers stretches a 1-level flow ladder by 0 / 0 (NaN)"
    if not config.get("predict_x0", True) and config.get("prediction_type") == "sample" and n == 2:
        # diffusers' own float32 and float64 runs differ by 1.1e-4 here; ours is 3e-5 from its float64 run
        return "reference float32 round-off exceeds the tolerance"
    return None


@pytest.mark.parametrize("config,num_steps,backend", _params(CASES))
def test_unipc_parity(config, num_steps, backend):
    if _skip_reason(config, num_steps):
        pytest.skip(_skip_reason(config, num_steps))
    parity.check_parity(NAME, config, num_steps, backend)


@pytest.mark.parametrize("config,num_steps,backend", _params(SOLVER_CASES))
def test_unipc_solver_parity(config, num_steps, backend):
    if _skip_reason(config, num_steps):
        pytest.skip(_skip_reason(config, num_steps))
    parity.check_parity(NAME, config, num_steps, backend)


@pytest.mark.parametrize("backend", parity.BACKENDS)
@pytest.mark.parametrize("sigmas", [[0.95, 0.7, 0.4, 0.1], [1.0, 0.8, 0.6, 0.45, 0.3, 0.15]])
def test_unipc_custom_sigmas(sigmas, backend, monkeypatch):
    import diffusers

    # diffusers' set_timesteps does arithmetic on `sigmas`, so it needs an array, not the list we pass
    original = diffusers.UniPCMultistepScheduler.set_timesteps

    def set_timesteps(self, *args, sigmas=None, **kwargs):
        return original(self, *args, sigmas=None if sigmas is None else np.asarray(sigmas), **kwargs)

    monkeypatch.setattr(diffusers.UniPCMultistepScheduler, "set_timesteps", set_timesteps)
    for config in ({**FLOW}, {**FLOW, "flow_shift": 2.0, "solver_order": 3, **SIGMA_MIN}):
        parity.check_parity(NAME, config, len(sigmas), backend, custom={"sigmas": sigmas})


@pytest.mark.parametrize("backend", parity.BACKENDS)
def test_unipc_matches_diffusers_published_sums(backend):
    """diffusers' test_scheduler_unipc full loops (10 steps, its dummy model): mean |x|."""
    base = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "solver_order": 2,
        "solver_type": "bh2",
        **SIGMA_MIN,
    }
    for extra, mean in [
        ({}, 0.2464),
        ({"use_karras_sigmas": True}, 0.2925),
        ({"prediction_type": "v_prediction"}, 0.1014),
    ]:
        _, got = parity.run_diffusers_full_loop(NAME, {**base, **extra}, backend)
        assert abs(got - mean) < 1e-3, (extra, got)


@pytest.mark.parametrize("config", [{"solver_type": "bh1"}, {"predict_x0": False}])
def test_unipc_last_step_onto_zero_sigma_is_finite(config):
    """diffusers returns NaN here (0 * inf in its last step); ours lands on alpha_t * x0 (the limit)."""
    ours, _ = parity.run_ours(NAME, config, 5, "numpy")
    near, _ = parity.run_ours(NAME, {**config, **SIGMA_MIN}, 5, "numpy")
    assert np.all(np.isfinite(ours))
    assert parity.rel_l2(ours, near) < 0.05  # sigma_min = 0.01 is close to 0


def test_add_noise_with_state_uses_scheduled_sigma():
    import diffusers
    import torch

    sched = schedulers.from_config({"_class_name": NAME, "use_karras_sigmas": True})
    x, noise = parity.make_sample(), parity.make_noise(0)
    state = sched.set_timesteps(10, like=x)
    t = np.asarray(state.timesteps[3:5])
    ours = sched.add_noise(x[:2], noise[:2], t, state=state)
    ref = diffusers.UniPCMultistepScheduler(use_karras_sigmas=True)
    ref.set_timesteps(10)
    want = ref.add_noise(torch.from_numpy(x[:2]), torch.from_numpy(noise[:2]), torch.from_numpy(t)).numpy()
    assert parity.rel_l2(ours, want) < 1e-5


@pytest.mark.parametrize(
    "bad",
    [
        {"solver_order": 0},
        {"solver_order": 2.5},
        {"solver_type": "rk4"},
        {"prediction_type": "x0"},
        {"timestep_spacing": "cosine"},
        {"final_sigmas_type": "one"},
        {"use_karras_sigmas": True, "use_exponential_sigmas": True},
        {"shift_terminal": 0.1},  # needs use_flow_sigmas
        {"predict_x0": False, "prediction_type": "flow_prediction"},
        {"disable_corrector": [0.5]},
        {"disable_corrector": 3},
        {"beta_schedule": "sigmoid"},
        {"time_shift_type": "cubic"},
        {"solver_p": {"_class_name": "DDIMScheduler"}},  # another scheduler as predictor: not supported
    ],
)
def test_unipc_rejects_invalid_config(bad):
    with pytest.raises(ValueError):
        schedulers.from_config({"_class_name": NAME, **bad})


@pytest.mark.parametrize(
    "config,kwargs",
    [
        ({"use_dynamic_shifting": True, "use_flow_sigmas": True}, {"num_inference_steps": 4}),  # needs mu
        ({}, {"sigmas": [0.9, 0.5, 0.1]}),  # custom sigmas need use_flow_sigmas
        ({"use_flow_sigmas": True, "use_karras_sigmas": True}, {"sigmas": [0.9, 0.5, 0.1]}),
        ({}, {"timesteps": [900, 500, 100]}),
    ],
)
def test_unipc_rejects_invalid_request(config, kwargs):
    sched = schedulers.from_config({"_class_name": NAME, **config})
    with pytest.raises(ValueError):
        sched.set_timesteps(like=parity.make_sample(), **kwargs)
