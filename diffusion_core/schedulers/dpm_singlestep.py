"""Singlestep DPM-Solver / DPM-Solver++ (Lu et al. 2022, arXiv 2206.00927 and 2211.01095).

A k-th order step integrates from the sample at the start of its group of k model calls to the
next noise level, using the k model outputs of that group. Which order each step has, and every
coefficient of every step, is known once the schedule is: both are precomputed on the host (and
rewritten in terms of the current sample), so ``step`` is a gather plus one weighted sum over a
fixed-size output history.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from diffusion_core import arrays
from diffusion_core.schedulers import common, schedule
from diffusion_core.schedulers.base import LevelAlphaScheduler


class DPMSinglestepState(NamedTuple):
    timesteps: Any  # (n,) int: the model's timestep at each step
    sigmas: Any  # (n + 1,) VE (or flow) noise level of each step, then the final one
    alpha: Any  # (n,) VP alpha_t of each step's input sample
    sigma: Any  # (n,) VP sigma_t of each step's input (the raw sigma for flow_prediction)
    sample_coef: Any  # (n,) weight of the current sample
    output_coef: Any  # (n,) weight of this step's converted model output
    history_coef: Any  # (n, K - 1) weights of the previous K - 1 converted outputs, oldest first
    noise_coef: Any  # (n,) weight of this step's Gaussian draw (sde-dpmsolver++ only)
    prev_noise_coef: Any  # (n,) weight of the previous step's draw (sde-dpmsolver++ only)
    history: Any  # (K - 1, *sample.shape) previous converted model outputs, oldest first
    prev_noise: Any  # (*sample.shape) the previous step's draw (sde-dpmsolver++; else a () zero)
    step_index: Any  # () int32 counter
    init_noise_sigma: Any  # () 1.0


def order_list(n: int, solver_order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """The order of each of n steps: groups 1, 2, ..., solver_order, with a shorter group at the end."""
    k = solver_order
    if lower_order_final:
        full, rest = divmod(n, k)
        tail = list(range(1, rest + 1))
        if rest == 0 and k > 1:  # the last full group is replaced by two shorter ones
            full, tail = full - 1, list(range(1, k)) + [1]
        orders = list(range(1, k + 1)) * full + tail
    else:
        orders = list(range(1, k + 1)) * (n // k)
    if final_zero:
        orders[-1] = 1
    return orders


def _phi_weights(algorithm: str, h: float, alpha_t: float, sigma_t: float) -> tuple[float, float, float]:
    """Weights (w0, w1, w2) of D0, the first and the second divided difference (Lu et al. 2022)."""
    if algorithm == "dpmsolver":  # noise prediction, exponential integrator in e^h
        e = np.expm1(h)
        return -sigma_t * e, -sigma_t * (e / h - 1.0), -sigma_t * ((e - h) / h**2 - 0.5)
    if algorithm == "dpmsolver++":  # data prediction, in e^-h
        e = np.expm1(-h)
        return -alpha_t * e, alpha_t * (e / h + 1.0), -alpha_t * ((e + h) / h**2 - 0.5)
    q, hh = -np.expm1(-2.0 * h), -2.0 * h  # sde-dpmsolver++ (2211.01095, appendix: SDE variant)
    return alpha_t * q, alpha_t * (q / hh + 1.0), alpha_t * ((q + hh) / hh**2 - 0.5)


def _step_coefficients(k: int, i: int, lam, alpha, sigma, algorithm: str, heun: bool):
    """(sample weight, output weights over the last k outputs oldest first, noise weight) of step i."""
    s, t = i - k + 1, i + 1  # the group starts at step s; the step lands on noise level t
    h = lam[t] - lam[s]
    if algorithm == "dpmsolver":
        c_sample = alpha[t] / alpha[s]
    else:
        c_sample = sigma[t] / sigma[s] * (np.exp(-h) if algorithm == "sde-dpmsolver++" else 1.0)
    c_noise = sigma[t] * np.sqrt(-np.expm1(-2.0 * h)) if algorithm == "sde-dpmsolver++" else 0.0
    w0, w1, w2 = _phi_weights(algorithm, h, alpha[t], sigma[t])  # h = inf onto sigma = 0: w0 = alpha_t
    if k == 1:
        return c_sample, np.array([w0]), c_noise
    if k == 2:  # D0 = m1, D1 = (m0 - m1) / r0, outputs [m1, m0]
        r0 = (lam[i] - lam[s]) / h
        d0, d1 = np.array([1.0, 0.0]), np.array([-1.0, 1.0]) / r0
        return c_sample, w0 * d0 + (w1 if heun else 0.5 * w0) * d1, c_noise
    r0, r1 = (lam[i] - lam[s]) / h, (lam[i - 1] - lam[s]) / h  # outputs [m2, m1, m0]
    d0 = np.array([1.0, 0.0, 0.0])
    d1_0, d1_1 = np.array([-1.0, 1.0, 0.0]) / r1, np.array([-1.0, 0.0, 1.0]) / r0
    if not heun:
        return c_sample, w0 * d0 + w1 * d1_1, c_noise
    d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
    d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
    return c_sample, w0 * d0 + w1 * d1 + w2 * d2, c_noise


def _chain_through_sample(steps, orders, K: int):
    """Rewrite each step from its group's start sample S to the current sample x_i.

    Within a group x_i = C_{i-1} S + W_{i-1} m + N_{i-1} z_{i-1}, so the step S -> x_{i+1} is
    x_{i+1} = r x_i + (W_i - r W_{i-1}) m - r N_{i-1} z_{i-1} + N_i z_i with r = C_i / C_{i-1}
    (= sigma_{i+1} / sigma_i for DPM-Solver++: |r| <= 1, so no round-off is amplified). The state
    then needs neither S nor a branch on "group start". Returns (a (n,), w (n, K) over the last K
    outputs oldest first, noise (n,), previous-noise (n,)).
    """
    n = len(orders)
    a, w, z, z_prev = np.zeros(n), np.zeros((n, K)), np.zeros(n), np.zeros(n)
    for i, (c, weights, c_noise) in enumerate(steps):
        a[i], z[i] = c, c_noise
        w[i, K - len(weights) :] = weights
        if orders[i] > 1:  # same group as step i - 1
            r = a[i] = c / steps[i - 1][0]
            prev = np.zeros(K)
            prev[K - len(steps[i - 1][1]) - 1 : K - 1] = steps[i - 1][1]  # step i-1's window, shifted by one
            w[i] -= r * prev
            z_prev[i] = r * steps[i - 1][2]
    return a, w, z, z_prev


class DPMSolverSinglestepScheduler(LevelAlphaScheduler):
    """Singlestep DPM-Solver(++) of order 1-3, ODE or SDE (sde-dpmsolver++)."""

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
        "lower_order_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }
    _choices = {
        "prediction_type": ("epsilon", "v_prediction", "sample", "flow_prediction"),
        "solver_order": (1, 2, 3),
        "algorithm_type": ("dpmsolver", "dpmsolver++", "sde-dpmsolver++"),
        "solver_type": ("midpoint", "heun"),
        "variance_type": (None, "learned", "learned_range"),
        "time_shift_type": ("exponential", "linear"),  # only used with mu, which set_timesteps does not take
    }
    _aliases = {
        "algorithm_type": {"deis": "dpmsolver++"},
        "solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"},
    }
    accepts_timesteps = True
    tables_depend_on_begin_index = True

    def _init_from(self, config: dict[str, Any], extra: dict[str, Any]) -> None:
        # diffusers checks final_sigmas_type against the algorithm_type as given, before its alias
        if config.get("algorithm_type") == "deis" and config.get("final_sigmas_type", "zero") == "zero":
            raise ValueError(
                f"{type(self).__name__}: final_sigmas_type='zero' is not supported with algorithm_type='deis' "
                "(an alias of 'dpmsolver++'); use final_sigmas_type='sigma_min'"
            )
        super()._init_from(config, extra)

    def _check_config(self, config: dict[str, Any]) -> None:
        super()._check_config(config)
        name = type(self).__name__
        if config["algorithm_type"] == "dpmsolver" and config["final_sigmas_type"] == "zero":
            raise ValueError(
                f"{name}: final_sigmas_type='zero' is not supported with algorithm_type='dpmsolver'; "
                "use final_sigmas_type='sigma_min'"
            )
        if config["algorithm_type"] == "dpmsolver" and config["prediction_type"] == "flow_prediction":
            raise ValueError(
                f"{name}: prediction_type='flow_prediction' needs algorithm_type 'dpmsolver++' or 'sde-dpmsolver++'"
            )

    @property
    def needs_noise(self) -> bool:
        """sde-dpmsolver++ consumes one Gaussian draw per step."""
        return self.options["algorithm_type"] == "sde-dpmsolver++"

    # ----- host-side schedule -----------------------------------------------------------
    def _schedule(self, n: int, timesteps):
        """(int timesteps (n,), sigmas (n + 1,)) as diffusers' set_timesteps builds them."""
        cfg = self.options
        T = cfg["num_train_timesteps"]
        train_sigmas = schedule.sigmas_from_alphas_cumprod_f32(self.alphas_cumprod)  # diffusers' float32 table
        if timesteps is not None:
            ladder = schedule.chosen_sigma_ladder(cfg)
            if ladder is not None:
                raise ValueError(f"timesteps: custom timesteps cannot be combined with {ladder}=True")
            ts = schedule.integer_timesteps(timesteps, T)
        else:
            last = schedule.clipped_last_timestep(cfg, self.alphas_cumprod)
            ts = schedule.multistep_timesteps("linspace", T, n, last_timestep=last)
        ladder = schedule.multistep_ladder(cfg, train_sigmas, n)
        if ladder is None:
            sigmas = np.interp(ts, np.arange(T), train_sigmas)
        else:
            frac_t, sigmas = ladder
            # karras rounds; exponential/beta/flow are truncated by diffusers' int64 cast
            ts = (np.round(frac_t) if cfg["use_karras_sigmas"] else np.trunc(frac_t)).astype(np.int64)
        last = 0.0
        if cfg["final_sigmas_type"] == "sigma_min":
            last = schedule.sigmas_from_alphas_cumprod_f32(self.alphas_cumprod[:1])[0]
        return ts, np.concatenate([sigmas, [last]]).astype(np.float32).astype(np.float64)  # diffusers: float32

    def _make_state(self, n, like, *, timesteps=None, sigmas=None, begin_index: int = 0) -> DPMSinglestepState:
        cfg = self.options
        ts, sig = self._schedule(n, timesteps)
        flow = bool(cfg["use_flow_sigmas"])
        alpha, sigma = common.vp_alpha_sigma(sig, flow=flow)
        lam = schedule.half_log_snr(alpha, sigma)
        K, final_zero = cfg["solver_order"], cfg["final_sigmas_type"] == "zero"
        # diffusers switches lower_order_final on for uneven step counts and for a zero final sigma
        lower_final = cfg["lower_order_final"] or n % K != 0 or final_zero
        # a run starting at step `begin_index` has no outputs before it: the first group is cut short
        # there (diffusers lowers the order while model_outputs[-order] is None)
        orders = np.minimum(order_list(n, K, lower_final, final_zero), np.arange(n) - begin_index + 1).clip(1).tolist()
        heun = cfg["solver_type"] == "heun"
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            steps = [
                _step_coefficients(k, i, lam, alpha, sigma, cfg["algorithm_type"], heun) for i, k in enumerate(orders)
            ]
        a, w, z, z_prev = _chain_through_sample(steps, orders, K)
        conv_sigma = sig[:n] if cfg["prediction_type"] == "flow_prediction" else sigma[:n]
        return DPMSinglestepState(
            timesteps=arrays.host_to_like(ts, like, integer=True),
            sigmas=arrays.host_to_like(sig, like),
            alpha=arrays.host_to_like(alpha[:n], like),
            sigma=arrays.host_to_like(conv_sigma, like),
            sample_coef=arrays.host_to_like(a, like),
            output_coef=arrays.host_to_like(w[:, -1], like),
            history_coef=arrays.host_to_like(w[:, :-1], like),
            noise_coef=arrays.host_to_like(z, like),
            prev_noise_coef=arrays.host_to_like(z_prev, like),
            history=arrays.zeros_like_shape(like, (K - 1,)),
            prev_noise=arrays.zeros_like_shape(like) if self.needs_noise else arrays.host_to_like(0.0, like),
            step_index=arrays.counter_like(like),
            init_noise_sigma=arrays.host_to_like(1.0, like),
        )

    # ----- sampling ---------------------------------------------------------------------
    def _convert(self, state: DPMSinglestepState, model_output, sample):
        """The data prediction x0 (dpmsolver++) or noise prediction eps (dpmsolver), thresholded."""
        cfg = self.options
        i = state.step_index
        if cfg["variance_type"] is not None:  # learned variance: keep the mean channels
            model_output = model_output[:, : sample.shape[1]]
        alpha, sigma = state.alpha[i], state.sigma[i]
        pred = cfg["prediction_type"]
        if cfg["algorithm_type"] != "dpmsolver":
            return common.clamp_x0(cfg, common.x0_from_output(pred, model_output, sample, alpha, sigma))
        eps = common.eps_from_output(pred, model_output, sample, alpha, sigma)
        if cfg["thresholding"]:  # diffusers crashes here; we threshold x0 at this step's noise level
            x0 = common.clamp_x0(cfg, (sample - sigma * eps) / alpha)
            eps = (sample - alpha * x0) / sigma
        return eps

    def step(self, state: DPMSinglestepState, model_output, sample, noise=None, **_: Any):
        """x_next = a x + w m + sum_k w_k m_k (+ c z - c' z_prev): one DPM-Solver update, order from the table."""
        xp = arrays.namespace(sample)
        i = state.step_index
        m = self._convert(state, model_output, sample)
        prev_sample = state.sample_coef[i] * sample + state.output_coef[i] * m
        K = self.options["solver_order"]
        if K > 1:
            prev_sample = prev_sample + xp.tensordot(state.history_coef[i], state.history, axes=1)
        history = m[None, ...] if K == 2 else common.push_history(state.history, m) if K > 2 else state.history
        prev_noise = state.prev_noise
        if self.needs_noise:
            prev_noise = self._require_noise(noise, "sde-dpmsolver++")
            prev_sample = prev_sample + state.noise_coef[i] * prev_noise - state.prev_noise_coef[i] * state.prev_noise
        return prev_sample, state._replace(history=history, prev_noise=prev_noise, step_index=i + 1)
