"""The one place where host-side float64 numpy meets the caller's array framework.

Scheduler math is written against ``xp = namespace(x)`` (array-API: numpy, torch or jax,
eager or traced). Schedules are computed on the host in float64 and cast here, once.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np


def namespace(*arrays: Any) -> Any:
    """The array-API namespace shared by ``arrays`` (numpy, torch or jax.numpy)."""
    return array_api_compat.array_namespace(*arrays)


def _device(like: Any) -> Any:
    if array_api_compat.is_jax_array(like):
        return None  # jax places constants itself (and tracers have no single device)
    return array_api_compat.device(like)


def host_to_like(values: Any, like: Any, *, integer: bool = False) -> Any:
    """Cast host values to ``like``'s framework, device and float dtype (or its default int).

    ``like=None`` means numpy float32.
    """
    arr = np.asarray(values)
    if like is None:
        return arr.astype(np.int64 if integer else np.float32)
    xp = namespace(like)
    if integer:
        return xp.asarray(arr.astype(np.int64), device=_device(like))
    return xp.asarray(arr.astype(np.float64), dtype=like.dtype, device=_device(like))


def host_mask_like(values: Any, like: Any) -> Any:
    """Cast host booleans to a bool array in ``like``'s framework and device (per-step flags for ``xp.where``)."""
    arr = np.asarray(values, dtype=bool)
    if like is None:
        return arr
    return namespace(like).asarray(arr, device=_device(like))


def counter_like(like: Any, value: int = 0) -> Any:
    """A 0-d int32 step counter in ``like``'s framework."""
    if like is None:
        return np.asarray(value, dtype=np.int32)
    xp = namespace(like)
    return xp.asarray(value, dtype=xp.int32, device=_device(like))


def zeros_like_shape(like: Any, leading: tuple[int, ...] = ()) -> Any:
    """Zeros of shape ``leading + like.shape`` and ``like``'s dtype: fixed-size history buffers."""
    if like is None:
        raise ValueError("like: schedulers with history buffers need `like=` (an array shaped as the latents)")
    xp = namespace(like)
    return xp.zeros(leading + tuple(like.shape), dtype=like.dtype, device=_device(like))


def broadcast_left(values: Any, ndim: int) -> Any:
    """Reshape a (B,) or () array to (B, 1, ..., 1) so it broadcasts against an ndim-d sample."""
    xp = namespace(values)
    if values.ndim == 0:
        return values
    return xp.reshape(values, tuple(values.shape) + (1,) * (ndim - values.ndim))


def as_index_array(timesteps: Any, like: Any) -> Any:
    """Timesteps (int, list or array) as an array in ``like``'s framework, for table lookups."""
    if isinstance(timesteps, (int, float, np.integer, np.floating, list, tuple, np.ndarray)):
        return host_to_like(np.asarray(timesteps), like, integer=np.asarray(timesteps).dtype.kind in "iu")
    return timesteps


def quantile_last_axis(values: Any, q: float) -> Any:
    """Linear-interpolation quantile along the last axis (``torch.quantile``'s default rule)."""
    xp = namespace(values)
    n = values.shape[-1]
    sorted_vals = xp.sort(values, axis=-1)
    pos = q * (n - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_vals[..., lo] + (sorted_vals[..., hi] - sorted_vals[..., lo]) * frac


def interp_table(table: Any, t: Any, like: Any) -> Any:
    """Host table (T,) linearly interpolated at fractional indices ``t`` (clamped to [0, T-1]), in ``like``'s dtype.

    The index arithmetic runs in at least float32: bfloat16 cannot hold 999 (it rounds to 1000, out of
    the table) and float16 keeps only halves of a timestep above 512.
    """
    xp = namespace(like)
    work = like if xp.finfo(like.dtype).bits >= 32 else xp.astype(like, xp.float32)
    values = host_to_like(table, work)
    t = xp.astype(as_index_array(t, work), work.dtype)
    top = np.shape(table)[0] - 1
    lo = xp.clip(xp.floor(t), 0, top)
    hi = xp.clip(lo + 1, 0, top)
    w = t - lo
    out = values[xp.astype(lo, xp.int32)] * (1 - w) + values[xp.astype(hi, xp.int32)] * w
    return xp.astype(out, like.dtype)
