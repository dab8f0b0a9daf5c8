"""unCLIP (Karlo): DDPM posterior sampling with Karlo's timestep ladder (Ramesh et al. 2022, arXiv 2204.06125).

The step is DDPM's (``PosteriorScheduler``); what differs is the schedule: timesteps
round(i (T - 1) / (n - 1)) from T - 1 down to 0, a cosine training schedule only, and the
training beta (not 1 - alpha_bar_t / alpha_bar_prev) on steps t -> t - 1 and float32 betas elsewhere, as
diffusers' ``UnCLIPScheduler`` computes them when its pipeline passes ``prev_timestep``.
"""

from __future__ import annotations

import numpy as np

from diffusion_core.schedulers import schedule
from diffusion_core.schedulers.ddpm import (
    DDPMState,
    PosteriorScheduler,
    alpha_bar_prev,
    next_timesteps,
    posterior_state,
)


class UnCLIPScheduler(PosteriorScheduler):
    """Karlo's DDPM variant: ``fixed_small_log`` (prior) or ``learned_range`` (decoder, super-resolution)."""

    _defaults = {
        "num_train_timesteps": 1000,
        "variance_type": "fixed_small_log",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "prediction_type": "epsilon",
        "beta_schedule": "squaredcos_cap_v2",
    }
    _choices = {
        "variance_type": ("fixed_small_log", "learned_range"),
        "prediction_type": ("epsilon", "sample"),
        "beta_schedule": ("squaredcos_cap_v2",),
    }

    def _betas_float32(self) -> np.ndarray:
        return schedule.betas_for_alpha_bar(self._options["num_train_timesteps"]).astype(np.float32)

    def _check_num_steps(self, n) -> None:
        super()._check_num_steps(n)
        if n < 2:
            raise ValueError(
                f"num_inference_steps: UnCLIPScheduler spaces steps by (T - 1) / (n - 1), needs n >= 2, got {n}"
            )

    def _make_state(self, n, like, *, timesteps=None, sigmas=None) -> DDPMState:
        T = self.options["num_train_timesteps"]
        ts = np.round(np.arange(n) * ((T - 1) / (n - 1)))[::-1].astype(np.int64)  # (n,) T - 1 ... 0
        return posterior_state(self.alphas_cumprod, ts, self.options["variance_type"], like, self._step_betas(ts))

    def _step_betas(self, ts: np.ndarray) -> np.ndarray:
        """(n,) each step's beta as diffusers computes it: the training beta on a step t -> t - 1, else
        1 - alpha_bar_t / alpha_bar_prev in float32. That rounding matters: on the first step of the cosine
        schedule alpha_bar_t / alpha_bar_prev is below float32's resolution at 1, so beta is exactly 1 and
        the x_t term of the posterior mean vanishes (float64 would keep ~1e-4 of it, which the next steps amplify).
        """
        a_t = self.alphas_cumprod[ts].astype(np.float32)
        a_prev = alpha_bar_prev(self.alphas_cumprod, ts).astype(np.float32)
        strided = (np.float32(1.0) - a_t / a_prev).astype(np.float64)  # float32 arithmetic, as diffusers
        return np.where(next_timesteps(ts) == ts - 1, self.betas[ts], strided)
