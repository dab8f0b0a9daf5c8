"""Heun's 2nd-order sampler in sigma space (Karras et al. 2022, EDM, arXiv 2206.00364, Algorithm 1)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from diffusion_core import arrays
from diffusion_core.schedulers import sigma_base
from diffusion_core.schedulers.sigma_base import SigmaScheduler

# columns of HeunState.coefs
_C_SKIP, _C_OUT, _INV_SIGMA, _W_X, _W_XI, _W_D, _W_DI = range(7)


class HeunState(NamedTuple):
    timesteps: Any  # (m,) model timestep per call, m = 2n - 1: predictor, corrector, ..., final Euler
    sigmas: Any  # (m + 1,) sigma of each call, then the terminal 0 (diffusers' interleaved ladder)
    coefs: Any  # (m, 7) per call: c_skip, c_out, 1/sigma, then the weights of x, x_i, d, d_i
    start_sample: Any  # like the latents: x_i, where the corrector restarts from
    start_slope: Any  # like the latents: the predictor's slope d_i
    step_index: Any  # () int32 model-call counter
    init_noise_sigma: Any  # () start-noise scale


def heun_call_tables(sigmas: np.ndarray) -> np.ndarray:
    """(m, 4) weights of x, x_i, d, d_i per call for a sigma ladder (n levels + terminal).

    Predictor (call 2i): x' = x_i + h d_i, h = s_{i+1} - s_i. Corrector (call 2i + 1):
    x_{i+1} = x_i + h (d_i + d') / 2. The step to the terminal sigma is the predictor alone.
    """
    n = sigmas.shape[0] - 1
    h = np.diff(sigmas)  # (n,) negative step sizes
    one, zero = np.ones(n), np.zeros(n)
    return np.stack(
        [
            sigma_base.interleave_stages(one, zero),  # x
            sigma_base.interleave_stages(zero, one),  # x_i
            sigma_base.interleave_stages(h, h / 2),  # d (this call's slope)
            sigma_base.interleave_stages(zero, h / 2),  # d_i (the predictor's slope)
        ],
        axis=1,
    )


class HeunDiscreteScheduler(SigmaScheduler):
    """Deterministic Heun sampling (S_churn = 0): two model calls per step, diffusers' layout."""

    order = 2
    accepts_timesteps = True
    _extra_beta_schedules = ("exp",)
    _defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }

    def _make_state(self, n, like, *, timesteps=None, sigmas=None) -> HeunState:
        cfg = self.options
        ts, levels = sigma_base.sigma_schedule(cfg, self.train_sigmas, n, timesteps=timesteps)
        call_ts = sigma_base.interleave_stages(ts, ts[1:])
        call_sigmas = sigma_base.interleave_stages(levels[:-1], levels[1:])  # (m,)
        c_skip, c_out = sigma_base.denoiser_coefficients(cfg["prediction_type"], call_sigmas)
        coefs = np.concatenate([np.stack([c_skip, c_out, 1.0 / call_sigmas], axis=1), heun_call_tables(levels)], axis=1)
        return HeunState(
            timesteps=arrays.host_to_like(call_ts, like),
            sigmas=arrays.host_to_like(np.append(call_sigmas, levels[-1]), like),
            coefs=arrays.host_to_like(coefs, like),
            start_sample=arrays.zeros_like_shape(like),
            start_slope=arrays.zeros_like_shape(like),
            step_index=arrays.counter_like(like),
            init_noise_sigma=arrays.host_to_like(sigma_base.init_noise_sigma_for(cfg, levels), like),
        )

    def step(self, state: HeunState, model_output, sample, noise=None):
        """One call: the Euler predictor or the trapezoidal corrector, chosen by the per-call weights."""
        i = state.step_index
        c = state.coefs[i]  # (7,)
        if sigma_base.slope_is_output(self.options):
            d = model_output
        else:
            d = sigma_base.ode_slope(self.options, c[_C_SKIP], c[_C_OUT], c[_INV_SIGMA], model_output, sample)
        prev_sample = c[_W_X] * sample  # accumulated in place: this product is fresh, never an input
        prev_sample += c[_W_XI] * state.start_sample
        prev_sample += c[_W_D] * d
        prev_sample += c[_W_DI] * state.start_slope
        return prev_sample, state._replace(start_sample=sample, start_slope=d, step_index=i + 1)
