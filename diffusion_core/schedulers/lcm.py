"""LCM: multistep latent consistency sampling (Luo et al. 2023, arXiv 2310.04378, Alg. 3)."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np

from diffusion_core import arrays
from diffusion_core.schedulers import common, schedule
from diffusion_core.schedulers.base import AlphaScheduler, host_values

logger = logging.getLogger(__name__)

SIGMA_DATA = 0.5  # consistency-model boundary condition (Song et al. 2023, arXiv 2303.01469, sec. 3)


class LCMState(NamedTuple):
    timesteps: Any  # (n,) int: the model's timestep at each step
    alpha_t: Any  # (n,) sqrt(alpha_bar_t)
    sigma_t: Any  # (n,) sqrt(1 - alpha_bar_t)
    x0_coef: Any  # (n,) c_out(t), times sqrt(alpha_bar_prev) on noisy steps
    x_coef: Any  # (n,) c_skip(t), times sqrt(alpha_bar_prev) on noisy steps
    noise_coef: Any  # (n,) sqrt(1 - alpha_bar_prev) on noisy steps, 0 on the final one
    step_index: Any  # () int32 counter
    init_noise_sigma: Any  # () 1.0


class LCMScheduler(AlphaScheduler):
    """Consistency-function denoising, re-noised to the next timestep between steps."""

    _defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,  # unused in practice: LCM's previous timestep is never < 0
        "steps_offset": 0,  # kept for config compatibility; LCM's schedule does not use it
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",  # kept for config compatibility; LCM's schedule does not use it
        "timestep_scaling": 10.0,
        "rescale_betas_zero_snr": False,
    }

    accepts_timesteps = True

    @property
    def needs_noise(self) -> bool:
        """Every multistep LCM step re-noises the denoised sample."""
        return True

    def _check_config(self, config: dict[str, Any]) -> None:
        super()._check_config(config)
        steps = config["original_inference_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"LCMScheduler: original_inference_steps must be an int >= 1, got {steps!r}")

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        like: Any = None,
        *,
        timesteps: Any = None,
        sigmas: Any = None,
        original_inference_steps: int | None = None,
        strength: float = 1.0,
        begin_index: int = 0,
    ) -> LCMState:
        """As the base, plus diffusers' ``original_inference_steps`` override and img2img ``strength``."""
        n, timesteps, sigmas = self._resolve_request(num_inference_steps, timesteps, sigmas)
        extras = {"original_inference_steps": original_inference_steps, "strength": strength}
        return self._build_state(n, like, begin_index, timesteps=timesteps, **extras)

    def _make_state(
        self, n, like, *, timesteps=None, sigmas=None, original_inference_steps=None, strength: float = 1.0
    ) -> LCMState:
        cfg = self.options
        T = cfg["num_train_timesteps"]
        steps = cfg["original_inference_steps"] if original_inference_steps is None else original_inference_steps
        _check_original_steps(steps, T, key="original_inference_steps")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(f"strength: must be a number in (0, 1], got {strength!r}")
        origin = np.arange(1, int(steps * strength) + 1, dtype=np.int64) * (T // steps) - 1  # (steps*strength,)
        if timesteps is not None:
            ts, last = self._custom_timesteps(timesteps, origin, steps, strength)
        else:
            ts, last = _lcm_timesteps(origin, n, steps, strength), n - 1
        noisy = np.arange(ts.size) != last  # no noise on the final step (diffusers' step-index rule)
        acp = self.alphas_cumprod
        a_t = acp[ts]
        a_prev = np.where(noisy, acp[np.concatenate([ts[1:], ts[-1:]])], 1.0)
        scaled = ts * float(cfg["timestep_scaling"])
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / np.sqrt(scaled**2 + SIGMA_DATA**2)
        return LCMState(
            timesteps=arrays.host_to_like(ts, like, integer=True),
            alpha_t=arrays.host_to_like(np.sqrt(a_t), like),
            sigma_t=arrays.host_to_like(np.sqrt(1.0 - a_t), like),
            x0_coef=arrays.host_to_like(np.sqrt(a_prev) * c_out, like),
            x_coef=arrays.host_to_like(np.sqrt(a_prev) * c_skip, like),
            noise_coef=arrays.host_to_like(np.sqrt(1.0 - a_prev), like),
            step_index=arrays.counter_like(like),
            init_noise_sigma=arrays.host_to_like(1.0, like),
        )

    def _custom_timesteps(self, timesteps, origin: np.ndarray, steps: int, strength: float):
        """Custom schedule, cut by ``strength``; also the index of the noise-free step.

        diffusers keeps ``num_inference_steps`` at the uncut length n, so its noise-free step
        is index n - 1 of the cut schedule: when ``strength`` cuts, every step adds noise.
        """
        T = self.options["num_train_timesteps"]
        ts = schedule.integer_timesteps(timesteps, T)
        if strength == 1.0 and ts[0] != T - 1:
            logger.warning("timesteps: the custom schedule starts at %d, not num_train_timesteps - 1", ts[0])
        off = sorted(set(ts[1:].tolist()) - set(origin.tolist()))
        if off:
            logger.warning("timesteps: %s are not on the original distillation schedule", off)
        if ts.size > steps:
            logger.warning("timesteps: %d custom timesteps exceed original_inference_steps=%d", ts.size, steps)
        n = ts.size
        start = max(n - min(int(n * strength), n), 0)
        if start >= n:
            raise ValueError(f"strength: {strength} leaves none of the {n} custom timesteps")
        return ts[start:], n - 1

    def noise_calls(self, state: LCMState, **_: Any) -> np.ndarray:
        """Every step but the final one (diffusers' step-index rule)."""
        return host_values(state.noise_coef) != 0

    def step(self, state: LCMState, model_output, sample, noise=None):
        """x_prev = sqrt(a_prev) (c_skip x_t + c_out x0) + sqrt(1 - a_prev) z; no z on the last step."""
        i = state.step_index
        cfg = self.options
        x0 = common.x0_from_output(cfg["prediction_type"], model_output, sample, state.alpha_t[i], state.sigma_t[i])
        x0 = common.clamp_x0(cfg, x0)
        prev_sample = state.x0_coef[i] * x0 + state.x_coef[i] * sample
        if self._noise_unless_unused(noise, state.noise_coef[i], "LCM re-noises between steps") is not None:
            prev_sample = prev_sample + state.noise_coef[i] * noise
        return prev_sample, state._replace(step_index=i + 1)


def _check_original_steps(steps: Any, T: int, key: str = "original_inference_steps") -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(f"{key}: must be an int in [1, num_train_timesteps={T}], got {steps!r}")


def _lcm_timesteps(origin: np.ndarray, n: int, steps: int, strength: float) -> np.ndarray:
    """n timesteps at evenly spaced indices of the reversed distillation schedule ``origin``."""
    if n > steps:
        raise ValueError(f"num_inference_steps: {n} exceeds original_inference_steps ({steps})")
    if origin.size < n:
        raise ValueError(f"num_inference_steps: {n} exceeds int(original_inference_steps * strength) = {origin.size}")
    idx = np.floor(np.linspace(0, origin.size, num=n, endpoint=False)).astype(np.int64)
    return origin[::-1][idx]
