"""Ancestral KDPM2: DPM-Solver-2 to sigma_down, plus noise of std sigma_up (k-diffusion, sample_dpm_2_ancestral)."""

from __future__ import annotations

from typing import Any

import numpy as np

from diffusion_core.schedulers import sigma_base
from diffusion_core.schedulers.kdpm2 import KDPM2Base


class KDPM2AncestralDiscreteScheduler(KDPM2Base):
    """Stochastic DPM-Solver-2: midpoint sqrt(s_i sigma_down); the second call adds sigma_up * noise."""

    @property
    def needs_noise(self) -> bool:
        """The ancestral second stage re-noises with a fresh Gaussian draw."""
        return True

    def noise_calls(self, state, **_: Any) -> np.ndarray:
        """The second-stage calls (odd indices): diffusers draws only there."""
        return np.arange(state.timesteps.shape[0]) % 2 == 1

    def _stage_sigmas(self, sigmas):
        down, up = sigma_base.ancestral_sigmas(sigmas[:-1], sigmas[1:])
        return np.sqrt(sigmas[:-1] * down), down, up
