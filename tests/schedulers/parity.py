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


def run_ours(name: str, config: Mapping[str, Any], n: int, backend: str, step_kwargs=None, custom=None):
    """Final sample and timesteps from our scheduler on ``backend`` arrays."""
    from diffusion_core.arrays import namespace

    step_kwargs = dict(step_kwargs or {})
    sched = schedulers.from_config({"_class_name": name, **config})
    x = to_backend(backend, make_sample())
    xp = namespace(x)
    state = sched.set_timesteps(None if custom else n, like=x, **(custom or {}))
    x = x * state.init_noise_sigma
    wants_noise = sched.needs_noise_for(**step_kwargs)
    for i in range(state.timesteps.shape[0]):
        t = sched.current_timestep(state)
        out = dummy_model(xp, sched.scale_model_input(state, x), t)
        noise = to_backend(backend, make_noise(i)) if wants_noise else None
        x, state = sched.step(state, out, x, noise=noise, **step_kwargs)
    return to_numpy(x), to_numpy(state.timesteps)


def _patch_randn(module, supplier):
    original = getattr(module, "randn_tensor", None)
    if original is not None:
        module.randn_tensor = lambda *a, **k: supplier()
    return original


def run_reference(name: str, config: Mapping[str, Any], n: int, step_kwargs=None, custom=None):
    """Final sample and timesteps from diffusers 0.42 on torch float32."""
    import diffusers
    import torch

    step_kwargs = dict(step_kwargs or {})
    ref = getattr(diffusers, name).from_config(dict(config))
    if custom:
        ref.set_timesteps(**custom)
    else:
        ref.set_timesteps(n)
    module = sys.modules[type(ref).__module__]
    current: list[torch.Tensor] = []
    original = _patch_randn(module, lambda: current[0].clone())
    try:
        x = torch.from_numpy(make_sample()) * ref.init_noise_sigma
        for i, t in enumerate(ref.timesteps):
            current[:] = [torch.from_numpy(make_noise(i))]
            out = dummy_model(_torch_xp(), ref.scale_model_input(x, t), t)
            x = ref.step(out, t, x, **step_kwargs).prev_sample
    finally:
        if original is not None:
            module.randn_tensor = original
    return x.numpy(), ref.timesteps.numpy()


def _torch_xp():
    import array_api_compat.torch as xp

    return xp


@functools.lru_cache(maxsize=None)
def _reference_cached(name: str, config_json: str, n: int, kwargs_json: str, custom_json: str):
    custom = json.loads(custom_json)
    return run_reference(name, json.loads(config_json), n, json.loads(kwargs_json), custom or None)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-12))


def check_parity(name: str, config: Mapping[str, Any], n: int, backend: str, step_kwargs=None, custom=None):
    """Assert our final sample is within REL_TOL of diffusers' and the timesteps agree."""
    step_kwargs = dict(step_kwargs or {})
    ref_x, ref_t = _reference_cached(
        name, json.dumps(config, sort_keys=True), n, json.dumps(step_kwargs, sort_keys=True),
        json.dumps(custom or {}, sort_keys=True),
    )
    assert np.all(np.isfinite(ref_x)), f"reference produced non-finite values for {name} {config}"
    # a near-zero reference would make the relative check vacuous: fix the case instead
    assert np.linalg.norm(ref_x) > 1e-2 * np.linalg.norm(make_sample()), f"degenerate reference for {config}"
    ours_x, ours_t = run_ours(name, config, n, backend, step_kwargs, custom)
    np.testing.assert_allclose(ours_t.astype(np.float64), ref_t.astype(np.float64), rtol=1e-6, atol=1e-4)
    err = rel_l2(ours_x, ref_x)
    assert err <= REL_TOL, f"relative L2 {err:.3g} > {REL_TOL} ({name}, {config}, n={n}, {backend})"


def grid(axes: Mapping[str, Iterable[Any]], extras: Iterable[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """The cartesian product of ``axes`` plus each of ``extras`` (applied on top of defaults)."""
    keys = list(axes)
    cases = [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]
    cases += [dict(e) for e in extras]
    return cases


def case_id(config: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(config.items())) or "defaults"


def parametrize_cases(cases: list[Mapping[str, Any]], steps=STEP_COUNTS, backends=BACKENDS):
    """pytest parametrisation over (config, num_inference_steps, backend)."""
    params = [
        pytest.param(c, n, b, id=f"{case_id(c)}-n{n}-{b}") for c in cases for n in steps for b in backends
    ]
    return pytest.mark.parametrize("config,num_steps,backend", params)
