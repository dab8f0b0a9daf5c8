"""EDM Euler: the Euler sampler in Karras et al. 2022's preconditioned formulation (arXiv 2206.00364).

The network sees c_in(sigma) x and c_noise(sigma) = log(sigma) / 4 as its timestep; its output
becomes D(x) = c_skip x + c_out F(x) (EDM, Table 1). There is no VP training table: noise levels
come straight from the continuous Karras (rho) or log-linear ramp between sigma_min and sigma_max.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from diffusion_core import arrays
from diffusion_core.schedulers import schedule
from diffusion_core.schedulers.base import Scheduler
from diffusion_core.schedulers.churn import ChurnMixin


class EDMEulerState(NamedTuple):
    timesteps: Any  # (n,) float: c_noise = log(sigma) / 4, the model's timestep input
    sigmas: Any  # (n + 1,) noise levels, the last one terminal (0 or sigma_min)
    c_in: Any  # (n,) model-input scale 1 / sqrt(sigma^2 + sigma_data^2)
    sample_coef: Any  # (n,) x_next = sample_coef * x + output_coef * F(x) (no churn)
    output_coef: Any  # (n,)
    step_index: Any  # () int32 counter
    init_noise_sigma: Any  # () sqrt(sigma_max^2 + 1)


def euler_coefs(sigma, sigma_next, sigma_data: float, sign: float):
    """(a, b) with x_next = a x + b F for D = c_skip x + c_out F and x_next = x + (x - D) (s' - s) / s.

    Arithmetic only: serves host float64 tables and in-step 0-d arrays (churned sigma) alike.
    """
    var = sigma * sigma + sigma_data * sigma_data
    c_skip = sigma_data * sigma_data / var
    c_out = sign * sigma * sigma_data * var**-0.5
    ratio = (sigma_next - sigma) / sigma
    return 1 + ratio * (1 - c_skip), -ratio * c_out


class EDMEulerScheduler(ChurnMixin, Scheduler):
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_hat) (x_i - D(x_i)) / sigma_hat (EDM, Alg. 2 without the Heun step)."""

    _defaults = {
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "sigma_data": 0.5,
        "sigma_schedule": "karras",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "rho": 7.0,
        "final_sigmas_type": "zero",
    }
    # diffusers accepts "sample" in __init__ but precondition_outputs then raises
    _choices = {"sigma_schedule": ("karras", "exponential"), "prediction_type": ("epsilon", "v_prediction")}
    step_options = frozenset({"s_churn", "s_tmin", "s_tmax", "s_noise", "pred_original_sample"})
    accepts_sigmas = True  # diffusers treats them as ramp points in [0, 1], mapped through the schedule
    steps_bounded_by_training = False

    def _check_config(self, config: dict[str, Any]) -> None:
        super()._check_config(config)
        for key in ("sigma_min", "sigma_max", "sigma_data", "rho"):
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{type(self).__name__}: {key} must be a number > 0, got {value!r}")

    def _levels(self, n: int, ramp: np.ndarray | None) -> np.ndarray:
        """n float32 noise levels high to low: the Karras rho-ramp or a log-linear one (EDM, eq. 5).

        Rounded as diffusers rounds them, so the c_noise timesteps agree (to the ulp where torch's
        float32 log/exp are not correctly rounded).
        """
        cfg = self.options
        lo, hi = float(cfg["sigma_min"]), float(cfg["sigma_max"])
        if cfg["sigma_schedule"] == "exponential":  # diffusers keeps only the ramp's length here
            # a float32 log-ramp built low-to-high then flipped: a 1-step ladder is [sigma_min]
            log_ramp = schedule.torch_linspace_float32(np.log(lo), np.log(hi), n).astype(np.float64)
            return np.exp(log_ramp).astype(np.float32)[::-1].copy()
        ramp = np.linspace(0, 1, n) if ramp is None else ramp
        return schedule.karras_ramp(lo, hi, ramp, float(cfg["rho"])).astype(np.float32)

    def _make_state(self, n, like, *, timesteps=None, sigmas=None) -> EDMEulerState:
        cfg = self.options
        levels32 = self._levels(n, sigmas)
        c_noise = (0.25 * np.log(levels32.astype(np.float64))).astype(np.float32)  # as diffusers' timesteps
        levels = levels32.astype(np.float64)
        last = levels[-1] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        full = np.concatenate([levels, [last]])
        sign = 1.0 if cfg["prediction_type"] == "epsilon" else -1.0
        a, b = euler_coefs(levels, full[1:], float(cfg["sigma_data"]), sign)
        return EDMEulerState(
            timesteps=arrays.host_to_like(c_noise, like),
            sigmas=arrays.host_to_like(full, like),
            c_in=arrays.host_to_like((levels**2 + float(cfg["sigma_data"]) ** 2) ** -0.5, like),
            sample_coef=arrays.host_to_like(a, like),
            output_coef=arrays.host_to_like(b, like),
            step_index=arrays.counter_like(like),
            init_noise_sigma=arrays.host_to_like((float(cfg["sigma_max"]) ** 2 + 1) ** 0.5, like),
        )

    def scale_model_input(self, state: EDMEulerState, sample):
        """c_in(sigma) x = x / sqrt(sigma^2 + sigma_data^2) (EDM, Table 1)."""
        return sample * state.c_in[state.step_index]

    def step(
        self,
        state: EDMEulerState,
        model_output,
        sample,
        noise=None,
        *,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        pred_original_sample=None,
    ):
        """One Euler step; with ``s_churn > 0`` first raise sigma to (1 + gamma) sigma (EDM, Alg. 2, l. 5-6).

        ``pred_original_sample``: a denoised D(x) to use instead of preconditioning ``model_output``.
        """
        i = state.step_index
        if s_churn <= 0 and pred_original_sample is None:
            return state.sample_coef[i] * sample + state.output_coef[i] * model_output, state._replace(step_index=i + 1)
        sigma, sigma_next = state.sigmas[i], state.sigmas[i + 1]
        sigma_hat = sigma
        if s_churn > 0:
            sample, g = self._churn(state, sample, noise, s_churn, s_tmin, s_tmax, s_noise)
            sigma_hat = sigma * (1 + g)
        if pred_original_sample is not None:
            prev_sample = sample + (sample - pred_original_sample) * ((sigma_next - sigma_hat) / sigma_hat)
        else:
            sign = 1.0 if self.options["prediction_type"] == "epsilon" else -1.0
            a, b = euler_coefs(sigma_hat, sigma_next, float(self.options["sigma_data"]), sign)
            prev_sample = a * sample + b * model_output
        return prev_sample, state._replace(step_index=i + 1)

    def add_noise(self, original_samples, noise, timesteps, state: EDMEulerState | None = None):
        """x_0 + sigma noise, with sigma = exp(4 t) inverting c_noise exactly (``state`` is not needed)."""
        xp = arrays.namespace(original_samples)
        t = xp.astype(arrays.as_index_array(timesteps, original_samples), original_samples.dtype)
        sigma = xp.exp(4 * t)
        return original_samples + arrays.broadcast_left(sigma, original_samples.ndim) * noise
