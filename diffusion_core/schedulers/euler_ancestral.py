"""Euler ancestral sampler: an Euler step down to sigma_down, then fresh noise of size sigma_up (k-diffusion)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from diffusion_core import arrays
from diffusion_core.schedulers import sigma_base
from diffusion_core.schedulers.sigma_base import SigmaScheduler

# columns of EulerAncestralState.coefs
_C_SKIP, _C_OUT, _INV_SIGMA, _DT, _SIGMA_UP = range(5)


class EulerAncestralState(NamedTuple):
    timesteps: Any  # (n,) float: the model's timestep at each step
    sigmas: Any  # (n + 1,) noise levels, the last one 0
    coefs: Any  # (n, 5) per step: c_skip, c_out, 1/sigma, sigma_down - sigma, sigma_up
    step_index: Any  # () int32 counter
    init_noise_sigma: Any  # () scale of the starting Gaussian draw


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """x_{i+1} = x_i + (sigma_down - sigma_i) d_i + sigma_up z; always consumes noise."""

    _defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    # diffusers accepts "sample" in the config but raises NotImplementedError at the first step
    _choices = {"prediction_type": ("epsilon", "v_prediction")}

    @property
    def needs_noise(self) -> bool:
        """Every ancestral step re-noises with a fresh Gaussian draw."""
        return True

    def _make_state(self, n, like, *, timesteps=None, sigmas=None) -> EulerAncestralState:
        ts, sig = sigma_base.sigma_schedule(self.options, self.train_sigmas, n)
        down, up = sigma_base.ancestral_sigmas(sig[:-1], sig[1:])
        c_skip, c_out = sigma_base.denoiser_coefficients(self.options["prediction_type"], sig[:-1])
        coefs = np.stack([c_skip, c_out, 1.0 / sig[:-1], down - sig[:-1], up], axis=1)
        return EulerAncestralState(
            timesteps=arrays.host_to_like(ts, like),
            sigmas=arrays.host_to_like(sig, like),
            coefs=arrays.host_to_like(coefs, like),
            step_index=arrays.counter_like(like),
            init_noise_sigma=arrays.host_to_like(sigma_base.init_noise_sigma_for(self.options, sig), like),
        )

    def step(self, state: EulerAncestralState, model_output, sample, noise=None):
        """One ancestral step: deterministic Euler to sigma_down plus ``noise`` * sigma_up."""
        noise = self._require_noise(noise, "ancestral sampling adds fresh noise every step")
        i = state.step_index
        c = state.coefs[i]  # (5,)
        d = sigma_base.ode_slope(self.options, c[_C_SKIP], c[_C_OUT], c[_INV_SIGMA], model_output, sample)
        return sample + d * c[_DT] + noise * c[_SIGMA_UP], state._replace(step_index=i + 1)
