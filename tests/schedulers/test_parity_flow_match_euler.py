"""Flow-matching Euler parity against diffusers 0.42: shifts, ladders, dynamic mu, custom schedules, noise."""

import numpy as np
import pytest
import torch

from diffusion_core import schedulers
from tests.schedulers import parity

NAME = "FlowMatchEulerDiscreteScheduler"
LADDERS = [{"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}]

CASES = parity.grid(
    {"shift": [1.0, 3.0], "invert_sigmas": [False, True], "stochastic_sampling": [False, True]},
    extras=[
        *({**ladder, "shift": 3.0} for ladder in LADDERS),
        *({**ladder, "invert_sigmas": True} for ladder in LADDERS),
        {"use_karras_sigmas": True, "stochastic_sampling": True},
        {"num_train_timesteps": 777, "shift": 7.3},
        {"num_train_timesteps": 20, "shift": 2.0},  # 50 steps > num_train_timesteps is fine here
    ],
)
# shift_terminal divides by 1 - (last sigma), which is 0 for a 1-step schedule (diffusers gives NaN)
TERMINAL_CASES = [
    {"shift": 3.0, "shift_terminal": 0.1},
    {"shift_terminal": 0.02, "use_karras_sigmas": True},
    {"shift": 3.0, "shift_terminal": 0.1, "stochastic_sampling": True},
]
# use_dynamic_shifting: set_timesteps needs mu (Flux computes it from the image size)
DYNAMIC = [
    ({"use_dynamic_shifting": True}, 0.8),
    ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 1.5),
    ({"use_dynamic_shifting": True, "use_exponential_sigmas": True}, 1.15),
    ({"use_dynamic_shifting": True, "shift_terminal": 0.05, "stochastic_sampling": True}, 0.5),
    ({"use_dynamic_shifting": True, "invert_sigmas": True, "time_shift_type": "linear"}, 0.7),
]


@parity.parametrize_cases(CASES)
def test_flow_match_euler_parity(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


@parity.parametrize_cases(TERMINAL_CASES, steps=(2, 10, 50))
def test_flow_match_euler_shift_terminal_parity(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


@parity.parametrize_cases([c for c, _ in DYNAMIC], steps=(1, 2, 10) + (50,))
def test_flow_match_euler_dynamic_shift_parity(config, num_steps, backend):
    if config.get("shift_terminal") and num_steps == 1:
        pytest.skip("shift_terminal needs >= 2 steps (diffusers gives NaN)")
    mu = next(m for c, m in DYNAMIC if c == config)
    parity.check_parity(NAME, config, num_steps, backend, custom={"mu": mu})


SIGMAS = [1.0, 0.8, 0.55, 0.3, 0.1]
CUSTOM = [
    ({}, {"sigmas": SIGMAS}),
    ({"shift": 3.0}, {"sigmas": SIGMAS}),
    ({"shift": 3.0, "use_karras_sigmas": True}, {"sigmas": SIGMAS}),
    ({"invert_sigmas": True}, {"sigmas": SIGMAS}),
    ({"shift": 3.0}, {"timesteps": [1000.0, 750.0, 400.0, 120.0]}),
    ({}, {"timesteps": [950.0, 700.0, 420.0, 100.0], "sigmas": [0.9, 0.66, 0.4, 0.12]}),
    ({"use_dynamic_shifting": True}, {"sigmas": SIGMAS, "mu": 1.1}),
    ({"stochastic_sampling": True, "shift": 2.0}, {"sigmas": SIGMAS}),
]


@pytest.mark.parametrize("backend", parity.BACKENDS)
@pytest.mark.parametrize("config,custom", CUSTOM, ids=[f"{parity.case_id(c)}-{sorted(k)}" for c, k in CUSTOM])
def test_flow_match_euler_custom_schedule_parity(config, custom, backend):
    parity.check_parity(NAME, config, None, backend, custom=custom)


@pytest.mark.parametrize("backend", parity.BACKENDS)
def test_add_noise_is_diffusers_scale_noise(backend):
    import diffusers

    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(6)
    x0, noise = parity.make_sample(), parity.make_noise(0)
    t = ref.timesteps[[0, 3]]
    expected = ref.scale_noise(torch.from_numpy(x0), t, torch.from_numpy(noise)).numpy()
    sched = schedulers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0b, noiseb = parity.to_backend(backend, x0), parity.to_backend(backend, noise)
    state = sched.set_timesteps(6, like=x0b)
    for got in (
        sched.add_noise(x0b, noiseb, t.numpy(), state=state),
        sched.add_noise(x0b, noiseb, t.numpy()),
        sched.scale_noise(x0b, t.numpy(), noiseb, state=state),
    ):
        np.testing.assert_allclose(parity.to_numpy(got), expected, rtol=1e-5, atol=1e-6)


def test_dynamic_shift_mu_is_flux_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = schedulers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.4, max_shift=1.3)
    for seq_len in (256, 1024, 4096, 6000):
        assert sched.dynamic_shift_mu(seq_len) == pytest.approx(calculate_shift(seq_len, 256, 4096, 0.4, 1.3))


def test_needs_noise_follows_stochastic_sampling():
    assert not schedulers.FlowMatchEulerDiscreteScheduler().needs_noise_for()
    sched = schedulers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    assert sched.needs_noise and sched.needs_noise_for()
    state = sched.set_timesteps(3, like=parity.make_sample())
    with pytest.raises(ValueError, match="noise"):
        sched.step(state, parity.make_sample(), parity.make_sample())


@pytest.mark.parametrize(
    "config,match",
    [
        ({"time_shift_type": "cosine"}, "time_shift_type"),
        ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "mutually exclusive"),
        ({"shift": 0.0}, "shift"),
        ({"shift_terminal": 1.5}, "shift_terminal"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ],
)
def test_flow_match_euler_rejects_invalid_config(config, match):
    with pytest.raises(ValueError, match=match):
        schedulers.FlowMatchEulerDiscreteScheduler(**config)


@pytest.mark.parametrize(
    "config,kwargs,match",
    [
        ({"use_dynamic_shifting": True}, {"num_inference_steps": 10}, "mu"),
        ({}, {"timesteps": [900.0, 500.0], "sigmas": [0.9, 0.5, 0.1]}, "same length"),
        ({}, {"num_inference_steps": 4, "sigmas": [0.9, 0.5, 0.1]}, "num_inference_steps"),
        ({"shift_terminal": 0.1}, {"num_inference_steps": 1}, "shift_terminal"),
        ({}, {"num_inference_steps": 0}, "num_inference_steps"),
    ],
)
def test_flow_match_euler_rejects_invalid_schedule(config, kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedulers.FlowMatchEulerDiscreteScheduler(**config).set_timesteps(like=parity.make_sample(), **kwargs)
