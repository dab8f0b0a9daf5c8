"""Flow-matching Euler: integrate the rectified-flow ODE dx/ds = v (Lipman et al. 2023, arXiv 2210.02747).

x_s = (1 - s) x_0 + s noise, the network predicts v = noise - x_0, and one step is
x_{s'} = x_s + (s' - s) v. Sigmas are time-shifted for resolution (SD3, Esser et al. 2024;
Flux's dynamic ``mu``). There is no VP training table, so this subclasses ``Scheduler`` directly.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from diffusion_core import arrays
from diffusion_core.schedulers import common, schedule
from diffusion_core.schedulers.base import Scheduler


class FlowMatchEulerState(NamedTuple):
    timesteps: Any  # (n,) float: s * num_train_timesteps (or the custom timesteps as given)
    sigmas: Any  # (n + 1,) flow sigmas s, the last one terminal (0, or 1 with invert_sigmas)
    dt: Any  # (n,) s_{i+1} - s_i
    step_index: Any  # () int32 counter
    init_noise_sigma: Any  # () 1.0: the start is pure noise


class FlowMatchEulerDiscreteScheduler(Scheduler):
    """Euler steps of a velocity-predicting flow model; optionally re-noised (stochastic_sampling)."""

    _defaults = {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "time_shift_type": "exponential",
        "stochastic_sampling": False,
    }
    _choices = {"time_shift_type": ("exponential", "linear")}
    accepts_timesteps = True
    accepts_sigmas = True
    steps_bounded_by_training = False

    def _check_config(self, config: dict[str, Any]) -> None:
        super()._check_config(config)
        shift = config["shift"]
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
            raise ValueError(f"{type(self).__name__}: shift must be a number > 0, got {shift!r}")
        terminal = config["shift_terminal"]
        if terminal and not (isinstance(terminal, (int, float)) and 0 < terminal < 1):
            raise ValueError(f"{type(self).__name__}: shift_terminal must be None or in (0, 1), got {terminal!r}")

    @property
    def needs_noise(self) -> bool:
        """stochastic_sampling re-noises every step with a fresh Gaussian draw."""
        return bool(self.options["stochastic_sampling"])

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        like: Any = None,
        *,
        timesteps: Any = None,
        sigmas: Any = None,
        mu: float | None = None,
        begin_index: int = 0,
    ) -> FlowMatchEulerState:
        """As ``Scheduler.set_timesteps``, plus ``mu`` (the dynamic shift, required with use_dynamic_shifting).

        ``timesteps`` and ``sigmas`` may be given together (same length): timesteps feed the model,
        sigmas drive the step, as in diffusers.
        """
        if self.options["use_dynamic_shifting"] and mu is None:
            raise ValueError("mu: required when use_dynamic_shifting=True (e.g. from the image sequence length)")
        if timesteps is not None and sigmas is not None:
            _, timesteps, _ = self._resolve_request(None, timesteps, None)
            n, _, sigmas = self._resolve_request(None, None, sigmas)
            if timesteps.size != n:
                raise ValueError(f"timesteps, sigmas: need the same length, got {timesteps.size} and {n}")
        else:
            n, timesteps, sigmas = self._resolve_request(num_inference_steps, timesteps, sigmas)
        if num_inference_steps is not None and n != num_inference_steps:
            raise ValueError(f"num_inference_steps: {num_inference_steps} differs from the {n} custom entries given")
        return self._build_state(n, like, begin_index, timesteps=timesteps, sigmas=sigmas, mu=mu)

    def dynamic_shift_mu(self, image_seq_len: int) -> float:
        """The ``mu`` for ``set_timesteps`` at ``image_seq_len`` latent tokens (diffusers' Flux calculate_shift)."""
        cfg = self.options
        return schedule.flow_shift_mu(
            image_seq_len, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"]
        )

    def _shifted(self, sigmas: np.ndarray, mu: float | None) -> np.ndarray:
        """Resolution shift: Flux's dynamic ``mu`` or SD3's static ``shift``."""
        cfg = self.options
        if cfg["use_dynamic_shifting"]:
            return schedule.flow_time_shift(sigmas, float(mu), cfg["time_shift_type"])
        return schedule.flow_shift(sigmas, float(cfg["shift"]))

    def _train_ends(self) -> tuple[float, float]:
        """(sigma_max, sigma_min) of diffusers' float32 training ladder (statically shifted unless dynamic)."""
        cfg = self.options
        T = cfg["num_train_timesteps"]
        ends = np.asarray([T, 1.0], np.float32) / np.float32(T)  # float32 t / T at t = T and t = 1
        if not cfg["use_dynamic_shifting"]:
            shift = float(cfg["shift"])
            ends = np.float32(shift) * ends / (np.float32(1.0) + np.float32(shift - 1.0) * ends)
        return float(ends[0]), float(ends[1])

    def _make_state(self, n, like, *, timesteps=None, sigmas=None, mu=None) -> FlowMatchEulerState:
        cfg = self.options
        T = cfg["num_train_timesteps"]
        # custom values are rounded to float32 first, as diffusers does
        timesteps = None if timesteps is None else np.asarray(timesteps, np.float32).astype(np.float64)
        sigmas = None if sigmas is None else np.asarray(sigmas, np.float32).astype(np.float64)
        if sigmas is None:
            if timesteps is None:  # evenly spaced between the training ladder's ends
                s_max, s_min = self._train_ends()
                sigmas = np.linspace(s_max * T, s_min * T, n) / T
            else:
                sigmas = timesteps / T
        sigmas = self._shifted(sigmas, mu)
        if cfg["shift_terminal"]:
            sigmas = schedule.stretch_to_terminal(sigmas, float(cfg["shift_terminal"]))
        own = {k: cfg[k] for k in self._defaults}  # not sigma_min/max kept from a swapped config
        # diffusers keeps float32 sigmas and float32 timesteps = sigmas * T: round as it does
        sigmas = schedule.convert_sigmas(own, sigmas, n).astype(np.float32)
        if cfg["invert_sigmas"]:
            sigmas = np.float32(1.0) - sigmas
        ts = sigmas * np.float32(T) if timesteps is None or cfg["invert_sigmas"] else timesteps
        sigmas = sigmas.astype(np.float64)
        full = np.concatenate([sigmas, [1.0 if cfg["invert_sigmas"] else 0.0]])
        return FlowMatchEulerState(
            timesteps=arrays.host_to_like(ts, like),
            sigmas=arrays.host_to_like(full, like),
            dt=arrays.host_to_like(np.diff(full), like),
            step_index=arrays.counter_like(like),
            init_noise_sigma=arrays.host_to_like(1.0, like),
        )

    def step(self, state: FlowMatchEulerState, model_output, sample, noise=None):
        """x_{s'} = x_s + (s' - s) v; stochastic: x_{s'} = (1 - s') x0 + s' noise, x0 = x_s - s v."""
        i = state.step_index
        new_state = state._replace(step_index=i + 1)
        if not self.needs_noise:
            return sample + state.dt[i] * model_output, new_state
        noise = self._require_noise(noise, "stochastic_sampling=True")
        sigma, sigma_next = state.sigmas[i], state.sigmas[i + 1]
        x0 = sample - sigma * model_output
        return (1 - sigma_next) * x0 + sigma_next * noise, new_state

    def add_noise(self, original_samples, noise, timesteps, state: FlowMatchEulerState | None = None):
        """diffusers' ``scale_noise``: s noise + (1 - s) x_0.

        With ``state``: s of the scheduled step whose timestep is nearest; without: s = t / T.
        """
        like = original_samples
        if state is not None:
            alpha, sigma = common.scheduled_alpha_sigma(state.timesteps, state.sigmas, timesteps, like, flow=True)
        else:
            xp = arrays.namespace(like)
            t = xp.astype(arrays.as_index_array(timesteps, like), like.dtype)
            alpha, sigma = common.vp_alpha_sigma(t / self.options["num_train_timesteps"], flow=True)
        nd = original_samples.ndim
        return arrays.broadcast_left(alpha, nd) * original_samples + arrays.broadcast_left(sigma, nd) * noise

    def scale_noise(self, sample, timestep, noise, state: FlowMatchEulerState | None = None):
        """diffusers' name for ``add_noise`` (argument order as there)."""
        return self.add_noise(sample, noise, timestep, state=state)
