"""noise_calls(state, **step_kwargs): exactly the model calls at which diffusers' step draws noise.

Checked two ways: by recording diffusers' ``randn_tensor`` calls, and end to end by sharing one
torch generator stream (diffusers draws inside ``step``; our loop draws only where noise_calls
is True and passes ``noise=None`` elsewhere), from the first call and from a later begin index.
"""

from __future__ import annotations

import inspect
import sys

import numpy as np
import pytest

from diffusion_core import schedulers
from tests.schedulers.parity import dummy_model, make_noise, make_sample, reference_scheduler, rel_l2, to_backend

CHURN = {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 5.0}  # churns only part of the schedule
CASES = [
    ("DDPMScheduler", {}, {}),
    ("DDPMScheduler", {"timestep_spacing": "trailing"}, {}),
    ("DDIMScheduler", {}, {}),
    ("DDIMScheduler", {}, {"eta": 0.5}),
    ("PNDMScheduler", {"skip_prk_steps": True}, {}),
    ("LMSDiscreteScheduler", {}, {}),
    ("EulerDiscreteScheduler", {}, {}),
    ("EulerDiscreteScheduler", {}, CHURN),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("HeunDiscreteScheduler", {}, {}),
    ("KDPM2DiscreteScheduler", {}, {}),
    ("KDPM2AncestralDiscreteScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("UniPCMultistepScheduler", {}, {}),
    ("DEISMultistepScheduler", {}, {}),
    ("LCMScheduler", {}, {}),
    ("EDMEulerScheduler", {}, {}),
    ("EDMEulerScheduler", {}, CHURN),
    ("FlowMatchEulerDiscreteScheduler", {}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, {}),
]
N = 8


def _ids():
    return [f"{name}-{cfg}-{kw}" for name, cfg, kw in CASES]


def _ours(name, config):
    return schedulers.from_config({"_class_name": name, **config})


def _reference_draws(name, config, n, step_kwargs) -> np.ndarray:
    """(num_calls,) bool: the calls at which diffusers' step called randn_tensor."""
    ref = reference_scheduler(name, config)
    ref.set_timesteps(n)
    module = sys.modules[type(ref).__module__]
    drawn: list[int] = []
    current = [0]
    original = module.__dict__.get("randn_tensor")
    if original is not None:
        module.randn_tensor = lambda *a, **k: (drawn.append(current[0]), _torch_noise(current[0]))[1]
    try:
        import torch

        x = torch.from_numpy(make_sample()) * getattr(ref, "init_noise_sigma", 1.0)
        for i, t in enumerate(ref.timesteps):
            current[0] = i
            model_input = ref.scale_model_input(x, t) if hasattr(ref, "scale_model_input") else x
            x = ref.step(dummy_model(_torch_xp(), model_input, t), t, x, **step_kwargs).prev_sample
    finally:
        if original is not None:
            module.randn_tensor = original
    mask = np.zeros(len(ref.timesteps), dtype=bool)
    mask[drawn] = True
    assert len(drawn) == mask.sum(), "diffusers drew twice in one call"
    return mask


def _torch_noise(i):
    import torch

    return torch.from_numpy(make_noise(i))


def _torch_xp():
    import array_api_compat.torch as xp

    return xp


@pytest.mark.parametrize("name,config,step_kwargs", CASES, ids=_ids())
def test_noise_calls_match_diffusers_draws(name, config, step_kwargs):
    sched = _ours(name, config)
    state = sched.set_timesteps(N, like=make_sample())
    ours = sched.noise_calls(state, **step_kwargs)
    assert ours.dtype == np.bool_ and ours.shape == (state.timesteps.shape[0],)
    np.testing.assert_array_equal(ours, _reference_draws(name, config, N, step_kwargs))


def test_noise_calls_cases_are_not_trivial():
    """The cases include schedulers that draw on some calls only."""
    partial = []
    for name, config, kwargs in CASES:
        sched = _ours(name, config)
        calls = sched.noise_calls(sched.set_timesteps(N, like=make_sample()), **kwargs)
        if 0 < calls.sum() < calls.size:
            partial.append(name)
    assert {"DDPMScheduler", "KDPM2AncestralDiscreteScheduler", "LCMScheduler", "EulerDiscreteScheduler"} <= set(
        partial
    )


def _run_generator_ours(name, config, n, step_kwargs, begin, seed, every_call=False):
    import torch

    sched = _ours(name, config)
    x = to_backend("torch", make_sample())
    state = sched.set_timesteps(n, like=x, **({"begin_index": begin} if begin else {}))
    x = x * state.init_noise_sigma
    draws = sched.noise_calls(state, **step_kwargs)
    if every_call:  # the old loop: a draw at every call whenever the scheduler uses noise at all
        draws = np.full(draws.shape, sched.needs_noise_for(**step_kwargs))
    gen = torch.Generator().manual_seed(seed)
    for i in range(begin, state.timesteps.shape[0]):
        out = dummy_model(_torch_xp(), sched.scale_model_input(state, x), sched.current_timestep(state))
        noise = torch.randn(tuple(x.shape), generator=gen, dtype=x.dtype) if draws[i] else None
        x, state = sched.step(state, out, x, noise=noise, **step_kwargs)
    return x.numpy()


def _run_generator_reference(name, config, n, step_kwargs, begin, seed):
    import torch

    ref = reference_scheduler(name, config)
    ref.set_timesteps(n)
    if begin and hasattr(ref, "set_begin_index"):
        ref.set_begin_index(begin)
    gen = torch.Generator().manual_seed(seed)
    takes_generator = "generator" in inspect.signature(ref.step).parameters
    extra = {"generator": gen} if takes_generator else {}
    x = torch.from_numpy(make_sample()) * getattr(ref, "init_noise_sigma", 1.0)
    for t in ref.timesteps[begin:]:
        model_input = ref.scale_model_input(x, t) if hasattr(ref, "scale_model_input") else x
        x = ref.step(dummy_model(_torch_xp(), model_input, t), t, x, **step_kwargs, **extra).prev_sample
    return x.numpy()


@pytest.mark.parametrize("begin", [0, 2])
@pytest.mark.parametrize("name,config,step_kwargs", CASES, ids=_ids())
def test_shared_generator_stream_matches_diffusers(name, config, step_kwargs, begin):
    ref = _run_generator_reference(name, config, N, step_kwargs, begin, seed=7)
    err = rel_l2(_run_generator_ours(name, config, N, step_kwargs, begin, seed=7), ref)
    assert err <= 1e-4, f"relative L2 {err:.3g} ({name}, {config}, {step_kwargs}, begin={begin})"


def test_drawing_at_every_call_diverges():
    """Why noise_calls exists: KDPM2 ancestral draws at its second-stage calls only, so a draw at
    every call shifts the stream. (DDPM and LCM skip only their last call: no later draw moves.)"""
    name = "KDPM2AncestralDiscreteScheduler"
    ref = _run_generator_reference(name, {}, N, {}, 0, seed=7)
    assert rel_l2(_run_generator_ours(name, {}, N, {}, 0, seed=7, every_call=True), ref) > 1e-2


@pytest.mark.parametrize(
    "name,step_kwargs",
    [
        ("DDPMScheduler", {}),
        ("LCMScheduler", {}),
        ("KDPM2AncestralDiscreteScheduler", {}),
        ("EulerDiscreteScheduler", CHURN),
        ("EDMEulerScheduler", CHURN),
    ],
)
def test_step_takes_none_exactly_where_no_draw(name, step_kwargs):
    sched = _ours(name, {})
    x = make_sample()
    state = sched.set_timesteps(N, like=x)
    calls = sched.noise_calls(state, **step_kwargs)
    for i in range(calls.size):
        st = state._replace(step_index=np.asarray(i, dtype=np.int32))
        if calls[i]:
            with pytest.raises(ValueError, match="noise"):
                sched.step(st, x, x, noise=None, **step_kwargs)
        else:
            prev, _ = sched.step(st, x, x, noise=None, **step_kwargs)
            drawn, _ = sched.step(st, x, x, noise=make_noise(i), **step_kwargs)
            np.testing.assert_array_equal(prev, drawn)  # the noise has zero weight there


def test_traced_step_still_requires_noise():
    import jax
    import jax.numpy as jnp

    sched = _ours("KDPM2AncestralDiscreteScheduler", {})
    x = jnp.asarray(make_sample())
    state = sched.set_timesteps(N, like=x)
    with pytest.raises(ValueError, match="noise"):
        jax.jit(lambda st, s: sched.step(st, s, s)[0])(state, x)
