"""DDPM parity against diffusers 0.42 over its option matrix, learned variances included."""

import sys

import numpy as np
import pytest

from diffusion_core import schedulers
from tests.schedulers import parity

NAME = "DDPMScheduler"

CASES = parity.grid(
    {
        "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"],
        "prediction_type": ["epsilon", "v_prediction", "sample"],
        "timestep_spacing": ["leading", "linspace", "trailing"],
    },
    extras=[
        *(
            {"variance_type": v, "timestep_spacing": s}
            for v in ("fixed_small_log", "fixed_large")
            for s in ("leading", "trailing")
        ),
        {"clip_sample": False},
        {"clip_sample": True, "clip_sample_range": 0.5},
        {"steps_offset": 1},
        {"steps_offset": 1, "variance_type": "fixed_large"},  # last timestep 1 > 0: diffusers adds noise there
        {"thresholding": True, "clip_sample": False},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.8, "sample_max_value": 2.0},
        # zero terminal SNR with epsilon divides by sqrt(alpha_bar) = 0 in diffusers (inf): v only
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        {
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
            "timestep_spacing": "linspace",
            "variance_type": "fixed_large",
        },
        {"trained_betas": [0.001 * (i + 1) for i in range(100)], "num_train_timesteps": 100},
        {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "clip_sample": False,
            "steps_offset": 1,
        },
    ],
)

CUSTOM = [
    ({}, [999, 700, 400, 100, 0]),
    ({"variance_type": "fixed_large"}, [950, 600, 300, 12]),  # last t > 0: noise on the last step
    ({"prediction_type": "v_prediction"}, [500]),
]


@parity.parametrize_cases(CASES, backends=("numpy", "torch"))
def test_ddpm_parity(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


@parity.parametrize_cases(CASES, steps=(1, 10), backends=("jax",))  # jax eager is slow: fewer steps
def test_ddpm_parity_jax(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


@pytest.mark.parametrize("backend", parity.BACKENDS)
@pytest.mark.parametrize("config,timesteps", CUSTOM, ids=[str(t) for _, t in CUSTOM])
def test_ddpm_custom_timesteps_parity(config, timesteps, backend):
    parity.check_parity(NAME, config, None, backend, custom={"timesteps": timesteps})


# diffusers' fixed_large_log treats log(beta) as a variance and takes its square root, which is
# NaN whenever beta < 1. It is finite only where no noise is drawn (t == 0) or beta == 1
# (zero terminal SNR at t = T - 1). We reproduce the formula: finite cases match, the rest is NaN.
@pytest.mark.parametrize("backend", parity.BACKENDS)
@pytest.mark.parametrize(
    "config,num_steps",
    [
        ({"variance_type": "fixed_large_log"}, 1),
        (
            {
                "variance_type": "fixed_large_log",
                "rescale_betas_zero_snr": True,
                "prediction_type": "v_prediction",
                "timestep_spacing": "trailing",
            },
            1,
        ),
    ],
)
def test_ddpm_fixed_large_log_parity(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


def test_ddpm_fixed_large_log_is_nan_like_diffusers():
    config = {"variance_type": "fixed_large_log"}
    ref_x, _ = parity.run_reference(NAME, config, 2)
    ours_x, _ = parity.run_ours(NAME, config, 2, "numpy")
    assert np.isnan(ref_x).all() and np.isnan(ours_x).all()


# ----- learned variances: the model returns 2C channels (prediction, variance) -----------------
def learned_model(xp, sample, t, variance_type):
    """dummy_model's prediction plus a variance channel block: a positive variance or a [-1, 1] weight."""
    pred = parity.dummy_model(xp, sample, t)
    if variance_type == "learned":
        var = 1e-3 * (1 + sample * sample)
    else:
        var = 0.9 * xp.sin(2 * sample)
    return xp.concat([pred, var], axis=1)  # (B, 2C, H, W)


def run_learned_ours(config, n, backend):
    from diffusion_core.arrays import namespace

    sched = schedulers.from_config({"_class_name": NAME, **config})
    x = parity.to_backend(backend, parity.make_sample())
    xp = namespace(x)
    state = sched.set_timesteps(n, like=x)
    for i in range(state.timesteps.shape[0]):
        out = learned_model(xp, x, sched.current_timestep(state), config["variance_type"])
        x, state = sched.step(state, out, x, noise=parity.to_backend(backend, parity.make_noise(i)))
    return parity.to_numpy(x)


def run_learned_reference(config, n):
    import diffusers
    import torch

    ref = diffusers.DDPMScheduler.from_config(config)
    ref.set_timesteps(n)
    module = sys.modules[type(ref).__module__]
    current = []
    original = parity._patch_randn(module, lambda: current[0].clone())
    try:
        x = torch.from_numpy(parity.make_sample())
        for i, t in enumerate(ref.timesteps):
            current[:] = [torch.from_numpy(parity.make_noise(i))]
            out = learned_model(parity._torch_xp(), x, t, config["variance_type"])
            x = ref.step(out, t, x).prev_sample
    finally:
        module.randn_tensor = original
    return x.numpy()


LEARNED_CASES = [
    {"variance_type": "learned"},
    {"variance_type": "learned_range"},
    {"variance_type": "learned_range", "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    {"variance_type": "learned_range", "beta_schedule": "squaredcos_cap_v2", "thresholding": True},
]


@parity.parametrize_cases(LEARNED_CASES)
def test_ddpm_learned_variance_parity(config, num_steps, backend):
    ref = run_learned_reference(config, num_steps)
    assert np.all(np.isfinite(ref))
    err = parity.rel_l2(run_learned_ours(config, num_steps, backend), ref)
    assert err <= parity.REL_TOL, f"relative L2 {err:.3g} ({config}, n={num_steps}, {backend})"


def test_ddpm_learned_range_scan_matches_eager():
    import jax
    import jax.numpy as jnp

    from diffusion_core.flax import denoise_loop

    config = {"variance_type": "learned_range"}
    sched = schedulers.from_config({"_class_name": NAME, **config})
    x0 = jnp.asarray(parity.make_sample())
    state = sched.set_timesteps(6, like=x0)
    noises = jnp.stack([jnp.asarray(parity.make_noise(i)) for i in range(6)])
    model = lambda x, t: learned_model(jnp, x, t, "learned_range")  # noqa: E731
    run = jax.jit(lambda x, st, nz: denoise_loop(sched, model, x, st, noise_fn=lambda i: nz[i]))
    jit_x, _ = run(x0, state, noises)
    np.testing.assert_allclose(np.asarray(jit_x), run_learned_ours(config, 6, "jax"), rtol=2e-5, atol=2e-5)


# ----- diffusers' own fast test (tests/schedulers/test_scheduler_ddpm.py, full loop) ---------
@pytest.mark.parametrize(
    "prediction_type,total,mean", [("epsilon", 258.9606, 0.3372), ("v_prediction", 202.0296, 0.2631)]
)
def test_ddpm_diffusers_fast_test_golden(prediction_type, total, mean):
    """Same dummies and the same torch noise stream (one draw per step with t > 0, in order)."""
    import torch

    sched = schedulers.from_config(
        {
            "_class_name": NAME,
            "num_train_timesteps": 1000,
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "beta_schedule": "linear",
            "variance_type": "fixed_small",
            "clip_sample": True,
            "prediction_type": prediction_type,
        }
    )
    n = 4 * 3 * 8 * 8
    x = (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)  # dummy_sample_deter, (4, 3, 8, 8)
    state = sched.set_timesteps(1000, like=x)  # leading, ratio 1: 999..0, as with no set_timesteps
    g = torch.manual_seed(0)
    for t in state.timesteps.tolist():
        out = x * t / (t + 1)  # dummy_model
        noise = torch.randn(x.shape, generator=g) if t > 0 else torch.zeros_like(x)
        x, state = sched.step(state, out, x, noise=noise)
    assert abs(x.abs().sum().item() - total) < 1e-2
    assert abs(x.abs().mean().item() - mean) < 1e-3


# ----- invalid input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        {"variance_type": "fixed_medium"},
        {"beta_schedule": "cubic"},
        {"prediction_type": "flow"},
        {"timestep_spacing": "middle"},
        {"num_train_timesteps": 0},
    ],
)
def test_ddpm_rejects_bad_config(config):
    with pytest.raises(ValueError):
        schedulers.DDPMScheduler(**config)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_inference_steps": 1001},
        {"num_inference_steps": 0},
        {"timesteps": [1000, 500]},  # must start below num_train_timesteps
        {"timesteps": [500, 700]},  # ascending
        {"timesteps": [500.5, 100]},  # not integers
        {"timesteps": [500, -1]},
    ],
)
def test_ddpm_rejects_bad_set_timesteps(kwargs):
    with pytest.raises(ValueError):
        schedulers.DDPMScheduler().set_timesteps(**kwargs)


def test_ddpm_rejects_steps_offset_past_the_end():
    with pytest.raises(ValueError, match="steps_offset"):
        schedulers.DDPMScheduler(steps_offset=1).set_timesteps(1000)


def test_ddpm_learned_needs_two_c_channels_and_noise():
    sched = schedulers.DDPMScheduler(variance_type="learned_range")
    x = parity.make_sample()
    state = sched.set_timesteps(4, like=x)
    with pytest.raises(ValueError, match="model_output"):
        sched.step(state, x, x, noise=x)
    with pytest.raises(ValueError, match="noise"):
        schedulers.DDPMScheduler().step(state, x, x)
