"""DDPM: ancestral sampling of the reverse posterior (Ho et al. 2020, arXiv 2006.11239, eqs. 6-7)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from diffusion_core import arrays
from diffusion_core.schedulers import common, schedule
from diffusion_core.schedulers.base import AlphaScheduler, host_values

LEARNED = ("learned", "learned_range")


class DDPMState(NamedTuple):
    timesteps: Any  # (n,) int: the model's timestep at each step
    alpha_t: Any  # (n,) sqrt(alpha_bar_t)
    sigma_t: Any  # (n,) sqrt(1 - alpha_bar_t)
    x0_coef: Any  # (n,) posterior-mean weight of x0: sqrt(a_prev) beta_t / (1 - a_t)
    x_coef: Any  # (n,) posterior-mean weight of x_t: sqrt(1 - beta_t) (1 - a_prev) / (1 - a_t)
    noise_std: Any  # (n,) std of the added noise for the fixed variance types (0 where t == 0)
    log_var_min: Any  # (n,) log posterior variance (clamped at 1e-20): learned_range's lower end
    log_var_max: Any  # (n,) log beta_t: learned_range's upper end
    has_noise: Any  # (n,) 1.0 where noise is added (t > 0), else 0.0
    step_index: Any  # () int32 counter
    init_noise_sigma: Any  # () 1.0


def _fixed_std(variance_type: str, posterior_var: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Noise std per step for the fixed variance types, as diffusers computes it."""
    if variance_type in ("fixed_small", "fixed_small_log"):
        return np.sqrt(posterior_var)  # fixed_small_log: exp(0.5 log var), the same number
    if variance_type == "fixed_large":
        return np.sqrt(beta)
    if variance_type == "fixed_large_log":
        # diffusers returns log(beta) as a *variance* and takes its square root: NaN for beta < 1
        with np.errstate(invalid="ignore"):
            return np.sqrt(np.log(beta))
    return np.zeros_like(beta)  # learned types: std comes from the model at step time


def next_timesteps(ts: np.ndarray) -> np.ndarray:
    """(n,) the timestep each step goes to: the next scheduled one, -1 past the end."""
    return np.concatenate([ts[1:], [-1]])


def alpha_bar_prev(acp: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """(n,) alpha_bar at each step's target (1.0 past the end)."""
    prev = next_timesteps(ts)
    return np.where(prev >= 0, acp[np.clip(prev, 0, len(acp) - 1)], 1.0)


def posterior_state(acp, ts, variance_type: str, like, step_betas=None) -> DDPMState:
    """The per-step posterior tables of q(x_prev | x_t, x0) for descending timesteps ``ts`` (host float64).

    Each step goes from ``ts[i]`` to the next scheduled timestep with beta = 1 - alpha_bar_t / alpha_bar_prev,
    unless the scheduler gives its own ``step_betas`` (unCLIP).
    """
    a_t = acp[ts]
    a_prev = alpha_bar_prev(acp, ts)
    beta = 1.0 - a_t / a_prev if step_betas is None else step_betas  # beta of the (possibly strided) step
    posterior_var = np.maximum((1.0 - a_prev) / (1.0 - a_t) * beta, 1e-20)
    has_noise = (ts > 0).astype(np.float64)
    std = np.where(ts > 0, _fixed_std(variance_type, posterior_var, beta), 0.0)
    with np.errstate(divide="ignore"):
        log_beta = np.log(beta)
    return DDPMState(
        timesteps=arrays.host_to_like(ts, like, integer=True),
        alpha_t=arrays.host_to_like(np.sqrt(a_t), like),
        sigma_t=arrays.host_to_like(np.sqrt(1.0 - a_t), like),
        x0_coef=arrays.host_to_like(np.sqrt(a_prev) * beta / (1.0 - a_t), like),
        x_coef=arrays.host_to_like(np.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a_t), like),
        noise_std=arrays.host_to_like(std, like),
        log_var_min=arrays.host_to_like(np.log(posterior_var), like),
        log_var_max=arrays.host_to_like(log_beta, like),
        has_noise=arrays.host_to_like(has_noise, like),
        step_index=arrays.counter_like(like),
        init_noise_sigma=arrays.host_to_like(1.0, like),
    )


class PosteriorScheduler(AlphaScheduler):
    """Abstract: ancestral sampling of the DDPM posterior over a ``DDPMState`` (DDPM, unCLIP).

    Subclasses choose the timesteps and the per-step beta (``_make_state`` via ``posterior_state``).
    """

    @property
    def needs_noise(self) -> bool:
        """Posterior sampling adds noise at every step but the last."""
        return True

    def noise_calls(self, state: DDPMState, **_: Any) -> np.ndarray:
        """Every call with t > 0 (diffusers draws no variance noise at t = 0)."""
        return host_values(state.timesteps) > 0

    def step(self, state: DDPMState, model_output, sample, noise=None):
        """x_{t-1} = mu(x_t, x0) + std * z with the posterior mean of eq. 7 (Ho et al. 2020).

        For ``variance_type`` "learned"/"learned_range" the model output has 2C channels:
        the prediction, then the variance (learned) or the log-variance interpolation
        weight in [-1, 1] (learned_range, Nichol & Dhariwal 2021, eq. 15).
        """
        xp = arrays.namespace(sample)
        i = state.step_index
        cfg = self.options
        model_output, predicted = self._split_output(model_output, sample)
        x0 = common.x0_from_output(cfg["prediction_type"], model_output, sample, state.alpha_t[i], state.sigma_t[i])
        x0 = common.clamp_x0(cfg, x0)
        mean = state.x0_coef[i] * x0 + state.x_coef[i] * sample
        if self._noise_unless_unused(noise, state.has_noise[i], "noise is added on every step with t > 0") is None:
            return mean, state._replace(step_index=i + 1)  # t = 0: diffusers adds no noise there
        if predicted is None:
            std = state.noise_std[i]
        else:
            std = self._learned_std(xp, state, i, predicted)
        return mean + std * noise, state._replace(step_index=i + 1)

    def _split_output(self, model_output, sample):
        """(prediction, predicted variance or None): learned types carry 2C channels."""
        channels = sample.shape[1]
        if self.options["variance_type"] not in LEARNED:
            return model_output, None
        if model_output.shape[1] != 2 * channels:
            raise ValueError(
                f"model_output: variance_type={self.options['variance_type']!r} needs 2*C = {2 * channels} "
                f"channels (prediction, variance), got {model_output.shape[1]}"
            )
        return model_output[:, :channels], model_output[:, channels:]

    def _learned_std(self, xp, state: DDPMState, i, predicted):
        """Noise std from the model's variance channels (zero on a t == 0 step)."""
        if self.options["variance_type"] == "learned":
            std = xp.sqrt(predicted)
        else:
            frac = (predicted + 1) / 2
            std = xp.exp(0.5 * (frac * state.log_var_max[i] + (1 - frac) * state.log_var_min[i]))
        return xp.where(state.has_noise[i] > 0, std, xp.zeros_like(std))


class DDPMScheduler(PosteriorScheduler):
    """Ancestral DDPM sampling with fixed or learned (Nichol & Dhariwal 2021) variances."""

    _defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "variance_type": "fixed_small",
        "clip_sample": True,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    _choices = {
        "variance_type": (
            "fixed_small",
            "fixed_small_log",
            "fixed_large",
            "fixed_large_log",
            "learned",
            "learned_range",
        ),
    }
    _extra_beta_schedules = schedule.DDPM_EXTRA_BETA_SCHEDULES

    accepts_timesteps = True

    def _make_state(self, n, like, *, timesteps=None, sigmas=None) -> DDPMState:
        cfg = self.options
        T = cfg["num_train_timesteps"]
        if timesteps is not None:
            ts = schedule.integer_timesteps(timesteps, T)
        else:
            ts = np.round(schedule.spaced_timesteps(cfg["timestep_spacing"], T, n, cfg["steps_offset"]))
            ts = ts.astype(np.int64)
            if ts.max() >= T:
                raise ValueError(f"steps_offset: {cfg['steps_offset']} pushes timesteps past num_train_timesteps - 1")
        return posterior_state(self.alphas_cumprod, ts, cfg["variance_type"], like)
