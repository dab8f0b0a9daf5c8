"""Scheduler parity harness: run one sampling loop here and in diffusers on identical inputs.

Both sides see the same deterministic sample, the same deterministic dummy model and the
same per-call Gaussian noise (diffusers' ``randn_tensor`` is patched to hand it out).
"""

from __future__ import annotations

import functools
import itertools
import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pytest

from diffusion_core import schedulers

SHAPE = (2, 3, 4, 4)  # (B, C, H, W): small, but batch > 1 and channels > 1 for thresholding
BACKENDS = ("numpy", "torch", "jax")
STEP_COUNTS = (1, 2, 10, 50)
REL_TOL = 1e-4


def make_sample(shape=SHAPE) -> np.ndarray:
    """diffusers' deterministic test sample pattern, centred: values in [-1, 1)."""
    n = int(np.prod(shape))
    return (np.arange(n, dtype=np.float64).reshape(shape) / n * 2 - 1).astype(np.float32)


def make_noise(i: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(1000 + i).standard_normal(shape).astype(np.float32)


def dummy_model(xp, sample, t):
    """A deterministic stand-in network: smooth in x and t, never vanishing, never cancelling.

    (diffusers' ``x * t / (t + 1)`` is exactly 0 at t=0, which makes "sample" prediction
    runs trivially 0 and v-prediction runs cancel to round-off.)
    """
    tf = xp.astype(xp.asarray(t), sample.dtype) if hasattr(t, "dtype") else xp.asarray(float(t), dtype=sample.dtype)
    return sample * (0.5 + 0.4 * tf / (tf + 1)) + 0.1 * xp.cos(3 * sample)


def to_backend(backend: str, x: np.ndarray):
    if backend == "numpy":
        return np.asarray(x)
    if backend == "torch":
        import torch

        return torch.from_numpy(np.array(x))
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(x)
    raise ValueError(backend)


def to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def run_ours(name: str, config: Mapping[str, Any], n: int, backend: str, step_kwargs=None, custom=None, begin=0):
    """Final sample and timesteps from our scheduler on ``backend`` arrays, run from model call ``begin``."""
    from diffusion_core.arrays import namespace

    step_kwargs = dict(step_kwargs or {})
    sched = schedulers.from_config({"_class_name": name, **config})
    x = to_backend(backend, make_sample())
    xp = namespace(x)
    extra = {"begin_index": begin} if begin else {}
    state = sched.set_timesteps(_steps_arg(n, custom), like=x, **(custom or {}), **extra)
    x = x * state.init_noise_sigma
    wants_noise = sched.needs_noise_for(**step_kwargs)
    for i in range(begin, state.timesteps.shape[0]):
        t = sched.current_timestep(state)
        out = dummy_model(xp, sched.scale_model_input(state, x), t)
        noise = to_backend(backend, make_noise(i)) if wants_noise else None
        x, state = sched.step(state, out, x, noise=noise, **step_kwargs)
    return to_numpy(x), to_numpy(state.timesteps)


def _steps_arg(n: int, custom) -> int | None:
    """num_inference_steps to pass with ``custom`` set_timesteps keywords: None when they give
    the schedule (timesteps/sigmas), else n (e.g. custom={"mu": 0.5} for dynamic shifting)."""
    if custom and ("timesteps" in custom or "sigmas" in custom):
        return None
    return n


def _patch_randn(module, supplier):
    original = getattr(module, "randn_tensor", None)
    if original is not None:
        module.randn_tensor = lambda *a, **k: supplier()
    return original


def reference_scheduler(name: str, config: Mapping[str, Any]):
    """A fresh diffusers scheduler: a copy of one cached per config (KDPM2's constructor alone
    runs a 1000-step set_timesteps with a per-sigma Python loop, ~1 s)."""
    import copy

    return copy.deepcopy(_pristine_reference(name, json.dumps(config, sort_keys=True)))


@functools.cache
def _pristine_reference(name: str, config_json: str):
    import diffusers

    return getattr(diffusers, name).from_config(json.loads(config_json))


def run_reference(name: str, config: Mapping[str, Any], n: int, step_kwargs=None, custom=None, begin=0):
    """Final sample and timesteps from diffusers 0.42 on torch float32, run from model call ``begin``.

    As diffusers' img2img pipelines: ``set_begin_index(begin)`` where the scheduler has it, then
    the loop over ``timesteps[begin:]`` (DDPM, DDIM, PNDM have no begin index: the slice alone).
    """
    import torch

    step_kwargs = dict(step_kwargs or {})
    ref = reference_scheduler(name, config)
    if custom:
        ref.set_timesteps(_steps_arg(n, custom), **custom)
    else:
        ref.set_timesteps(n)
    if begin and hasattr(ref, "set_begin_index"):
        ref.set_begin_index(begin)
    module = sys.modules[type(ref).__module__]
    current: list[torch.Tensor] = []
    original = _patch_randn(module, lambda: current[0].clone())
    try:
        # flow-matching schedulers have neither (their start scale is 1 and the input unscaled)
        x = torch.from_numpy(make_sample()) * getattr(ref, "init_noise_sigma", 1.0)
        for i in range(begin, len(ref.timesteps)):
            t = ref.timesteps[i]
            current[:] = [torch.from_numpy(make_noise(i))]
            model_input = ref.scale_model_input(x, t) if hasattr(ref, "scale_model_input") else x
            out = dummy_model(_torch_xp(), model_input, t)
            x = ref.step(out, t, x, **step_kwargs).prev_sample
    finally:
        if original is not None:
            module.randn_tensor = original
    return x.numpy(), ref.timesteps.numpy()


def _torch_xp():
    import array_api_compat.torch as xp

    return xp


@functools.cache
def _reference_cached(name: str, config_json: str, n: int, kwargs_json: str, custom_json: str, begin: int = 0):
    custom = json.loads(custom_json)
    return run_reference(name, json.loads(config_json), n, json.loads(kwargs_json), custom or None, begin)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-12))


def check_parity(name: str, config: Mapping[str, Any], n: int, backend: str, step_kwargs=None, custom=None, begin=0):
    """Assert our final sample is within REL_TOL of diffusers' and the timesteps agree (run from call ``begin``)."""
    step_kwargs = dict(step_kwargs or {})
    ref_x, ref_t = _reference_cached(
        name,
        json.dumps(config, sort_keys=True),
        n,
        json.dumps(step_kwargs, sort_keys=True),
        json.dumps(custom or {}, sort_keys=True),
        begin,
    )
    assert np.all(np.isfinite(ref_x)), f"reference produced non-finite values for {name} {config}"
    # a near-zero reference would make the relative check vacuous: fix the case instead
    assert np.linalg.norm(ref_x) > 1e-2 * np.linalg.norm(make_sample()), f"degenerate reference for {config}"
    ours_x, ours_t = run_ours(name, config, n, backend, step_kwargs, custom, begin)
    np.testing.assert_allclose(ours_t.astype(np.float64), ref_t.astype(np.float64), rtol=1e-6, atol=1e-4)
    err = rel_l2(ours_x, ref_x)
    assert err <= REL_TOL, f"relative L2 {err:.3g} > {REL_TOL} ({name}, {config}, n={n}, {backend}, begin={begin})"


def grid(axes: Mapping[str, Iterable[Any]], extras: Iterable[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """The cartesian product of ``axes`` plus each of ``extras`` (applied on top of defaults)."""
    keys = list(axes)
    cases = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(axes[k] for k in keys))]
    cases += [dict(e) for e in extras]
    return cases


def case_id(config: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(config.items())) or "defaults"


def parametrize_cases(cases: list[Mapping[str, Any]], steps=STEP_COUNTS, backends=BACKENDS):
    """pytest parametrisation over (config, num_inference_steps, backend)."""
    params = [pytest.param(c, n, b, id=f"{case_id(c)}-n{n}-{b}") for c in cases for n in steps for b in backends]
    return pytest.mark.parametrize("config,num_steps,backend", params)


# diffusers' own scheduler tests (tests/schedulers/test_scheduler_*.py): config, sample, model
DIFFUSERS_TEST_CONFIG = {"num_train_timesteps": 1100, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


def _diffusers_test_sample():
    """diffusers' ``dummy_sample_deter``: (4, 3, 8, 8) values in [0, 1)."""
    n = 4 * 3 * 8 * 8
    return (np.arange(n, dtype=np.float32).reshape(3, 8, 8, 4) / n).transpose(3, 0, 1, 2).copy()


def run_diffusers_full_loop(name, config, backend, num_steps=10, noise_seed=None):
    """diffusers' ``test_full_loop_no_noise`` with ``dummy_model`` x * t / (t + 1); returns sum and mean of |x|.

    (That loop feeds the *scaled* sample to ``step``, and so does this one.)

    Noise, where the step takes some, is torch's ``manual_seed(noise_seed)`` stream, drawn in
    the order diffusers draws it, so the published sums are reproducible on every backend.
    """
    import torch

    sched = schedulers.from_config({"_class_name": name, **config})
    x = to_backend(backend, _diffusers_test_sample())
    state = sched.set_timesteps(num_steps, like=x)
    x = x * state.init_noise_sigma
    gen = torch.manual_seed(noise_seed) if noise_seed is not None else None
    for _ in range(state.timesteps.shape[0]):
        t = sched.current_timestep(state)
        x = sched.scale_model_input(state, x)
        out = x * t / (t + 1)
        noise = None
        if gen is not None:
            noise = to_backend(backend, torch.randn(tuple(x.shape), generator=gen).numpy())
        x, state = sched.step(state, out, x, noise=noise)
    x = to_numpy(x).astype(np.float64)
    return float(np.sum(np.abs(x))), float(np.mean(np.abs(x)))


# ----- float64 oracle: where diffusers' own float32 rounding exceeds REL_TOL -----
def run_reference_float64(name: str, config: Mapping[str, Any], n: int, custom=None) -> np.ndarray:
    """diffusers' deterministic loop with its float32 tables (sigmas, alphas, ...) cast to float64
    after ``set_timesteps`` and a float64 sample: the same schedule, without float32 arithmetic."""
    import torch

    ref = reference_scheduler(name, config)
    ref.set_timesteps(_steps_arg(n, custom), **(custom or {}))
    for key, value in list(vars(ref).items()):
        if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
            setattr(ref, key, value.double())
    x = torch.from_numpy(make_sample().astype(np.float64)) * getattr(ref, "init_noise_sigma", 1.0)
    for t in ref.timesteps:
        model_input = ref.scale_model_input(x, t) if hasattr(ref, "scale_model_input") else x
        x = ref.step(dummy_model(_torch_xp(), model_input, t), t, x).prev_sample
    return x.numpy()


def run_ours_float64(name: str, config: Mapping[str, Any], n: int, backend: str, custom=None) -> np.ndarray:
    """Our deterministic loop on float64 ``backend`` arrays (numpy or torch)."""
    from diffusion_core.arrays import namespace

    sched = schedulers.from_config({"_class_name": name, **config})
    x = to_backend(backend, make_sample().astype(np.float64))
    xp = namespace(x)
    state = sched.set_timesteps(_steps_arg(n, custom), like=x, **(custom or {}))
    x = x * state.init_noise_sigma
    for _ in range(state.timesteps.shape[0]):
        out = dummy_model(xp, sched.scale_model_input(state, x), sched.current_timestep(state))
        x, state = sched.step(state, out, x)
    return to_numpy(x)


def check_parity_float64(name: str, config: Mapping[str, Any], n: int, backend: str, custom=None):
    """Assert our float64 run is within REL_TOL of diffusers' float64-table run.

    For cases whose float32 reference is dominated by diffusers' own rounding (cancellation in
    its coefficients or ill-conditioned steps): say so, with the measured error, where used.
    """
    ref_x = run_reference_float64(name, config, n, custom)
    assert np.all(np.isfinite(ref_x)), f"reference produced non-finite values for {name} {config}"
    err = rel_l2(run_ours_float64(name, config, n, backend, custom), ref_x)
    assert err <= REL_TOL, f"relative L2 {err:.3g} > {REL_TOL} ({name}, {config}, n={n}, {backend}, float64)"
