"""add_noise / get_velocity / scale_model_input against diffusers, and across array backends."""

import diffusers
import numpy as np
import pytest
import torch

from diffusion_core import schedulers
from diffusion_core.schedulers.base import AlphaScheduler
from diffusion_core.schedulers.sigma_base import SigmaScheduler
from tests.schedulers import parity

NAMES = [cls.__name__ for cls in schedulers.all_scheduler_classes()]
CONFIGS = [{}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}]
NUM_STEPS = 8
COSINE_ONLY = {"UnCLIPScheduler"}  # accepts beta_schedule="squaredcos_cap_v2" only, as in diffusers


def _pair(name, config):
    ours = schedulers.from_config({"_class_name": name, **config})
    ref = getattr(diffusers, name).from_config(dict(config))
    return ours, ref


# VP multistep solvers whose diffusers add_noise looks the level up in the inference schedule
# (before set_timesteps it indexes a reversed table: a diffusers quirk we do not reproduce)
SCHEDULE_LOOKUP = {
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
}


def _needs_schedule(ours) -> bool:
    """Sigma-space schedulers (and non-VP ones) look noise levels up in the inference schedule."""
    return (
        isinstance(ours, SigmaScheduler)
        or not isinstance(ours, AlphaScheduler)
        or type(ours).__name__ in SCHEDULE_LOOKUP
    )


def _ref_add_noise(ref, x0, noise, t):
    if hasattr(ref, "add_noise"):
        return ref.add_noise(x0, noise, t)
    return ref.scale_noise(x0, t, noise)  # flow matching's name for it


@pytest.mark.parametrize("config", CONFIGS, ids=["linear", "scaled_linear"])
@pytest.mark.parametrize("name", NAMES)
def test_add_noise_matches_diffusers(name, config):
    if name in COSINE_ONLY and config:
        with pytest.raises(ValueError, match="beta_schedule"):  # diffusers rejects it too
            _pair(name, config)
        return
    ours, ref = _pair(name, config)
    x0 = parity.make_sample()
    noise = parity.make_noise(0)
    state = None
    if _needs_schedule(ours):
        ref.set_timesteps(NUM_STEPS)
        state = ours.set_timesteps(NUM_STEPS, like=x0)
        t = ref.timesteps[[0, 3]]  # one timestep per batch item, from the schedule
    else:
        t = torch.tensor([999, 250])
    expected = _ref_add_noise(ref, torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
    got = ours.add_noise(x0, noise, t.numpy(), state=state)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# diffusers' Euler get_velocity indexes alphas_cumprod by schedule position, not by timestep
# (and rejects integer timesteps): we keep alpha_bar[t] there and compare the VP classes only
VELOCITY_EXCLUDED = {"EulerDiscreteScheduler"}


@pytest.mark.parametrize(
    "name", [n for n in NAMES if hasattr(getattr(diffusers, n), "get_velocity") and n not in VELOCITY_EXCLUDED]
)
def test_get_velocity_matches_diffusers(name):
    ours, ref = _pair(name, {})
    x0, noise = parity.make_sample(), parity.make_noise(1)
    t = torch.tensor([10, 700])
    expected = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
    np.testing.assert_allclose(ours.get_velocity(x0, noise, t.numpy()), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_scale_model_input_and_init_noise_sigma_match_diffusers(name):
    ours, ref = _pair(name, {})
    x = parity.make_sample()
    ref.set_timesteps(NUM_STEPS)
    state = ours.set_timesteps(NUM_STEPS, like=x)
    # flow matching has neither in diffusers: it starts from unit noise and feeds x unscaled
    ref_sigma = getattr(ref, "init_noise_sigma", 1.0)
    np.testing.assert_allclose(float(state.init_noise_sigma), float(ref_sigma), rtol=1e-6)
    t0 = ref.timesteps[0]
    scale = getattr(ref, "scale_model_input", lambda sample, t: sample)
    expected = scale(torch.from_numpy(x), t0).numpy()
    np.testing.assert_allclose(ours.scale_model_input(state, x), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_agrees_across_numpy_torch_jax(name):
    ours = schedulers.from_config({"_class_name": name})
    x0, noise = parity.make_sample(), parity.make_noise(2)
    results = []
    for backend in parity.BACKENDS:
        x0_b, noise_b = parity.to_backend(backend, x0), parity.to_backend(backend, noise)
        state = ours.set_timesteps(NUM_STEPS, like=x0_b) if _needs_schedule(ours) else None
        t = parity.to_numpy(state.timesteps)[[1, 4]] if state is not None else np.array([5, 600])
        results.append(parity.to_numpy(ours.add_noise(x0_b, noise_b, t, state=state)))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(results[2], results[0], rtol=1e-6, atol=1e-6)
