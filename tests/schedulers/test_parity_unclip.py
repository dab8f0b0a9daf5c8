"""UnCLIPScheduler parity against diffusers 0.42 as its unCLIP pipeline drives it (``prev_timestep`` passed).

diffusers' pipeline calls ``step(out, t, x, prev_timestep=timesteps[i + 1])`` (None on the last step); our
state holds the same ladder, so the references below run that loop with the same per-call noise.
"""

import sys

import numpy as np
import pytest

from diffusion_core import schedulers
from tests.schedulers import parity

NAME = "UnCLIPScheduler"

CASES = parity.grid(
    {"variance_type": ["fixed_small_log", "learned_range"], "prediction_type": ["epsilon", "sample"]},
    extras=[
        {"clip_sample": False},
        {"clip_sample": True, "clip_sample_range": 0.5, "variance_type": "learned_range"},
        {"num_train_timesteps": 64},  # a short training schedule: steps t -> t - 1 use the training beta
    ],
)
STEPS = (2, 3, 10, 25)


def model(xp, sample, t, variance_type):
    """parity.dummy_model's prediction, plus a [-1, 1] log-variance weight block for learned_range (2C channels)."""
    pred = parity.dummy_model(xp, sample, t)
    if variance_type != "learned_range":
        return pred
    return xp.concat([pred, 0.9 * xp.sin(2 * sample)], axis=1)  # (B, 2C, H, W)


def run_ours(config, n, backend, shape=parity.SHAPE):
    from diffusion_core.arrays import namespace

    sched = schedulers.from_config({"_class_name": NAME, **config})
    x = parity.to_backend(backend, parity.make_sample(shape))
    xp = namespace(x)
    state = sched.set_timesteps(n, like=x)
    calls = sched.noise_calls(state)
    for i in range(state.timesteps.shape[0]):
        out = model(xp, x, sched.current_timestep(state), sched.config["variance_type"])
        noise = parity.to_backend(backend, parity.make_noise(i, shape)) if calls[i] else None
        x, state = sched.step(state, out, x, noise=noise)
    return parity.to_numpy(x), parity.to_numpy(state.timesteps)


def run_reference(config, n, shape=parity.SHAPE):
    import diffusers
    import torch

    ref = diffusers.UnCLIPScheduler.from_config(config)
    ref.set_timesteps(n)
    module = sys.modules[type(ref).__module__]
    current = []
    original = parity._patch_randn(module, lambda: current[0].clone())
    variance_type = ref.config.variance_type
    try:
        x = torch.from_numpy(parity.make_sample(shape))
        for i, t in enumerate(ref.timesteps):
            current[:] = [torch.from_numpy(parity.make_noise(i, shape))]
            prev = None if i + 1 == len(ref.timesteps) else ref.timesteps[i + 1]
            out = model(parity._torch_xp(), x, t, variance_type)
            x = ref.step(out, t, x, prev_timestep=prev).prev_sample
    finally:
        module.randn_tensor = original
    return x.numpy(), ref.timesteps.numpy()


@parity.parametrize_cases(CASES, steps=STEPS)
def test_unclip_parity(config, num_steps, backend):
    ref_x, ref_t = run_reference(config, num_steps)
    assert np.all(np.isfinite(ref_x)) and np.linalg.norm(ref_x) > 1e-2 * np.linalg.norm(parity.make_sample())
    ours_x, ours_t = run_ours(config, num_steps, backend)
    np.testing.assert_array_equal(ours_t, ref_t)
    err = parity.rel_l2(ours_x, ref_x)
    assert err <= parity.REL_TOL, f"relative L2 {err:.3g} ({config}, n={num_steps}, {backend})"


@pytest.mark.parametrize("backend", parity.BACKENDS)
def test_unclip_prior_shaped_latents_parity(backend):
    """The prior denoises (B, D) embeddings, not images: the step works on 2-D samples."""
    config, shape = {"prediction_type": "sample"}, (2, 16)
    ref_x, _ = run_reference(config, 6, shape)
    err = parity.rel_l2(run_ours(config, 6, backend, shape)[0], ref_x)
    assert err <= parity.REL_TOL


@pytest.mark.parametrize("variance_type", ["fixed_small_log", "learned_range"])
def test_unclip_scan_matches_eager(variance_type):
    import jax
    import jax.numpy as jnp

    from diffusion_core.flax import denoise_loop

    sched = schedulers.UnCLIPScheduler(variance_type=variance_type)
    x0 = jnp.asarray(parity.make_sample())
    state = sched.set_timesteps(6, like=x0)
    noises = jnp.stack([jnp.asarray(parity.make_noise(i)) for i in range(6)])
    fn = lambda x, t: model(jnp, x, t, variance_type)  # noqa: E731
    run = jax.jit(lambda x, st, nz: denoise_loop(sched, fn, x, st, noise_fn=lambda i: nz[i]))
    jit_x, _ = run(x0, state, noises)
    np.testing.assert_allclose(np.asarray(jit_x), run_ours({"variance_type": variance_type}, 6, "jax")[0], atol=2e-5)


def test_unclip_noise_calls_every_step_but_the_last():
    state = schedulers.UnCLIPScheduler().set_timesteps(5)
    assert schedulers.UnCLIPScheduler().noise_calls(state).tolist() == [True, True, True, True, False]


@pytest.mark.parametrize(
    "config",
    [
        {"variance_type": "fixed_small"},
        {"prediction_type": "v_prediction"},
        {"beta_schedule": "linear"},
        {"num_train_timesteps": 0},
        {"clip_sample": "yes"},
    ],
)
def test_unclip_rejects_bad_config(config):
    with pytest.raises(ValueError, match=next(iter(config))):
        schedulers.UnCLIPScheduler(**config)


@pytest.mark.parametrize("n", [0, 1, 1001, 2.0])
def test_unclip_rejects_bad_step_counts(n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        schedulers.UnCLIPScheduler().set_timesteps(n)


def test_unclip_learned_range_needs_two_c_channels():
    sched = schedulers.UnCLIPScheduler(variance_type="learned_range")
    x = parity.make_sample()
    state = sched.set_timesteps(4, like=x)
    with pytest.raises(ValueError, match="model_output"):
        sched.step(state, x, x, noise=x)


@pytest.mark.parametrize("n", [2, 3, 25])
def test_unclip_posterior_coefficients_match_diffusers_float32(n):
    """The x_t weight of the posterior mean, step by step, equals diffusers' float32 one; on a long first step of
    the cosine schedule it is exactly 0 there (beta rounds to 1), where a float64 beta would keep ~1e-4 of x_t."""
    import diffusers
    import torch

    config = {"prediction_type": "sample", "clip_sample": False}
    ref = diffusers.UnCLIPScheduler(**config)
    ref.set_timesteps(n)
    state = schedulers.UnCLIPScheduler(**config).set_timesteps(n)
    module = sys.modules[type(ref).__module__]
    original = parity._patch_randn(module, lambda: torch.zeros(1, 1))
    try:
        ts = ref.timesteps
        expected = []
        for i, t in enumerate(ts):
            prev = None if i + 1 == len(ts) else ts[i + 1]
            out = ref.step(torch.zeros(1, 1), t, torch.ones(1, 1), prev_timestep=prev).prev_sample  # x0 = 0, x_t = 1
            expected.append(float(out))
    finally:
        module.randn_tensor = original
    np.testing.assert_allclose(np.asarray(state.x_coef, np.float64), expected, rtol=1e-6, atol=1e-12)
    if n <= 3:  # 999 -> 500 or 0: alpha_bar_999 / alpha_bar_prev < 2**-24
        assert expected[0] == 0.0 and float(state.x_coef[0]) == 0.0
