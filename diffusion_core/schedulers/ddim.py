"""DDIM: denoising diffusion implicit models (Song et al. 2021, arXiv 2010.02502, eq. 12)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from diffusion_core import arrays
from diffusion_core.schedulers import common, schedule
from diffusion_core.schedulers.base import AlphaScheduler


class DDIMState(NamedTuple):
    timesteps: Any  # (n,) int: the model's timestep at each step
    alpha_t: Any  # (n,) alpha_bar at t
    alpha_prev: Any  # (n,) alpha_bar at t - T//n (final_alpha_cumprod past the start)
    step_index: Any  # () int32 counter
    init_noise_sigma: Any  # () 1.0


class DDIMScheduler(AlphaScheduler):
    """Deterministic (eta=0) or stochastic (eta>0) DDIM sampling."""

    _defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }

    def _make_state(self, n, like, *, timesteps=None, sigmas=None) -> DDIMState:
        cfg = self.config
        T = cfg["num_train_timesteps"]
        ts = np.round(schedule.spaced_timesteps(cfg["timestep_spacing"], T, n, cfg["steps_offset"]))
        ts = ts.astype(np.int64)
        prev = ts - T // n  # diffusers steps back by T//n whatever the spacing
        final = 1.0 if cfg["set_alpha_to_one"] else self.alphas_cumprod[0]
        acp = self.alphas_cumprod
        alpha_prev = np.where(prev >= 0, acp[np.clip(prev, 0, T - 1)], final)
        return DDIMState(
            timesteps=arrays.host_to_like(ts, like, integer=True),
            alpha_t=arrays.host_to_like(acp[ts], like),
            alpha_prev=arrays.host_to_like(alpha_prev, like),
            step_index=arrays.counter_like(like),
            init_noise_sigma=arrays.host_to_like(1.0, like),
        )

    def needs_noise_for(self, *, eta: float = 0.0, **_: Any) -> bool:
        return eta > 0

    def step(self, state: DDIMState, model_output, sample, noise=None, *, eta: float = 0.0,
             use_clipped_model_output: bool = False):
        """x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z, s = eta * sigma_t(eta=1)."""
        xp = arrays.namespace(sample)
        i = state.step_index
        a_t, a_prev = state.alpha_t[i], state.alpha_prev[i]
        alpha, sigma = xp.sqrt(a_t), xp.sqrt(1 - a_t)
        cfg = self.config
        x0 = common.x0_from_output(cfg["prediction_type"], model_output, sample, alpha, sigma)
        eps = common.eps_from_output(cfg["prediction_type"], model_output, sample, alpha, sigma)
        x0 = common.clamp_x0(cfg, x0)
        if use_clipped_model_output:
            eps = (sample - alpha * x0) / sigma
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * xp.sqrt(variance)
        prev_sample = xp.sqrt(a_prev) * x0 + xp.sqrt(1 - a_prev - std**2) * eps
        if eta > 0:
            prev_sample = prev_sample + std * self._require_noise(noise, "eta > 0")
        return prev_sample, state._replace(step_index=i + 1)
