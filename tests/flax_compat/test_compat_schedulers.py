"""diffusion_core.flax.compat schedulers: 0.39-style loops equal the native loops (and diffusers 0.42's numbers)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_core import schedulers
from diffusion_core.flax import compat
from tests.schedulers.parity import _diffusers_test_sample, make_noise, reference_scheduler

SHAPE = (4, 3, 8, 8)
CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
CASES = [
    (compat.FlaxDDIMScheduler, {"clip_sample": True}),
    (compat.FlaxDDPMScheduler, {"variance_type": "fixed_small"}),
    (compat.FlaxPNDMScheduler, {}),
    (compat.FlaxPNDMScheduler, {"skip_prk_steps": True}),
    (compat.FlaxLMSDiscreteScheduler, {}),
    (compat.FlaxDPMSolverMultistepScheduler, {"solver_order": 2}),
    (compat.FlaxEulerDiscreteScheduler, {}),
]


def model(x, t):
    """diffusers' test dummy model: x * t / (t + 1)."""
    return x * t / (t + 1)


def loop_039(scheduler, state, sample, steps, jit=False):
    """The loop as 0.39 scripts wrote it: set_timesteps(state, n, shape), then scale / model / step per t."""
    state = scheduler.set_timesteps(state, steps, sample.shape)
    x = sample * state.init_noise_sigma
    key = jax.random.key(0)

    def body(i, carry):
        x, state, key = carry
        t = state.timesteps[i]
        key, step_key = jax.random.split(key)
        out = model(scheduler.scale_model_input(state, x, t), t)
        kw = {"key": step_key} if isinstance(scheduler, compat.FlaxDDPMScheduler) else {}  # only DDPM took a key
        x, state = scheduler.step(state, out, t, x, return_dict=False, **kw)
        return x, state, key

    if jit:
        x, state, _ = jax.jit(lambda c: jax.lax.fori_loop(0, len(state.timesteps), body, c))((x, state, key))
        return x
    carry = (x, state, key)
    for i in range(len(state.timesteps)):
        carry = body(i, carry)
    return carry[0]


def loop_native(cls, config, sample, steps):
    """The same run on the native scheduler, the noise drawn as FlaxDDPMScheduler draws it."""
    sched = schedulers.get_scheduler_class(cls._native_name)(**{**cls._flax_039_defaults, **config})
    state = sched.set_timesteps(steps, like=sample)
    x = sample * state.init_noise_sigma
    key = jax.random.key(0)
    for _ in range(state.timesteps.shape[0]):
        t = sched.current_timestep(state)
        key, step_key = jax.random.split(key)
        noise = None
        if sched.needs_noise:
            noise = jax.random.normal(jax.random.split(step_key, 1)[0], x.shape, x.dtype)
        x, state = sched.step(state, model(sched.scale_model_input(state, x), t), x, noise=noise)
    return x


@pytest.mark.parametrize("cls,extra", CASES, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(CASES)])
def test_039_loop_equals_native_loop(cls, extra):
    config = {**CONFIG, **extra}
    scheduler = cls(**config)
    sample = jnp.asarray(_diffusers_test_sample())
    ours = loop_039(scheduler, scheduler.create_state(), sample, 10)
    native = loop_native(cls, config, sample, 10)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(native), rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(ours)))


@pytest.mark.parametrize("cls,extra", [CASES[0], CASES[5], CASES[6]], ids=["ddim", "dpm", "euler"])
def test_loop_runs_inside_fori_loop(cls, extra):
    scheduler = cls(**CONFIG, **extra)
    sample = jnp.asarray(_diffusers_test_sample())
    eager = loop_039(scheduler, scheduler.create_state(), sample, 5)
    jitted = loop_039(scheduler, scheduler.create_state(), sample, 5, jit=True)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)


def test_ddim_full_loop_matches_039_expectation():
    """0.39's Flax DDIM test: 10 steps, clip_sample, sum 172.0067 / mean 0.223967."""
    scheduler = compat.FlaxDDIMScheduler(**CONFIG, clip_sample=True)
    x = loop_039(scheduler, scheduler.create_state(), jnp.asarray(_diffusers_test_sample()), 10)
    assert abs(float(jnp.sum(jnp.abs(x))) - 172.0067) < 1e-2
    assert abs(float(jnp.mean(jnp.abs(x))) - 0.223967) < 1e-3


def test_pndm_full_loop_matches_039_expectation():
    """0.39's Flax PNDM test: 10 steps (PRK then PLMS), sum 198.1318 / mean 0.2580."""
    scheduler = compat.FlaxPNDMScheduler(**CONFIG)
    x = loop_039(scheduler, scheduler.create_state(), jnp.asarray(_diffusers_test_sample()), 10)
    assert abs(float(jnp.sum(jnp.abs(x))) - 198.1318) < 1e-2
    assert abs(float(jnp.mean(jnp.abs(x))) - 0.2580) < 1e-3


@pytest.mark.parametrize(
    "cls,extra",
    [
        (compat.FlaxDDIMScheduler, {"clip_sample": False}),
        (compat.FlaxDPMSolverMultistepScheduler, {"solver_order": 2, "algorithm_type": "dpmsolver++"}),
    ],
    ids=["ddim", "dpm_multistep"],
)
def test_039_loop_matches_diffusers_042_torch(cls, extra):
    """The compat loop gives diffusers 0.42's PyTorch scheduler numbers on the same inputs."""
    import torch

    config = {**CONFIG, **extra}
    sample = make_noise(0, SHAPE)
    scheduler = cls(**config)
    ours = np.asarray(loop_039(scheduler, scheduler.create_state(), jnp.asarray(sample), 10))
    ref = reference_scheduler(cls._native_name, {**cls._flax_039_defaults, **config})  # 0.39 Flax: sigma_min end
    ref.set_timesteps(10)
    x = torch.from_numpy(sample)
    for t in ref.timesteps:
        x = ref.step(model(ref.scale_model_input(x, t), t), t, x).prev_sample
    np.testing.assert_allclose(ours, x.numpy(), rtol=1e-4, atol=1e-5)


def test_from_pretrained_returns_scheduler_and_state(tmp_path):
    folder = tmp_path / "scheduler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "FlaxDDIMScheduler", "_diffusers_version": "0.39.0", **CONFIG, "steps_offset": 1})
    )
    scheduler, state = compat.FlaxDDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert scheduler.config["steps_offset"] == 1
    state = scheduler.set_timesteps(state, 5, (1, 4, 8, 8))
    assert np.asarray(state.timesteps).tolist() == [801, 601, 401, 201, 1]
    assert state.num_inference_steps == 5
    scheduler.save_pretrained(tmp_path / "saved")
    again, _ = compat.FlaxDDIMScheduler.from_pretrained(tmp_path / "saved")
    assert again.config["steps_offset"] == 1
    assert json.loads((tmp_path / "saved" / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"


def test_add_noise_equals_native():
    scheduler = compat.FlaxDDIMScheduler(**CONFIG)
    state = scheduler.create_state()
    x0, noise = jnp.asarray(make_noise(1, SHAPE)), jnp.asarray(make_noise(2, SHAPE))
    t = jnp.asarray([10, 200, 500, 999])
    native = schedulers.DDIMScheduler(**CONFIG).add_noise(x0, noise, t)
    np.testing.assert_allclose(np.asarray(scheduler.add_noise(state, x0, noise, t)), np.asarray(native), rtol=1e-6)


def test_output_and_bad_inputs():
    scheduler = compat.FlaxEulerDiscreteScheduler(**CONFIG)
    state = scheduler.set_timesteps(scheduler.create_state(), 4, SHAPE)
    x = jnp.ones(SHAPE)
    out = scheduler.step(state, x, state.timesteps[0], x)
    assert isinstance(out, compat.FlaxSchedulerOutput) and out.prev_sample.shape == SHAPE
    assert int(out.state.native.step_index) == 1
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step(out.state, x, state.timesteps[0], x)
    with pytest.raises(ValueError, match="state"):
        scheduler.set_timesteps(None, 4, SHAPE)
    with pytest.raises(ValueError, match="dtype"):
        compat.FlaxDDIMScheduler(dtype=jnp.int32)
    with pytest.raises(ValueError, match="eta"):
        ddim = compat.FlaxDDIMScheduler(**CONFIG)
        ddim.step(ddim.set_timesteps(ddim.create_state(), 2, SHAPE), x, 500, x, eta=0.5)


def test_dpm_solver_ends_at_the_smallest_sigma_as_039():
    """0.39's Flax DPM-Solver had no final_sigmas_type: its last step went to the smallest training sigma."""
    assert compat.FlaxDPMSolverMultistepScheduler().config["final_sigmas_type"] == "sigma_min"
    assert compat.FlaxDPMSolverMultistepScheduler.from_config({}).config["final_sigmas_type"] == "sigma_min"
    assert compat.FlaxDPMSolverMultistepScheduler(final_sigmas_type="zero").config["final_sigmas_type"] == "zero"
