"""Euler sampler of the probability-flow ODE, with optional churn (Karras et al. 2022, EDM, Alg. 2)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from diffusion_core import arrays
from diffusion_core.schedulers import sigma_base
from diffusion_core.schedulers.churn import ChurnMixin
from diffusion_core.schedulers.sigma_base import SigmaScheduler

# columns of EulerState.coefs
_C_SKIP, _C_OUT, _INV_SIGMA, _DT = range(4)


class EulerState(NamedTuple):
    timesteps: Any  # (n,) float: the model's (fractional) timestep at each step
    sigmas: Any  # (n + 1,) noise levels, the last one terminal ((n + 2,) for log_linear)
    coefs: Any  # (n, 4) per step: c_skip, c_out, 1/sigma, sigma_{i+1} - sigma_i
    step_index: Any  # () int32 counter
    init_noise_sigma: Any  # () scale of the starting Gaussian draw


class EulerDiscreteScheduler(ChurnMixin, SigmaScheduler):
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_hat) d_i, d_i = (x_i - D(x_i)) / sigma_hat."""

    _defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    }
    _choices = {
        "interpolation_type": ("linear", "log_linear"),
        "timestep_type": ("discrete", "continuous"),
    }
    accepts_timesteps = True
    step_options = frozenset({"s_churn", "s_tmin", "s_tmax", "s_noise"})
    accepts_sigmas = True

    def _continuous_v(self) -> bool:
        return self.options["timestep_type"] == "continuous" and self.options["prediction_type"] == "v_prediction"

    def _make_state(self, n, like, *, timesteps=None, sigmas=None) -> EulerState:
        if timesteps is not None and self._continuous_v():
            raise ValueError("timesteps: not accepted with timestep_type='continuous' and v_prediction")
        ts, sig = sigma_base.sigma_schedule(self.options, self.train_sigmas, n, timesteps=timesteps, sigmas=sigmas)
        if self._continuous_v():
            # EDM's c_noise = log(sigma) / 4, fed to the network in place of a discrete timestep
            ts = 0.25 * np.log(sig[:-1])
        steps = ts.shape[0]
        c_skip, c_out = sigma_base.denoiser_coefficients(self.options["prediction_type"], sig[:steps])
        coefs = np.stack([c_skip, c_out, 1.0 / sig[:steps], sig[1 : steps + 1] - sig[:steps]], axis=1)
        return EulerState(
            timesteps=arrays.host_to_like(ts, like),
            sigmas=arrays.host_to_like(sig, like),
            coefs=arrays.host_to_like(coefs, like),
            step_index=arrays.counter_like(like),
            init_noise_sigma=arrays.host_to_like(sigma_base.init_noise_sigma_for(self.options, sig), like),
        )

    def step(
        self,
        state: EulerState,
        model_output,
        sample,
        noise=None,
        *,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
    ):
        """One Euler step; with ``s_churn > 0`` first raise sigma to sigma_hat = (1 + gamma) sigma."""
        i = state.step_index
        c = state.coefs[i]  # (4,)
        inv_sigma, dt = c[_INV_SIGMA], c[_DT]
        if s_churn > 0:
            sample, g = self._churn(state, sample, noise, s_churn, s_tmin, s_tmax, s_noise)
            inv_sigma, dt = inv_sigma / (1 + g), dt - state.sigmas[i] * g  # 1 / sigma_hat, sigma_next - sigma_hat
        # x0 = c_skip x + c_out out uses the un-churned sigma (as diffusers), the slope divides by sigma_hat
        d = sigma_base.ode_slope(self.options, c[_C_SKIP], c[_C_OUT], inv_sigma, model_output, sample)
        return sample + d * dt, state._replace(step_index=i + 1)
