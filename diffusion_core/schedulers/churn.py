"""Stochastic churn of the Euler samplers (Karras et al. 2022, EDM, Alg. 2, lines 5-6), written once.

Euler and EDM Euler both raise a call's noise level sigma to sigma_hat = (1 + gamma) sigma
before their ODE step, with gamma = min(s_churn / (n - 1), sqrt(2) - 1) inside [s_tmin, s_tmax].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffusion_core import arrays
from diffusion_core.schedulers.base import host_values


class ChurnMixin:
    """Abstract mixin for a ``Scheduler`` whose state has ``sigmas`` (n + 1,) and ``timesteps`` (n,)."""

    def needs_noise_for(self, *, s_churn: float = 0.0, **_: Any) -> bool:
        return s_churn > 0

    def noise_calls(
        self, state: Any, *, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), **_: Any
    ) -> np.ndarray:
        """Churned calls only (sigma in [s_tmin, s_tmax]): diffusers draws where gamma > 0."""
        sigmas = host_values(state.sigmas)[: state.timesteps.shape[0]]
        return (s_churn > 0) & (sigmas >= s_tmin) & (sigmas <= s_tmax)

    def _churn(self, state: Any, sample, noise, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float):
        """``(sample + s_noise sqrt(sigma_hat^2 - sigma^2) noise, g)`` with sigma_hat = (1 + g) sigma, g a 0-d array.

        g is gamma inside [s_tmin, s_tmax], else 0; there ``noise=None`` is accepted (``noise_calls`` is False).
        """
        xp = arrays.namespace(sample)
        sigma = state.sigmas[state.step_index]
        gamma = min(s_churn / (state.sigmas.shape[0] - 1), 2**0.5 - 1)
        g = gamma * xp.astype((sigma >= s_tmin) & (sigma <= s_tmax), sigma.dtype)  # () gamma or 0
        if self._noise_unless_unused(noise, g, "s_churn > 0") is not None:
            sample = sample + noise * (s_noise * sigma * xp.sqrt(g * (g + 2)))  # sqrt(sigma_hat^2 - sigma^2)
        return sample, g
