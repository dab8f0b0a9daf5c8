"""Abstract base of the variance-exploding (sigma-space) schedulers: Euler, Heun, LMS, KDPM2, ...

These integrate the probability-flow ODE in x_sigma = x_0 + sigma * eps (Karras et al. 2022,
EDM). Their state carries ``sigmas`` (one per model call, plus the terminal one) and the
model input is scaled by 1 / sqrt(sigma^2 + 1) so a VP-trained network sees unit variance.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from diffusion_core import arrays
from diffusion_core.schedulers import common, schedule
from diffusion_core.schedulers.base import AlphaScheduler


def sigma_schedule(
    config: Mapping[str, Any],
    train_sigmas: np.ndarray,
    n: int,
    *,
    timesteps: np.ndarray | None = None,
    sigmas: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Host float64 ``(timesteps, sigmas)`` of a k-diffusion sampler (Karras et al. 2022, EDM).

    ``timesteps`` has one entry per solver step, ``sigmas`` one more (the terminal level).
    Config keys read (absent ones take diffusers' defaults): ``timestep_spacing``,
    ``num_train_timesteps``, ``steps_offset``, ``interpolation_type`` ("linear"), the
    ``use_*_sigmas`` ladders with ``sigma_min``/``sigma_max``, ``final_sigmas_type`` ("zero").
    Custom ``timesteps`` are interpolated on ``train_sigmas``; custom ``sigmas`` are used as
    given (their last entry is the terminal level) and mapped back to fractional timesteps.
    "log_linear" interpolation without a ladder keeps diffusers' n + 2 sigmas (the sampler
    stops at the smallest training sigma).
    """
    log_train = np.log(train_sigmas)
    ladder = schedule.chosen_sigma_ladder(config)
    if sigmas is not None:
        sigmas = np.asarray(sigmas, dtype=np.float64)
        if sigmas.ndim != 1 or sigmas.size < 2:
            raise ValueError("sigmas: need at least 2 values (one step and the terminal sigma)")
        return schedule.sigma_to_t(sigmas[:-1], log_train), sigmas
    if timesteps is not None:
        if ladder is not None:
            raise ValueError(f"timesteps: custom timesteps cannot be combined with {ladder}=True")
        ts = np.asarray(timesteps, dtype=np.float64)
    else:
        T = int(config["num_train_timesteps"])
        ts = schedule.spaced_timesteps(config["timestep_spacing"], T, n, int(config.get("steps_offset", 0)))
    if config.get("interpolation_type", "linear") == "log_linear":
        levels = np.exp(np.linspace(log_train[-1], log_train[0], n + 1))
    else:
        levels = np.interp(ts, np.arange(train_sigmas.shape[0]), train_sigmas)
    if ladder is not None:
        levels = schedule.convert_sigmas(config, levels, n)
        ts = schedule.sigma_to_t(levels, log_train)
    last = train_sigmas[0] if config.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
    return ts, np.concatenate([levels, [last]])


def init_noise_sigma_for(config, sigmas: np.ndarray) -> float:
    """Start-noise scale: max sigma, or sqrt(max^2 + 1) for 'leading' spacing (diffusers' rule)."""
    max_sigma = float(np.max(sigmas))
    if config.get("timestep_spacing") in ("linspace", "trailing"):
        return max_sigma
    return (max_sigma**2 + 1) ** 0.5


class SigmaScheduler(AlphaScheduler):
    """Abstract: VP training table (betas, alphas_cumprod) sampled in sigma space."""

    _floors_zero_snr = True  # diffusers: "close to 0 without being 0 so the first sigma is not inf"

    def _setup(self) -> None:
        super()._setup()
        self.train_sigmas = schedule.sigmas_from_alphas_cumprod(self.alphas_cumprod)  # (T,) float64
        self.log_sigmas = np.log(self.train_sigmas)

    def _input_sigma(self, state):
        """The sigma of the current model call (subclasses with sub-steps override)."""
        return state.sigmas[state.step_index]

    def scale_model_input(self, state, sample):
        """x / sqrt(sigma^2 + 1): the VP-equivalent input for a network trained on x_t."""
        xp = arrays.namespace(sample)
        sigma = self._input_sigma(state)
        return sample / xp.sqrt(sigma**2 + 1)

    def _sigma_at(self, timesteps, like, state=None):
        """Noise level for each of ``timesteps``.

        With ``state``: the sigma of the scheduled step whose timestep is nearest (diffusers
        looks the value up in its schedule). Without: the training ladder, linearly
        interpolated at fractional timesteps.
        """
        xp = arrays.namespace(like)
        t = arrays.as_index_array(timesteps, like)
        t = xp.astype(t, like.dtype)
        if state is not None:
            sched_t = xp.astype(state.timesteps, like.dtype)
            flat = xp.reshape(t, (-1,))
            idx = xp.argmin(xp.abs(flat[:, None] - sched_t[None, :]), axis=1)
            return xp.reshape(xp.take(state.sigmas, idx, axis=0), t.shape)
        return arrays.interp_table(self.train_sigmas, t, like)

    def add_noise(self, original_samples, noise, timesteps, state: Any = None):
        """x_sigma = x_0 + sigma * noise (pass ``state`` to use the scheduled sigmas)."""
        sigma = self._sigma_at(timesteps, original_samples, state)
        return original_samples + arrays.broadcast_left(sigma, original_samples.ndim) * noise


def denoiser_coefficients(prediction_type: str, sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Host ``(c_skip, c_out)`` with x0 = c_skip * x + c_out * output at VE level sigma (Karras et al. 2022, EDM).

    The network saw x / sqrt(sigma^2 + 1) (a VP x_t), so eps, v and x0 outputs map to x0 as in
    diffusers' sigma-space schedulers.
    """
    s = np.asarray(sigmas, dtype=np.float64)
    if prediction_type == "epsilon":
        return np.ones_like(s), -s
    if prediction_type == "v_prediction":
        return 1.0 / (s**2 + 1), -s / np.sqrt(s**2 + 1)
    if prediction_type == "sample":
        return np.zeros_like(s), np.ones_like(s)
    raise ValueError(f"prediction_type: got {prediction_type!r}; accepted: 'epsilon', 'v_prediction', 'sample'")


def slope_is_output(config: Mapping[str, Any]) -> bool:
    """An unclamped epsilon prediction is the ODE slope itself: no x0 round trip needed."""
    return config["prediction_type"] == "epsilon" and not config.get("clip_sample")


def ode_slope(config: Mapping[str, Any], c_skip, c_out, inv_sigma, model_output, sample):
    """Probability-flow ODE slope dx/dsigma = (x - x0) / sigma (Karras et al. 2022, EDM, eq. 3).

    x0 = c_skip * x + c_out * output, clamped when the config asks (``clip_sample``); an
    unclamped epsilon output is the slope itself.
    """
    if slope_is_output(config):
        return model_output
    x0 = common.clamp_x0(config, c_skip * sample + c_out * model_output)
    return (sample - x0) * inv_sigma


def interleave_stages(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per-call table of a two-stage solver: [first_0, second_0, first_1, ..., first_{n-1}].

    ``first`` has one entry per solver step (n); ``second`` is read for the first n - 1 steps:
    the last step, down to the terminal sigma, is a single Euler call (as in diffusers).
    """
    first = np.asarray(first, dtype=np.float64)
    n = first.shape[0]
    out = np.empty(2 * n - 1, dtype=np.float64)
    out[0::2] = first
    out[1::2] = np.asarray(second, dtype=np.float64)[: n - 1]
    return out


def ancestral_sigmas(sigma: np.ndarray, sigma_next: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sigma_down, sigma_up) with down^2 + up^2 = sigma_next^2: a deterministic step plus fresh noise.

    Ancestral sampling with eta = 1 (Song et al. 2021, DDIM eq. 16, in k-diffusion's sigma form):
    up = s' sqrt(1 - (s'/s)^2), down = s'^2 / s.
    """
    up = sigma_next * np.sqrt(1.0 - (sigma_next / sigma) ** 2)
    down = sigma_next**2 / sigma
    return down, up
