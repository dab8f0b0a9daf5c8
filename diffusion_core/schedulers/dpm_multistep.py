"""DPM-Solver and DPM-Solver++ multistep samplers, ODE and SDE (Lu et al. 2022, arXiv 2206.00927, 2211.01095).

Each step is one linear combination x_t = a_i x_s + sum_k w_ik m_k (+ c_i z) of the current
sample, a buffer of the last K converted model outputs m (data predictions x0 for the "++"
variants, noise predictions eps otherwise) and, for the SDE variants, a Gaussian draw z.
Warm-up and lower-order-final orders depend only on the step index, so every coefficient is
computed once per ``set_timesteps`` on the host in float64: ``step`` is a row gather, the
model-output conversion and one weighted sum.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from diffusion_core import arrays
from diffusion_core.schedulers import common, schedule
from diffusion_core.schedulers.base import LevelAlphaScheduler


class MultistepState(NamedTuple):
    timesteps: Any  # (n,) int: the model's timestep at each step
    sigmas: Any  # (n + 1,) noise level per step (VE sigma, or flow sigma), terminal level last
    alpha_s: Any  # (n,) VP alpha_t of the step's level (model-output conversion)
    sigma_s: Any  # (n,) VP sigma_t of the step's level
    sample_coef: Any  # (n,) weight of the current sample
    history_coef: Any  # (n, K) weights of the K buffered outputs, oldest first (0 while warming up)
    noise_coef: Any  # (n,) weight of the Gaussian draw (0 for ODE solvers)
    history: Any  # (K, *sample.shape) converted model outputs, oldest first
    step_index: Any  # () int32 counter
    init_noise_sigma: Any  # () 1.0


class VPMultistepScheduler(LevelAlphaScheduler):
    """Abstract: exponential-integrator multistep solvers on a VP schedule (DPM-Solver, DEIS)."""

    _floors_zero_snr = True
    tables_depend_on_begin_index = True  # the order warm-up restarts at the first executed step

    def _setup(self) -> None:
        super()._setup()
        self.train_sigmas = schedule.sigmas_from_alphas_cumprod(self.alphas_cumprod)  # (T,) VE, low to high

    def _check_config(self, config: dict[str, Any]) -> None:
        super()._check_config(config)
        order = config["solver_order"]
        if not isinstance(order, int) or isinstance(order, bool) or order not in (1, 2, 3):
            raise ValueError(f"{type(self).__name__}: solver_order={order!r}; accepted: 1, 2, 3")

    @abc.abstractmethod
    def _levels(self, n: int, timesteps: np.ndarray | None, cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Host ``(int timesteps (m,), noise levels (m + 1,))``, terminal level last, for config ``cfg``."""

    @abc.abstractmethod
    def _lower_order(self, m: int) -> tuple[bool, bool]:
        """Whether the last step is first order and the second-to-last at most second order."""

    @abc.abstractmethod
    def _coefficients(self, levels: np.ndarray, orders: np.ndarray):
        """Host ``(sample_coef (m,), weights (m, 3) of m0, m1, m2, noise_coef (m,))``."""

    @abc.abstractmethod
    def _convert(self, state: MultistepState, i, model_output, sample):
        """The buffered quantity (x0 or eps) from the raw model output at step ``i``."""

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        like: Any = None,
        *,
        timesteps: Any = None,
        sigmas: Any = None,
        mu: float | None = None,
        begin_index: int = 0,
    ) -> MultistepState:
        """As ``Scheduler.set_timesteps``, plus ``mu``: flow_shift = exp(mu) for this schedule only
        (needs use_dynamic_shifting; diffusers instead overwrites its config)."""
        if mu is not None and not self.options["use_dynamic_shifting"]:
            raise ValueError("mu: only accepted with use_dynamic_shifting=True")
        n, timesteps, sigmas = self._resolve_request(num_inference_steps, timesteps, sigmas)
        return self._build_state(n, like, begin_index, timesteps=timesteps, sigmas=sigmas, mu=mu)

    def _make_state(self, n, like, *, timesteps=None, sigmas=None, mu=None, begin_index: int = 0) -> MultistepState:
        cfg = self.options if mu is None else {**self.options, "flow_shift": float(np.exp(mu))}
        ts, levels = self._levels(n, timesteps, cfg)
        levels = levels.astype(np.float32).astype(np.float64)  # diffusers keeps float32 levels
        m, K = ts.shape[0], self.options["solver_order"]
        orders = schedule.multistep_orders(m, K, *self._lower_order(m), begin_index=begin_index)
        sample_coef, weights, noise_coef = self._coefficients(levels, orders)
        alpha, sigma = common.vp_alpha_sigma(levels[:-1], bool(self.options["use_flow_sigmas"]))
        return MultistepState(
            timesteps=arrays.host_to_like(ts, like, integer=True),
            sigmas=arrays.host_to_like(levels, like),
            alpha_s=arrays.host_to_like(alpha, like),
            sigma_s=arrays.host_to_like(sigma, like),
            sample_coef=arrays.host_to_like(sample_coef, like),
            history_coef=arrays.host_to_like(weights[:, :K][:, ::-1], like),
            noise_coef=arrays.host_to_like(noise_coef, like),
            history=arrays.zeros_like_shape(like, (K,)),
            step_index=arrays.counter_like(like),
            init_noise_sigma=arrays.host_to_like(1.0, like),
        )

    def _ladder_or_spaced(self, n: int, cfg: Mapping[str, Any], round_ladder: bool, last_timestep: int | None = None):
        """Timesteps (int) and n levels: the configured ladder, else the spaced training sigmas."""
        # float32 log-sigma table in sigma_to_t, as diffusers (it decides where timesteps truncate)
        ladder = schedule.multistep_ladder(cfg, self.train_sigmas.astype(np.float32), n)
        if ladder is None:
            ts = schedule.multistep_timesteps(
                cfg["timestep_spacing"], cfg["num_train_timesteps"], n, cfg["steps_offset"], last_timestep
            )
            return ts, self.train_sigmas[ts]
        ts, levels = ladder
        return (np.round(ts) if round_ladder else ts).astype(np.int64), levels

    def step(self, state: MultistepState, model_output, sample, noise=None):
        """x_t = a x_s + sum_k w_k m_k (+ c z): one precomputed multistep update."""
        i = state.step_index
        m0 = self._convert(state, i, model_output, sample)
        history = common.push_history(state.history, m0)
        prev_sample = common.linear_multistep(state.sample_coef[i], sample, state.history_coef[i], history)
        if self.needs_noise:
            prev_sample = prev_sample + state.noise_coef[i] * self._require_noise(noise, "SDE variant")
        return prev_sample, state._replace(history=history, step_index=i + 1)


# ----- DPM-Solver coefficients, per variant -----
class DPMCoefficients(NamedTuple):
    """Host (n,) weights of one DPM-Solver update x_t = sample * x_s + d0 D0 + d1 D1 + d2 D2 (+ noise * z).

    D0 is the newest converted output, D1 / D2 its first / second divided differences in lambda.
    Each variant maps h = lambda_t - lambda_s and the VP (alpha, sigma) at t and s to these weights;
    e.g. DPM-Solver++ (ODE): sample = sigma_t / sigma_s, d0 = alpha_t (1 - e^-h), d1_midpoint = d0 / 2,
    d1_heun = alpha_t ((e^-h - 1) / h + 1), d2 = alpha_t (1/2 - (e^-h - 1 + h) / h^2), computed with expm1.
    """

    sample: np.ndarray  # weight of x_s
    d0: np.ndarray  # weight of D0
    d1_midpoint: np.ndarray  # weight of D1, solver_type "midpoint"
    d1_heun: np.ndarray  # weight of D1, solver_type "heun" (and the third-order update)
    d2: np.ndarray  # weight of D2 (third order only)
    noise: np.ndarray  # weight of the Gaussian draw z (0 for ODE variants)


def _dpmpp_ode(h, a_t, s_t, a_s, s_s) -> DPMCoefficients:
    """DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095, eqs. 9-10 and Alg. 2)."""
    em = np.expm1(-h)
    c0 = -a_t * em
    return DPMCoefficients(
        s_t / s_s, c0, 0.5 * c0, a_t * (em / h + 1.0), -a_t * ((em + h) / h**2 - 0.5), np.zeros_like(h)
    )


def _dpmpp_sde(h, a_t, s_t, a_s, s_s) -> DPMCoefficients:
    """SDE-DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095, app. B; Gonzalez et al. 2023, arXiv 2305.14267)."""
    e2 = np.expm1(-2.0 * h)
    c0 = -a_t * e2
    c2 = a_t * ((-e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
    return DPMCoefficients(s_t / s_s * np.exp(-h), c0, 0.5 * c0, a_t * (e2 / (2.0 * h) + 1.0), c2, s_t * np.sqrt(-e2))


def _dpm_ode(h, a_t, s_t, a_s, s_s) -> DPMCoefficients:
    """DPM-Solver (Lu et al. 2022, arXiv 2206.00927, eq. 3.7 and multistep Alg.)."""
    ep = np.expm1(h)
    c0 = -s_t * ep
    return DPMCoefficients(
        a_t / a_s, c0, 0.5 * c0, -s_t * (ep / h - 1.0), -s_t * ((ep - h) / h**2 - 0.5), np.zeros_like(h)
    )


def _dpm_sde(h, a_t, s_t, a_s, s_s) -> DPMCoefficients:
    """SDE-DPM-Solver (Lu et al. 2022, arXiv 2211.01095, app. B); it has no third order."""
    ep = np.expm1(h)
    c0 = -2.0 * s_t * ep
    no_c2 = np.full_like(h, np.nan)
    return DPMCoefficients(
        a_t / a_s, c0, 0.5 * c0, -2.0 * s_t * (ep / h - 1.0), no_c2, s_t * np.sqrt(np.expm1(2.0 * h))
    )


_VARIANTS = {"dpmsolver++": _dpmpp_ode, "sde-dpmsolver++": _dpmpp_sde, "dpmsolver": _dpm_ode, "sde-dpmsolver": _dpm_sde}


def dpm_coefficients(config, levels: np.ndarray, orders: np.ndarray):
    """Host ``(cx, weights (n, 3) of m0, m1, m2, cz)``: the D0/D1/D2 differences folded into weights.

    Orders 2 and 3 use D1 = (m0 - m1) / r0 and the second divided difference of Lu et al.
    (2022b, Alg. 2 and its third-order extension), r_k = h_{k} / h the step ratios in lambda.
    """
    n = orders.shape[0]
    alpha, sigma = common.vp_alpha_sigma(levels, bool(config["use_flow_sigmas"]))
    variant = _VARIANTS[config["algorithm_type"]]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lam = schedule.half_log_snr(alpha, sigma)  # (n + 1,); +inf at a zero terminal level
        h = lam[1:] - lam[:-1]
        lam1, lam2 = schedule.lagged(lam, n, 1), schedule.lagged(lam, n, 2)
        r0, r1 = (lam[:-1] - lam1) / h, (lam1 - lam2) / h
        co = variant(h, alpha[1:], sigma[1:], alpha[:-1], sigma[:-1])
        c0, c1_heun, c2 = co.d0, co.d1_heun, co.d2
        c1 = co.d1_midpoint if config["solver_type"] == "midpoint" else c1_heun
        zeros = np.zeros(n)
        second = np.stack([c0 + c1 / r0, -c1 / r0, zeros], axis=1)
        k, q = r0 / (r0 + r1), 1.0 / (r0 + r1)  # D1 = (1 + k) D1_0 - k D1_1, D2 = q (D1_0 - D1_1)
        a, b = c1_heun * (1.0 + k) + c2 * q, c1_heun * k + c2 * q
        third = np.stack([c0 + a / r0, -a / r0 - b / r1, b / r1], axis=1)
    first = np.stack([c0, zeros, zeros], axis=1)
    weights = np.select([orders[:, None] == 1, orders[:, None] == 2], [first, second], third)
    return co.sample, weights, co.noise


class DPMSolverMultistepScheduler(VPMultistepScheduler):
    """Multistep DPM-Solver(++) of order 1-3, ODE or SDE (Lu et al. 2022, arXiv 2211.01095)."""

    accepts_timesteps = True
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
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }
    _choices = {
        "prediction_type": ("epsilon", "sample", "v_prediction", "flow_prediction"),
        "algorithm_type": tuple(_VARIANTS),
        "solver_type": ("midpoint", "heun"),
        "variance_type": (None, "learned", "learned_range"),
        "time_shift_type": ("exponential",),
    }
    # diffusers rewrites these on load (configs swapped in from DEIS / UniPC)
    _aliases = {
        "algorithm_type": {"deis": "dpmsolver++"},
        "solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"},
        # DDPM's variance types (a swapped DDPM config): diffusers only acts on learned / learned_range
        "variance_type": {v: None for v in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")},
    }

    def _check_config(self, config: dict[str, Any]) -> None:
        super()._check_config(config)
        name, algo = type(self).__name__, config["algorithm_type"]
        if algo in ("dpmsolver", "sde-dpmsolver"):
            if config["final_sigmas_type"] == "zero":
                raise ValueError(
                    f"{name}: final_sigmas_type='zero' is not supported with algorithm_type={algo!r}; "
                    "use final_sigmas_type='sigma_min'"
                )
            if config["prediction_type"] == "flow_prediction":
                raise ValueError(
                    f"{name}: prediction_type='flow_prediction' needs algorithm_type 'dpmsolver++' or 'sde-dpmsolver++'"
                )

    @property
    def needs_noise(self) -> bool:
        """The SDE variants consume one Gaussian draw per step."""
        return self.options["algorithm_type"].startswith("sde-")

    def _levels(self, n, timesteps, cfg):
        if timesteps is not None:
            for key in (*schedule.SIGMA_LADDERS, "use_lu_lambdas", "use_flow_sigmas"):
                if cfg[key]:
                    raise ValueError(f"timesteps: custom timesteps cannot be combined with {key}=True")
            ts = timesteps.astype(np.int64)
            if ts[0] >= cfg["num_train_timesteps"] or ts[-1] < 0:
                raise ValueError(f"timesteps: must lie in [0, num_train_timesteps - 1], got {timesteps.tolist()}")
            levels = self.train_sigmas[ts]
        else:
            rounded = cfg["beta_schedule"] != "squaredcos_cap_v2"
            round_ladder = rounded and (cfg["use_karras_sigmas"] or cfg["use_lu_lambdas"])
            last_t = schedule.clipped_last_timestep(cfg, self.alphas_cumprod)
            ts, levels = self._ladder_or_spaced(n, cfg, round_ladder, last_t)
        last = self.train_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        return ts, np.concatenate([levels, [last]])

    def _lower_order(self, m):
        cfg = self.options
        short = cfg["lower_order_final"] and m < 15
        return bool(cfg["euler_at_final"] or short or cfg["final_sigmas_type"] == "zero"), bool(short)

    def _coefficients(self, levels, orders):
        if self.options["algorithm_type"] == "sde-dpmsolver" and np.any(orders == 3):
            raise ValueError(
                "solver_order: algorithm_type='sde-dpmsolver' has no third-order update (diffusers neither); "
                "use solver_order <= 2, or lower_order_final with fewer than 15 steps"
            )
        return dpm_coefficients(self.options, levels, orders)

    def _convert(self, state, i, model_output, sample):
        """x0 (DPM-Solver++) or eps (DPM-Solver) from the model output, thresholded in x0."""
        cfg = self.options
        pred = cfg["prediction_type"]
        if cfg["variance_type"] is not None and pred == "epsilon":
            model_output = model_output[:, : sample.shape[1]]  # drop the learned-variance channels
        alpha, sigma = state.alpha_s[i], state.sigma_s[i]
        if cfg["algorithm_type"].endswith("++"):
            level = state.sigmas[i] if pred == "flow_prediction" else sigma
            return common.clamp_x0(cfg, common.x0_from_output(pred, model_output, sample, alpha, level))
        if not cfg["thresholding"]:
            return common.eps_from_output(pred, model_output, sample, alpha, sigma)
        x0 = common.clamp_x0(cfg, common.x0_from_output(pred, model_output, sample, alpha, sigma))
        return common.eps_from_output("sample", x0, sample, alpha, sigma)
