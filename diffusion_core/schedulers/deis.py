"""DEIS: diffusion exponential integrator sampler, log-rho multistep (Zhang & Chen 2022, arXiv 2204.13902).

The noise prediction is extrapolated by a Lagrange polynomial in log(rho), rho = sigma_t /
alpha_t, and integrated exactly (the "tAB-DEIS" variant, eq. 15). The integrals depend only on
the noise levels, so they are tabulated per step on the host; ``step`` reuses the DPM-Solver
multistep machinery (a buffer of eps predictions and one weighted sum).
"""

from __future__ import annotations

import numpy as np

from diffusion_core.schedulers import common, schedule
from diffusion_core.schedulers.dpm_multistep import VPMultistepScheduler


def _integral2(rho_t, lt, lb, lc):
    """Antiderivative in rho of the order-2 Lagrange basis through log-rho nodes b, c (value at t)."""
    return rho_t * (lt - lc - 1.0) / (lb - lc)


def _integral3(rho_t, lt, lb, lc, ld):
    """Antiderivative in rho of the order-3 Lagrange basis through log-rho nodes b, c, d (value at t)."""
    num = lc * (ld - lt + 1.0) - ld * lt + ld + lt**2 - 2.0 * lt + 2.0
    return rho_t * num / ((lb - lc) * (lb - ld))


def deis_coefficients(levels: np.ndarray, orders: np.ndarray, flow: bool):
    """Host ``(sample_coef (n,), weights (n, 3) of eps_0, eps_1, eps_2)`` of log-rho DEIS."""
    n = orders.shape[0]
    alpha, sigma = common.vp_alpha_sigma(levels, flow)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rho = sigma / alpha
        log_rho = np.log(rho)
        r_t, r_0 = rho[1:], rho[:-1]
        lt, l0, l1, l2 = log_rho[1:], log_rho[:-1], schedule.lagged(log_rho, n, 1), schedule.lagged(log_rho, n, 2)
        a_t = alpha[1:]
        first = -sigma[1:] * np.expm1(l0 - lt)  # exact exponential-integrator Euler step, h = l0 - lt
        second = [
            _integral2(r_t, lt, l0, l1) - _integral2(r_0, l0, l0, l1),
            _integral2(r_t, lt, l1, l0) - _integral2(r_0, l0, l1, l0),
        ]
        third = [
            _integral3(r_t, lt, l0, l1, l2) - _integral3(r_0, l0, l0, l1, l2),
            _integral3(r_t, lt, l1, l2, l0) - _integral3(r_0, l0, l1, l2, l0),
            _integral3(r_t, lt, l2, l0, l1) - _integral3(r_0, l0, l2, l0, l1),
        ]
        zeros = np.zeros(n)
        w1 = np.stack([first, zeros, zeros], axis=1)
        w2 = a_t[:, None] * np.stack([*second, zeros], axis=1)
        w3 = a_t[:, None] * np.stack(third, axis=1)
    weights = np.select([orders[:, None] == 1, orders[:, None] == 2], [w1, w2], w3)
    return a_t / alpha[:-1], weights


class DEISMultistepScheduler(VPMultistepScheduler):
    """Multistep log-rho DEIS of order 1-3 (Zhang & Chen 2022, arXiv 2204.13902)."""

    _defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "deis",
        "solver_type": "logrho",
        "lower_order_final": True,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }
    _choices = {
        "prediction_type": ("epsilon", "sample", "v_prediction", "flow_prediction"),
        "algorithm_type": ("deis",),
        "solver_type": ("logrho",),
        "time_shift_type": ("exponential",),
    }
    # diffusers rewrites these on load (configs swapped in from DPM-Solver / UniPC)
    _aliases = {
        "algorithm_type": {"dpmsolver": "deis", "dpmsolver++": "deis"},
        "solver_type": {"midpoint": "logrho", "heun": "logrho", "bh1": "logrho", "bh2": "logrho"},
    }

    def _levels(self, n, timesteps, cfg):
        ts, levels = self._ladder_or_spaced(n, cfg, round_ladder=bool(cfg["use_karras_sigmas"]))
        ladders = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas")
        if any(cfg[k] for k in ladders):
            return ts, np.concatenate([levels, levels[-1:]])  # the last step stays put (diffusers)
        return ts, np.concatenate([levels, self.train_sigmas[:1]])

    def _lower_order(self, m):
        short = bool(self.options["lower_order_final"] and m < 15)
        return short, short

    def _coefficients(self, levels, orders):
        sample_coef, weights = deis_coefficients(levels, orders, bool(self.options["use_flow_sigmas"]))
        return sample_coef, weights, np.zeros_like(sample_coef)

    def _convert(self, state, i, model_output, sample):
        """Noise prediction eps, taken through x0 when thresholding or flow prediction needs it."""
        cfg = self.options
        pred = cfg["prediction_type"]
        alpha, sigma = state.alpha_s[i], state.sigma_s[i]
        if not cfg["thresholding"] and pred != "flow_prediction":
            return common.eps_from_output(pred, model_output, sample, alpha, sigma)
        level = state.sigmas[i] if pred == "flow_prediction" else sigma
        x0 = common.clamp_x0(cfg, common.x0_from_output(pred, model_output, sample, alpha, level))
        return common.eps_from_output("sample", x0, sample, alpha, sigma)
