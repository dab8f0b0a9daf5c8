"""DPM-Solver multistep parity against diffusers 0.42 over its option matrix, plus config errors."""

import numpy as np
import pytest

from diffusion_core import schedulers
from tests.schedulers import parity

NAME = "DPMSolverMultistepScheduler"
JAX_LIGHT = ("numpy", "torch")  # jax eager is slow; the big grids run jax at steps (1, 10) below

BASE_GRID = parity.grid(
    {
        "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"],
        "prediction_type": ["epsilon", "v_prediction", "sample"],
        "timestep_spacing": ["leading", "linspace", "trailing"],
    }
)


def _solver_cases():
    """Every algorithm_type x solver_type x solver_order (noise-prediction variants need sigma_min)."""
    cases = []
    for algo in ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"):
        for solver_type in ("midpoint", "heun"):
            for order in (1, 2, 3):
                case = {"algorithm_type": algo, "solver_type": solver_type, "solver_order": order}
                if algo in ("dpmsolver", "sde-dpmsolver"):
                    case["final_sigmas_type"] = "sigma_min"  # diffusers rejects 'zero' for these
                cases.append(case)
    return cases


SOLVERS = _solver_cases()
ODE_SOLVERS = [c for c in SOLVERS if not c["algorithm_type"].startswith("sde-")]
# sde-dpmsolver has no third-order update in diffusers: with order 3 only runs that never reach a
# third-order step (n <= 2) are valid, so those cases run at steps (1, 2).
SDE_SOLVERS = [
    c
    for c in SOLVERS
    if c["algorithm_type"].startswith("sde-")
    and not (c["algorithm_type"] == "sde-dpmsolver" and c["solver_order"] == 3)
]
SDE_ORDER3 = [c for c in SOLVERS if c["algorithm_type"] == "sde-dpmsolver" and c["solver_order"] == 3]

EXTRAS = [
    {"lower_order_final": False},
    {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
    {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
    {"final_sigmas_type": "sigma_min", "solver_order": 3},
    {"thresholding": True},
    {"thresholding": True, "dynamic_thresholding_ratio": 0.87, "sample_max_value": 0.5},
    {"thresholding": True, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "sample_max_value": 1.5},
    {"thresholding": True, "prediction_type": "v_prediction", "solver_order": 3},
    {"use_karras_sigmas": True},
    {"use_karras_sigmas": True, "prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"},
    {"use_exponential_sigmas": True},
    {"use_exponential_sigmas": True, "beta_schedule": "scaled_linear", "solver_order": 3},
    {"use_beta_sigmas": True},
    {"use_beta_sigmas": True, "final_sigmas_type": "sigma_min"},
    {"use_lu_lambdas": True},
    {"use_lu_lambdas": True, "beta_schedule": "squaredcos_cap_v2"},
    {"use_flow_sigmas": True, "prediction_type": "flow_prediction"},
    {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0, "solver_order": 3},
    {
        "use_flow_sigmas": True,
        "prediction_type": "flow_prediction",
        "flow_shift": 3.0,
        "final_sigmas_type": "sigma_min",
    },
    {"lambda_min_clipped": -5.1, "beta_schedule": "squaredcos_cap_v2"},
    {"lambda_min_clipped": -5.1, "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "leading"},
    {"lambda_min_clipped": -3.0, "timestep_spacing": "trailing"},
    {"steps_offset": 1, "timestep_spacing": "leading"},
    # zero-terminal-SNR makes epsilon prediction divide by ~0 at t=T-1 (inf in diffusers): v only
    {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "solver_order": 3},
    {"trained_betas": [0.001 * (i + 1) for i in range(100)], "num_train_timesteps": 100},
    {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "use_karras_sigmas": True,
    },
    # diffusers rewrites "deis" to dpmsolver++ (and, a quirk, rejects it with final_sigmas_type="zero";
    # we accept that: a DEIS config swapped in keeps working)
    {"algorithm_type": "deis", "final_sigmas_type": "sigma_min"},
    {"solver_type": "bh2", "solver_order": 3},  # diffusers rewrites to midpoint
]

# n=50 with trained_betas over 100 training steps is valid; every case runs at all step counts.
CASES = BASE_GRID + ODE_SOLVERS + EXTRAS
# karras on the cosine schedule truncates fractional timesteps; from n=10 on the first two collide
# (998, 998) and diffusers' step-index lookup then runs past its schedule (IndexError): n <= 2 only.
SHORT_CASES = [
    {"use_karras_sigmas": True, "beta_schedule": "squaredcos_cap_v2"},
    {"use_karras_sigmas": True, "beta_schedule": "squaredcos_cap_v2", "solver_order": 3},
]


@parity.parametrize_cases(CASES, backends=JAX_LIGHT)
def test_dpm_multistep_parity(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


@parity.parametrize_cases(CASES, steps=(1, 10), backends=("jax",))
def test_dpm_multistep_parity_jax(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


@parity.parametrize_cases(SHORT_CASES, steps=(1, 2))
def test_dpm_multistep_short_parity(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


SDE_CASES = SDE_SOLVERS + [{**c, "thresholding": True} for c in SDE_SOLVERS[:2]]


@parity.parametrize_cases(SDE_CASES, backends=JAX_LIGHT)
def test_dpm_multistep_sde_parity(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


@parity.parametrize_cases(SDE_CASES, steps=(2, 10), backends=("jax",))
def test_dpm_multistep_sde_parity_jax(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


@parity.parametrize_cases(SDE_ORDER3, steps=(1, 2))
def test_dpm_multistep_sde_order3_short_parity(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


@pytest.mark.parametrize("backend", parity.BACKENDS)
@pytest.mark.parametrize(
    "config,timesteps",
    [
        ({}, [999, 800, 600, 400, 200, 0]),
        ({"solver_order": 3}, [950, 700, 501, 333, 120, 40, 7]),
        ({"prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"}, [900, 450, 10]),
        ({"algorithm_type": "sde-dpmsolver++"}, [999, 750, 500, 250, 1]),
        ({"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun"}, [801, 601, 21]),
    ],
)
def test_dpm_multistep_custom_timesteps_parity(config, timesteps, backend):
    parity.check_parity(NAME, config, len(timesteps), backend, custom={"timesteps": timesteps})


DYNAMIC = {"use_flow_sigmas": True, "use_dynamic_shifting": True, "prediction_type": "flow_prediction"}


@parity.parametrize_cases([DYNAMIC, {**DYNAMIC, "solver_order": 3}], steps=(2, 10, 50))
def test_dpm_multistep_dynamic_shift_mu_parity(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend, custom={"mu": 0.8})


def test_mu_needs_dynamic_shifting():
    with pytest.raises(ValueError, match="mu"):
        schedulers.DPMSolverMultistepScheduler(use_flow_sigmas=True).set_timesteps(10, mu=0.5)


def _learned_range_run(sched_ours, n, backend):
    """Our loop with a model that also predicts variance channels (output 2C channels)."""
    from diffusion_core.arrays import namespace

    x = parity.to_backend(backend, parity.make_sample())
    xp = namespace(x)
    state = sched_ours.set_timesteps(n, like=x)
    for _ in range(n):
        out = parity.dummy_model(xp, x, sched_ours.current_timestep(state))
        out = xp.concat([out, 0.3 * out + 1.0], axis=1)  # (B, 2C, H, W)
        x, state = sched_ours.step(state, out, x)
    return parity.to_numpy(x)


@pytest.mark.parametrize("backend", parity.BACKENDS)
@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "dpmsolver"])
def test_dpm_multistep_learned_variance_parity(variance_type, algorithm_type, backend):
    import diffusers
    import torch

    cfg = {"variance_type": variance_type, "algorithm_type": algorithm_type, "final_sigmas_type": "sigma_min"}
    ref = diffusers.DPMSolverMultistepScheduler(**cfg)
    ref.set_timesteps(10)
    x = torch.from_numpy(parity.make_sample())  # 3 channels: diffusers keeps output[:, :3]
    for t in ref.timesteps:
        out = parity.dummy_model(parity._torch_xp(), x, t)
        x = ref.step(torch.cat([out, 0.3 * out + 1.0], dim=1), t, x).prev_sample
    ours = _learned_range_run(schedulers.DPMSolverMultistepScheduler(**cfg), 10, backend)
    assert parity.rel_l2(ours, x.numpy()) <= parity.REL_TOL


def test_needs_noise_follows_algorithm_type():
    assert not schedulers.DPMSolverMultistepScheduler().needs_noise
    for algo in ("sde-dpmsolver++", "sde-dpmsolver"):
        sched = schedulers.DPMSolverMultistepScheduler(algorithm_type=algo, final_sigmas_type="sigma_min")
        assert sched.needs_noise and sched.needs_noise_for()
        x = np.zeros((1, 3, 2, 2), np.float32)
        state = sched.set_timesteps(3, like=x)
        with pytest.raises(ValueError, match="noise"):
            sched.step(state, x, x)


def test_aliases_match_diffusers_rewrites():
    sched = schedulers.DPMSolverMultistepScheduler(algorithm_type="deis", solver_type="logrho")
    assert sched.config["algorithm_type"] == "dpmsolver++" and sched.config["solver_type"] == "midpoint"


@pytest.mark.parametrize(
    "config,match",
    [
        ({"algorithm_type": "dpmsolver+"}, "algorithm_type"),
        ({"solver_type": "euler"}, "solver_type"),
        ({"solver_order": 4}, "solver_order"),
        ({"solver_order": 0}, "solver_order"),
        ({"prediction_type": "noise"}, "prediction_type"),
        ({"variance_type": "fixed"}, "variance_type"),  # DDPM's own types map to None (swaps)
        ({"final_sigmas_type": "max"}, "final_sigmas_type"),
        ({"algorithm_type": "dpmsolver"}, "final_sigmas_type"),
        ({"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "zero"}, "final_sigmas_type"),
        (
            {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "prediction_type": "flow_prediction"},
            "flow_prediction",
        ),
        ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "mutually exclusive"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"time_shift_type": "linear"}, "time_shift_type"),
        ({"timestep_spacing": "uniform"}, "timestep_spacing"),
    ],
)
def test_invalid_config_raises(config, match):
    with pytest.raises(ValueError, match=match):
        schedulers.DPMSolverMultistepScheduler(**config)


@pytest.mark.parametrize(
    "config,kwargs,match",
    [
        ({"use_karras_sigmas": True}, {"timesteps": [900, 500, 100]}, "timesteps"),
        ({"use_lu_lambdas": True}, {"timesteps": [900, 500, 100]}, "timesteps"),
        ({"use_flow_sigmas": True}, {"timesteps": [900, 500, 100]}, "timesteps"),
        ({}, {"timesteps": [1000, 500]}, "timesteps"),
        ({}, {"timesteps": [100, 500]}, "timesteps"),
        (
            {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3},
            {"num_inference_steps": 10},
            "third-order",
        ),
    ],
)
def test_invalid_set_timesteps_raises(config, kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedulers.DPMSolverMultistepScheduler(**config).set_timesteps(like=parity.make_sample(), **kwargs)


@pytest.mark.parametrize("backend", parity.BACKENDS)
@pytest.mark.parametrize("config", [{}, {"use_flow_sigmas": True}, {"use_karras_sigmas": True}])
def test_add_noise_with_state_matches_diffusers(config, backend):
    import diffusers
    import torch

    ref = diffusers.DPMSolverMultistepScheduler(**config)
    ref.set_timesteps(10)
    ours = schedulers.DPMSolverMultistepScheduler(**config)
    x0 = parity.make_sample()
    noise = parity.make_noise(0)
    t = ref.timesteps[[0, 4]]
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
    like = parity.to_backend(backend, x0)
    state = ours.set_timesteps(10, like=like)
    got = ours.add_noise(like, parity.to_backend(backend, noise), parity.to_backend(backend, t.numpy()), state=state)
    np.testing.assert_allclose(parity.to_numpy(got), want, rtol=1e-5, atol=1e-6)


# diffusers' tests/schedulers/test_scheduler_dpm_multi.py full loops (mean |x|, its 1e-3 tolerance);
# diffusers 0.42.1 itself gives 0.2092 for karras + v (its test's 0.2096 is within tolerance)
DIFFUSERS_TEST = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "solver_order": 2,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": False,
    "euler_at_final": False,
    "final_sigmas_type": "sigma_min",
}


@pytest.mark.parametrize("backend", parity.BACKENDS)
@pytest.mark.parametrize(
    "extra,mean",
    [
        ({}, 0.3301),
        ({"prediction_type": "v_prediction"}, 0.2251),
        ({"thresholding": True, "dynamic_thresholding_ratio": 0.87, "sample_max_value": 0.5}, 1.1364),
        ({"use_karras_sigmas": True, "prediction_type": "v_prediction"}, 0.2096),
    ],
)
def test_diffusers_full_loop_values(extra, mean, backend):
    _, got = parity.run_diffusers_full_loop(NAME, {**DIFFUSERS_TEST, **extra}, backend)
    assert abs(got - mean) < 1e-3
