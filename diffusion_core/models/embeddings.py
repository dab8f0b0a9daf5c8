"""Sinusoidal timestep embedding (DDPM, Ho et al. 2020), written once for every backend.

The formula runs on numpy, torch or jax arrays (eager or traced) through the array-API
namespace of ``timesteps``; the frequencies are float32, as in diffusers.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np

from diffusion_core.arrays import namespace


def timestep_embedding(
    timesteps: Any,
    dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> Any:
    """Embed (B,) timesteps as (B, dim) float32 ``[sin | cos]`` features (``[cos | sin]`` if flipped).

    Frequency ``k`` is ``exp(-log(max_period) * k / (dim // 2 - downscale_freq_shift))``; an odd
    ``dim`` gets one trailing zero column.
    """
    if getattr(timesteps, "ndim", None) != 1:
        raise ValueError(f"timesteps: expected a 1-D array, got shape {tuple(np.shape(timesteps))}")
    xp = namespace(timesteps)
    device = None if array_api_compat.is_jax_array(timesteps) else array_api_compat.device(timesteps)
    half = dim // 2
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float32)  # (half,) float32
    exponent = xp.asarray(exponent / np.float32(half - downscale_freq_shift), device=device)
    freqs = xp.exp(exponent)  # (half,)
    args = scale * (xp.astype(timesteps, xp.float32)[:, None] * freqs[None, :])  # (B, half)
    parts = [xp.cos(args), xp.sin(args)] if flip_sin_to_cos else [xp.sin(args), xp.cos(args)]
    if dim % 2 == 1:
        parts.append(xp.zeros((timesteps.shape[0], 1), dtype=xp.float32, device=device))
    return xp.concat(parts, axis=-1)  # (B, dim)
