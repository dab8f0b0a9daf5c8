"""The dtype table: float16 / bfloat16 / float32 / float64 latents on numpy, torch and jax.

For every VP scheduler, sampling the demo's Gaussian mixture (exact noise predictor) with latents of a
given dtype keeps the state and the output in that dtype, the schedule tables are the float64 host
tables rounded once to it, and the samples stay close to the float64 run.

Accuracy bound: the 90th percentile of |x - x_float64| is at most 20 eps(dtype) (samples are O(2)). The
percentile, not the max: a point near the boundary between the two modes may land in the other mode
after any rounding, which says nothing about the scheduler. Measured worst cases over all schedulers and
backends (10 steps): float64 4.4e-16 (bound 4.4e-15), float32 7.2e-7 (2.4e-6), float16 5.3e-3 (2.0e-2),
bfloat16 5.1e-2 (1.6e-1).
numpy has no bfloat16 of its own (ml_dtypes' lacks ufuncs such as clip); jax has float64 only with x64 on.
"""

import numpy as np
import pytest

from diffusion_core import schedulers
from diffusion_core.demo import SD_SCHEDULE, VP_SCHEDULERS, mixture_eps_model

STEPS = 10
SLACK = 20  # in units of eps(dtype)


def _dtypes(backend):
    if backend == "numpy":
        return {"float16": np.float16, "float32": np.float32, "float64": np.float64}
    if backend == "torch":
        torch = pytest.importorskip("torch")
        names = ("float16", "bfloat16", "float32", "float64")
        return {n: getattr(torch, n) for n in names}
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    table = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}
    if jax.config.jax_enable_x64:
        table["float64"] = jnp.float64
    return table


CASES = [
    (backend, dtype)
    for backend, dtypes in (
        ("numpy", ("float16", "float32", "float64")),
        ("torch", ("float16", "bfloat16", "float32", "float64")),
        ("jax", ("float16", "bfloat16", "float32", "float64")),
    )
    for dtype in dtypes
]


def _to(backend, x, dtype):
    if backend == "numpy":
        return x.astype(dtype)
    if backend == "torch":
        import torch

        return torch.from_numpy(x).to(dtype)
    import jax.numpy as jnp

    return jnp.asarray(x, dtype=dtype)


def _host(a):
    """Any array as float64 numpy (which holds every float16 / bfloat16 / float32 value exactly)."""
    if hasattr(a, "detach"):
        return a.detach().double().numpy()
    return np.asarray(a).astype(np.float64)


def _is_float(a):
    if hasattr(a, "detach"):
        return a.dtype.is_floating_point
    return np.issubdtype(np.asarray(a).dtype, np.floating) or "bfloat16" in str(a.dtype)


def _float_leaves(state):
    """(name, array) for every floating array of a state (tuple fields, e.g. PNDM's slots, element-wise)."""
    for field, value in state._asdict().items():
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, leaf in items:
            if _is_float(leaf):
                yield (field if i is None else f"{field}[{i}]"), leaf


def _sample(sched, x, noise):
    model = mixture_eps_model(sched.alphas_cumprod)
    state = sched.set_timesteps(STEPS, like=x)
    fresh = state
    x = x * state.init_noise_sigma
    for i in range(state.timesteps.shape[0]):
        out = model(sched.scale_model_input(state, x), sched.current_timestep(state))
        x, state = sched.step(state, out, x, noise=noise[i] if sched.needs_noise else None)
    return x, fresh, state


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # demo model, float16
@pytest.mark.parametrize("backend, dtype_name", CASES, ids=[f"{b}-{d}" for b, d in CASES])
@pytest.mark.parametrize("name", VP_SCHEDULERS)
def test_state_and_output_follow_the_latents_dtype_and_stay_accurate(name, backend, dtype_name):
    dtypes = _dtypes(backend)
    if dtype_name not in dtypes:
        pytest.skip(f"{backend} has no {dtype_name} here")
    dtype = dtypes[dtype_name]
    sched = schedulers.from_config({"_class_name": name, **SD_SCHEDULE})
    rng = np.random.default_rng(0)
    x64, noise64 = rng.standard_normal((64, 2)), rng.standard_normal((2 * STEPS, 64, 2))
    want, want_fresh, _ = _sample(sched, x64, noise64)
    got, fresh, last = _sample(sched, _to(backend, x64, dtype), [_to(backend, n, dtype) for n in noise64])

    assert got.dtype == dtype
    eps = float(np.finfo(np.float16 if dtype_name == "float16" else np.float32).eps)
    eps = {"bfloat16": 2.0**-7, "float64": float(np.finfo(np.float64).eps)}.get(dtype_name, eps)
    for field, value in _float_leaves(last):
        assert value.dtype == dtype, f"state.{field} is {value.dtype}, latents are {dtype_name}"
    # tables: the float64 host values rounded once (at most half an ulp, plus the smallest normal for tiny values)
    tiny = {"float16": 6.1e-5, "bfloat16": 1.2e-38, "float32": 1.2e-38, "float64": 2.3e-308}[dtype_name]
    for (field, value), (_, ref) in zip(_float_leaves(fresh), _float_leaves(want_fresh), strict=True):
        ref = _host(ref)
        err = np.abs(_host(value) - ref)
        assert np.all(err <= eps / 2 * np.abs(ref) + tiny), f"state.{field}: off by {err.max():.2e}"
    p90 = float(np.quantile(np.abs(_host(got) - want), 0.9))
    assert p90 <= SLACK * eps, f"{name} {backend} {dtype_name}: p90 error {p90:.2e} > {SLACK} eps"
