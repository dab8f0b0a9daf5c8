"""Linear multistep (Adams-Bashforth) sampler in sigma space (Karras et al. 2022, EDM; k-diffusion's sample_lms).

``order`` is a step keyword in diffusers (default 4). Here the coefficient table and the
history buffer are sized at ``set_timesteps(..., order=K)`` (default 4); ``step(order=k)``
then accepts any k <= K, each step using min(i + 1, k) past slopes as diffusers does.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from diffusion_core import arrays
from diffusion_core.schedulers import sigma_base
from diffusion_core.schedulers.sigma_base import SigmaScheduler

DEFAULT_ORDER = 4
# columns of LMSState.coefs
_C_SKIP, _C_OUT, _INV_SIGMA = range(3)


class LMSState(NamedTuple):
    timesteps: Any  # (n,) float: the model's timestep at each step
    sigmas: Any  # (n + 1,) noise levels, the last one 0
    coefs: Any  # (n, 3) per step: c_skip, c_out, 1/sigma
    lms_coefs: Any  # (K, n, K) [k - 1, i]: order-k weights of the K buffered slopes, oldest first
    derivatives: Any  # (K,) + latents shape: the last K slopes, oldest first
    step_index: Any  # () int32 counter
    init_noise_sigma: Any  # () scale of the starting Gaussian draw


def lagrange_step_integrals(sigmas: np.ndarray, steps: np.ndarray, order: int) -> np.ndarray:
    """(m, order) integrals over [sigma_i, sigma_{i+1}] of the Lagrange basis on sigma_i, ..., sigma_{i-order+1}.

    Entry [., j] weighs the slope taken j steps back. The weights integrate every polynomial
    of degree < order exactly, so they solve the moment equations sum_j w_j v_j^p = 1/(p+1)
    in the scaled variable v = (tau - sigma_i) / (sigma_{i+1} - sigma_i) (float64, batched).
    """
    steps = np.asarray(steps)
    h = sigmas[steps + 1] - sigmas[steps]  # (m,)
    nodes = (sigmas[steps[:, None] - np.arange(order)] - sigmas[steps][:, None]) / h[:, None]  # (m, order)
    powers = np.arange(order)
    vandermonde_t = nodes[:, None, :] ** powers[None, :, None]  # (m, p, j) = v_j^p
    moments = np.broadcast_to(1.0 / (powers + 1.0), (steps.shape[0], order))[..., None]  # (m, p, 1)
    return np.linalg.solve(vandermonde_t, moments)[..., 0] * h[:, None]


def lms_table(sigmas: np.ndarray, max_order: int) -> np.ndarray:
    """(K, n, K) weights aligned with the slope buffer (oldest first) for each order k <= K."""
    n = sigmas.shape[0] - 1
    table = np.zeros((max_order, n, max_order))
    for k in range(1, max_order + 1):
        used = np.minimum(np.arange(n) + 1, k)  # warm-up: step i has i + 1 slopes
        for u in np.unique(used):
            steps = np.flatnonzero(used == u)
            table[k - 1, steps, max_order - u :] = lagrange_step_integrals(sigmas, steps, int(u))[:, ::-1]
    return table


class LMSDiscreteScheduler(SigmaScheduler):
    """x_{i+1} = x_i + sum_j c_ij d_{i-j}: the slope history integrated as a Lagrange polynomial."""

    step_options = frozenset({"order"})

    _defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        like: Any = None,
        *,
        timesteps: Any = None,
        sigmas: Any = None,
        order: int = DEFAULT_ORDER,
        begin_index: int = 0,
    ) -> LMSState:
        """As ``Scheduler.set_timesteps``; ``order``: the largest ``step(order=...)`` this state serves.

        With ``begin_index`` > 0 the slope history starts empty (zeros) while the order still counts
        from call 0, as in diffusers: the first calls use the leading coefficients of the higher-order
        rule only (diffusers' zip over the shorter derivative list).
        """
        if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
            raise ValueError(f"order: must be an int >= 1, got {order!r}")
        n, timesteps, sigmas = self._resolve_request(num_inference_steps, timesteps, sigmas)
        return self._build_state(n, like, begin_index, order=int(order))

    def _make_state(self, n, like, *, timesteps=None, sigmas=None, order: int = DEFAULT_ORDER) -> LMSState:
        ts, sig = sigma_base.sigma_schedule(self.options, self.train_sigmas, n)
        c_skip, c_out = sigma_base.denoiser_coefficients(self.options["prediction_type"], sig[:-1])
        return LMSState(
            timesteps=arrays.host_to_like(ts, like),
            sigmas=arrays.host_to_like(sig, like),
            coefs=arrays.host_to_like(np.stack([c_skip, c_out, 1.0 / sig[:-1]], axis=1), like),
            lms_coefs=arrays.host_to_like(lms_table(sig, order), like),
            derivatives=arrays.zeros_like_shape(like, (order,)),
            step_index=arrays.counter_like(like),
            init_noise_sigma=arrays.host_to_like(sigma_base.init_noise_sigma_for(self.options, sig), like),
        )

    def step(self, state: LMSState, model_output, sample, noise=None, *, order: int = DEFAULT_ORDER):
        """One LMS step of order min(i + 1, ``order``); ``order`` <= the state's (set_timesteps(order=...))."""
        max_order = state.derivatives.shape[0]
        if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not 1 <= order <= max_order:
            raise ValueError(f"order: must be an int in [1, {max_order}] (set_timesteps(order=...)), got {order!r}")
        xp = arrays.namespace(sample)
        i = state.step_index
        c = state.coefs[i]  # (3,)
        d = sigma_base.ode_slope(self.options, c[_C_SKIP], c[_C_OUT], c[_INV_SIGMA], model_output, sample)
        history = xp.concat([state.derivatives[1:], d[None, ...]], axis=0)  # (K,) + shape, oldest first
        weights = state.lms_coefs[order - 1, i]  # (K,)
        prev_sample = sample + xp.tensordot(weights, history, axes=1)
        return prev_sample, state._replace(derivatives=history, step_index=i + 1)
