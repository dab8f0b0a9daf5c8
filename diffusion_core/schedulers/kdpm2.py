"""KDPM2: DPM-Solver-2 with a log-midpoint sigma (Lu et al. 2022, arXiv 2206.00927; k-diffusion's sample_dpm_2)."""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import numpy as np

from diffusion_core import arrays
from diffusion_core.schedulers import schedule, sigma_base
from diffusion_core.schedulers.sigma_base import SigmaScheduler

# columns of KDPM2State.coefs
_C_SKIP, _C_OUT, _INV_SIGMA, _W_X, _W_XI, _W_D, _W_NOISE = range(7)


class KDPM2State(NamedTuple):
    timesteps: Any  # (m,) model timestep per call, m = 2n - 1: step, midpoint, ..., final Euler
    sigmas: Any  # (m + 1,) diffusers' interleaved ladder s_0, s_1, s_1, s_2, ..., terminal 0
    input_sigmas: Any  # (m,) sigma the model sees: s_i, then the midpoint sigma
    coefs: Any  # (m, 7) per call: c_skip, c_out, 1/sigma, then the weights of x, x_i, d, noise
    start_sample: Any  # like the latents: x_i, where the midpoint step restarts from
    step_index: Any  # () int32 model-call counter
    init_noise_sigma: Any  # () start-noise scale


class KDPM2Base(SigmaScheduler):
    """Abstract: two calls per step, x_i -> x_mid (Euler) then x_i -> x_end with the midpoint slope."""

    order = 2
    _choices = {"prediction_type": ("epsilon", "v_prediction")}  # diffusers: "sample" not implemented
    _defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "linear",
        "trained_betas": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }

    @abc.abstractmethod
    def _stage_sigmas(self, sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per step i of the ladder (n levels + terminal): (midpoint sigma, end sigma, noise std)."""

    def _make_state(self, n, like, *, timesteps=None, sigmas=None) -> KDPM2State:
        cfg = self.options
        ts, levels = sigma_base.sigma_schedule(cfg, self.train_sigmas, n)
        if cfg["use_karras_sigmas"]:
            ts = np.round(ts)  # diffusers rounds the karras timesteps (not the midpoint ones)
        s = levels[:-1]
        mid, end, up = self._stage_sigmas(levels)
        mid_ts = schedule.sigma_to_t(mid[: n - 1], self.log_sigmas)
        input_sigmas = sigma_base.interleave_stages(s, mid)
        c_skip, c_out = sigma_base.denoiser_coefficients(cfg["prediction_type"], input_sigmas)
        one, zero = np.ones(n), np.zeros(n)
        coefs = np.stack(
            [
                c_skip,
                c_out,
                1.0 / input_sigmas,
                sigma_base.interleave_stages(one, zero),  # x: Euler to the midpoint
                sigma_base.interleave_stages(zero, one),  # x_i: restart with the midpoint slope
                sigma_base.interleave_stages(mid - s, end - s),  # d
                sigma_base.interleave_stages(zero, up),  # noise
            ],
            axis=1,
        )
        return KDPM2State(
            timesteps=arrays.host_to_like(sigma_base.interleave_stages(ts, mid_ts), like),
            sigmas=arrays.host_to_like(np.append(sigma_base.interleave_stages(s, levels[1:]), levels[-1]), like),
            input_sigmas=arrays.host_to_like(input_sigmas, like),
            coefs=arrays.host_to_like(coefs, like),
            start_sample=arrays.zeros_like_shape(like),
            step_index=arrays.counter_like(like),
            init_noise_sigma=arrays.host_to_like(sigma_base.init_noise_sigma_for(cfg, levels), like),
        )

    def _input_sigma(self, state: KDPM2State):
        return state.input_sigmas[state.step_index]

    def step(self, state: KDPM2State, model_output, sample, noise=None):
        """One call: Euler to the midpoint sigma, or from x_i to the end sigma with the midpoint slope."""
        i = state.step_index
        c = state.coefs[i]  # (7,)
        d = sigma_base.ode_slope(self.options, c[_C_SKIP], c[_C_OUT], c[_INV_SIGMA], model_output, sample)
        prev_sample = c[_W_X] * sample + c[_W_XI] * state.start_sample + c[_W_D] * d
        if self.needs_noise and self._noise_unless_unused(noise, c[_W_NOISE], "ancestral second stage") is not None:
            prev_sample = prev_sample + c[_W_NOISE] * noise
        return prev_sample, state._replace(start_sample=sample, step_index=i + 1)


class KDPM2DiscreteScheduler(KDPM2Base):
    """Deterministic DPM-Solver-2: midpoint sigma sqrt(s_i s_{i+1}), the geometric mean."""

    def _stage_sigmas(self, sigmas):
        s, s_next = sigmas[:-1], sigmas[1:]
        return np.sqrt(s * s_next), s_next, np.zeros_like(s)
