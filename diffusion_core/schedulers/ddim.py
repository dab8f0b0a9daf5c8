"""DDIM: denoising diffusion implicit models (Song et al. 2021, arXiv 2010.02502, eq. 12)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from diffusion_core import arrays
from diffusion_core.schedulers import common, schedule
from diffusion_core.schedulers.base import AlphaScheduler


class DDIMState(NamedTuple):
    timesteps: Any  # (n,) int: the model's timestep at each step
    alpha: Any  # (n,) sqrt(alpha_bar_t)
    sigma: Any  # (n,) sqrt(1 - alpha_bar_t)
    keep: Any  # (n,) sqrt(alpha_bar_prev), prev = t - T//n (final_alpha_cumprod past the start)
    direction: Any  # (n,) sqrt(1 - alpha_bar_prev): the eps weight at eta = 0
    variance: Any  # (n,) sigma_t(eta=1)^2 of eq. 16
    lin_x: Any  # (n,) eta = 0 without x0 clamping, the step is linear: x_prev = lin_x x + lin_out out
    lin_out: Any  # (n,)
    step_index: Any  # () int32 counter
    init_noise_sigma: Any  # () 1.0


class DDIMScheduler(AlphaScheduler):
    """Deterministic (eta=0) or stochastic (eta>0) DDIM sampling."""

    step_options = frozenset({"eta", "use_clipped_model_output"})

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
        cfg = self.options
        T = cfg["num_train_timesteps"]
        ts = np.round(schedule.spaced_timesteps(cfg["timestep_spacing"], T, n, cfg["steps_offset"]))
        ts = ts.astype(np.int64)
        prev = ts - T // n  # diffusers steps back by T//n whatever the spacing
        final = 1.0 if cfg["set_alpha_to_one"] else self.alphas_cumprod[0]
        acp = self.alphas_cumprod
        alpha_prev = np.where(prev >= 0, acp[np.clip(prev, 0, T - 1)], final)
        a_t = acp[ts]
        p, q, r, u = common.output_coefficients(cfg["prediction_type"], np.sqrt(a_t), np.sqrt(1 - a_t))
        keep, direction = np.sqrt(alpha_prev), np.sqrt(1 - alpha_prev)  # x_prev = keep x0 + direction eps
        variance = (1 - alpha_prev) / (1 - a_t) * (1 - a_t / alpha_prev)
        return DDIMState(
            timesteps=arrays.host_to_like(ts, like, integer=True),
            alpha=arrays.host_to_like(np.sqrt(a_t), like),
            sigma=arrays.host_to_like(np.sqrt(1 - a_t), like),
            keep=arrays.host_to_like(keep, like),
            direction=arrays.host_to_like(direction, like),
            variance=arrays.host_to_like(variance, like),
            lin_x=arrays.host_to_like(keep * p + direction * r, like),
            lin_out=arrays.host_to_like(keep * q + direction * u, like),
            step_index=arrays.counter_like(like),
            init_noise_sigma=arrays.host_to_like(1.0, like),
        )

    def needs_noise_for(self, *, eta: float = 0.0, **_: Any) -> bool:
        return eta > 0

    def step(
        self,
        state: DDIMState,
        model_output,
        sample,
        noise=None,
        *,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
    ):
        """x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z, s = eta * sigma_t(eta=1)."""
        xp = arrays.namespace(sample)
        i = state.step_index
        cfg = self.options
        if eta == 0 and not (cfg["thresholding"] or cfg["clip_sample"]):
            # the same formula folded on the host: 3 array ops instead of ~15
            return state.lin_x[i] * sample + state.lin_out[i] * model_output, state._replace(step_index=i + 1)
        alpha, sigma = state.alpha[i], state.sigma[i]
        x0 = common.x0_from_output(cfg["prediction_type"], model_output, sample, alpha, sigma)
        eps = common.eps_from_output(cfg["prediction_type"], model_output, sample, alpha, sigma)
        x0 = common.clamp_x0(cfg, x0)
        if use_clipped_model_output:
            eps = (sample - alpha * x0) / sigma
        new_state = state._replace(step_index=i + 1)
        if eta == 0:
            return state.keep[i] * x0 + state.direction[i] * eps, new_state
        std = eta * xp.sqrt(state.variance[i])
        direction = xp.sqrt(state.direction[i] ** 2 - std**2)  # sqrt(1 - a_prev - std^2)
        noise = self._require_noise(noise, "eta > 0")
        return state.keep[i] * x0 + direction * eps + std * noise, new_state
