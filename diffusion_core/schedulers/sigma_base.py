"""Abstract base of the variance-exploding (sigma-space) schedulers: Euler, Heun, LMS, KDPM2, ...

These integrate the probability-flow ODE in x_sigma = x_0 + sigma * eps (Karras et al. 2022,
EDM). Their state carries ``sigmas`` (one per model call, plus the terminal one) and the
model input is scaled by 1 / sqrt(sigma^2 + 1) so a VP-trained network sees unit variance.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffusion_core import arrays
from diffusion_core.schedulers import schedule
from diffusion_core.schedulers.base import AlphaScheduler


def init_noise_sigma_for(config, sigmas: np.ndarray) -> float:
    """Start-noise scale: max sigma, or sqrt(max^2 + 1) for 'leading' spacing (diffusers' rule)."""
    max_sigma = float(np.max(sigmas))
    if config.get("timestep_spacing") in ("linspace", "trailing"):
        return max_sigma
    return (max_sigma**2 + 1) ** 0.5


class SigmaScheduler(AlphaScheduler):
    """Abstract: VP training table (betas, alphas_cumprod) sampled in sigma space."""

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
        table = arrays.host_to_like(self.train_sigmas, like)
        top = self.train_sigmas.shape[0] - 1
        lo = xp.clip(xp.floor(t), 0, top)
        hi = xp.clip(lo + 1, 0, top)
        w = t - lo
        lo_i, hi_i = xp.astype(lo, xp.int32), xp.astype(hi, xp.int32)
        return table[lo_i] * (1 - w) + table[hi_i] * w

    def add_noise(self, original_samples, noise, timesteps, state: Any = None):
        """x_sigma = x_0 + sigma * noise (pass ``state`` to use the scheduled sigmas)."""
        sigma = self._sigma_at(timesteps, original_samples, state)
        return original_samples + arrays.broadcast_left(sigma, original_samples.ndim) * noise
