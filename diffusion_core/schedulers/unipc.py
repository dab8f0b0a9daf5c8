"""UniPC: unified predictor-corrector multistep sampling (Zhao et al. 2023, arXiv 2302.04867).

Each step first corrects the previous prediction with the new model output (UniC), then
predicts the next sample (UniP). Both are linear in the current sample, the previous sample
and the history of converted model outputs; their weights (the rhos of a small linear system
that depends only on step sizes) are solved per step on the host in float64 and folded into
one linear update, so ``step`` is one weighted sum over a fixed-size history.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from diffusion_core import arrays
from diffusion_core.schedulers import common, schedule
from diffusion_core.schedulers.base import LevelAlphaScheduler


class UniPCState(NamedTuple):
    timesteps: Any  # (m,) int: the model's timestep at each step
    sigmas: Any  # (m + 1,) VE (or flow) noise level of each step, then the final one
    alpha: Any  # (m,) VP alpha_t of each step's input sample
    sigma: Any  # (m,) VP sigma_t of each step's input (the raw sigma for flow_prediction)
    sample_coef: Any  # (m,) weight of the current (uncorrected) sample
    output_coef: Any  # (m,) weight of this step's converted model output
    history_coef: Any  # (m, K) weights of the previous K converted outputs, oldest first
    history: Any  # (K, *sample.shape) converted model outputs of the previous K steps, oldest first
    step_index: Any  # () int32 counter
    init_noise_sigma: Any  # () 1.0


def _rhos(rks: np.ndarray, hh: float, b_h: float, corrector: bool) -> np.ndarray:
    """UniPC's rho weights: solve sum_k rho_k r_k^(j-1) = phi_j-moments (Zhao et al. 2023, Alg. 2/3).

    ``rks``: the history's log-SNR offsets over h; the update has order len(rks) + 1.
    """
    order = rks.shape[0] + 1
    if order == 1:
        return np.array([0.5]) if corrector else np.zeros(0)
    if order == 2 and not corrector:
        return np.array([0.5])
    r = np.append(rks, 1.0)  # (order,)
    h_phi_k, fact, rows, b = np.expm1(hh) / hh - 1.0, 1.0, [], []
    for j in range(1, order + 1):
        rows.append(r ** (j - 1))
        b.append(h_phi_k * fact / b_h)
        fact *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    R, b = np.stack(rows), np.asarray(b)  # (order, order), (order,)
    return np.linalg.solve(R, b) if corrector else np.linalg.solve(R[:-1, :-1], b[:-1])


def _update_weights(lam, alpha, sigma, s0: int, t: int, hist: list[int], predict_x0: bool, bh1: bool, corrector: bool):
    """(weight of x_s0, weight of m_s0, weights of the history outputs, weight of the new output).

    x_t = c_x x_s0 - M phi_1 m_s0 - M B(h) (sum_k rho_k (m_k - m_s0) / r_k [+ rho_c (m_new - m_s0)]),
    M = alpha_t (data prediction) or sigma_t (noise prediction), history m_k at levels ``hist``.
    """
    h = lam[t] - lam[s0]
    hh = -h if predict_x0 else h
    b_h = hh if bh1 else np.expm1(hh)
    mult, c_x = (alpha[t], sigma[t] / sigma[s0]) if predict_x0 else (sigma[t], alpha[t] / alpha[s0])
    rks = np.array([(lam[k] - lam[s0]) / h for k in hist])
    rhos = _rhos(rks, hh, b_h, corrector)
    w_hist = -mult * b_h * rhos[: len(hist)] / rks
    w_new = -mult * b_h * rhos[-1] if corrector else 0.0
    m_phi = mult * np.expm1(hh)
    if not np.isfinite(h):  # onto sigma = 0: M (e^hh - 1) -> its limit (diffusers: 0 * inf = NaN for eps / bh1)
        m_phi = sigma[t] * alpha[s0] / sigma[s0] - alpha[t] if predict_x0 else alpha[t] * sigma[s0] / alpha[s0]
    w_s0 = -m_phi - np.sum(w_hist) - w_new
    return c_x, w_s0, w_hist, w_new


def _fold_corrector(corr_sample, corr_last, corr_out, pred_sample, pred_out):
    """One linear update per step: x_{i+1} = a_i x_i + w_i . [m_{i-K}, ..., m_i].

    UniC: x^c_i = s_i x_i + b_i x^c_{i-1} + c_i . m; UniP: x_{i+1} = g_i x^c_i + d_i . m. The
    previous corrected sample is x^c_{i-1} = (x_i - d_{i-1} . m) / g_{i-1}, and b_i / g_{i-1} = 1
    whenever the corrector is on (both are sigma_i / sigma_{i-1}, or the alpha ratio), so folding
    it in neither stores x^c nor amplifies round-off. Returns (a (m,), w (m, K + 1)).
    """
    m = corr_sample.shape[0]
    a, w = np.zeros(m), np.zeros_like(pred_out)
    for i in range(m):
        s, c = corr_sample[i], corr_out[i].copy()
        if corr_last[i] != 0.0:
            r = corr_last[i] / pred_sample[i - 1]
            s += r
            c[:-1] -= r * pred_out[i - 1, 1:]  # step i-1's window, shifted by one
        a[i] = pred_sample[i] * s
        w[i] = pred_sample[i] * c + pred_out[i]
    return a, w


class UniPCMultistepScheduler(LevelAlphaScheduler):
    """UniPC (bh1/bh2 B(h), data or noise prediction) of any order, with per-step corrector switches."""

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
        "predict_x0": True,
        "solver_type": "bh2",
        "lower_order_final": True,
        "disable_corrector": [],
        "solver_p": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
        "sigma_min": None,
        "sigma_max": None,
        "shift_terminal": None,
    }
    _choices = {
        "prediction_type": ("epsilon", "v_prediction", "sample", "flow_prediction"),
        "solver_type": ("bh1", "bh2"),
        "time_shift_type": ("exponential", "linear"),  # only used with mu, which set_timesteps does not take
    }
    _aliases = {"solver_type": {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}}
    accepts_sigmas = True

    def _check_config(self, config: dict[str, Any]) -> None:
        super()._check_config(config)
        name = type(self).__name__
        k = config["solver_order"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{name}: solver_order must be an int >= 1, got {k!r}")
        if config["solver_p"] is not None:
            raise ValueError(f"{name}: solver_p (another scheduler as predictor) is not supported; leave it None")
        if config["shift_terminal"] is not None and not config["use_flow_sigmas"]:
            raise ValueError(f"{name}: shift_terminal is only supported with use_flow_sigmas=True")
        if not config["predict_x0"] and config["prediction_type"] == "flow_prediction":
            raise ValueError(f"{name}: prediction_type='flow_prediction' needs predict_x0=True")
        off = config["disable_corrector"]
        if not isinstance(off, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in off):
            raise ValueError(
                f"{name}: disable_corrector must be a list of step indices (ints), got {config['disable_corrector']!r}"
            )

    _floors_zero_snr = True
    tables_depend_on_begin_index = True  # warm-up restarts, and the first executed step has no corrector

    # ----- host-side schedule -----------------------------------------------------------
    def _flow_levels(self, n: int, sigmas):
        """Shifted flow-matching sigmas in (0, 1), high to low (Esser et al. 2024, SD3)."""
        cfg = self.options
        s = np.linspace(1, 1 / cfg["num_train_timesteps"], n + 1)[:-1] if sigmas is None else sigmas.copy()
        shift = float(cfg["flow_shift"])
        s = shift * s / (1 + (shift - 1) * s)
        if cfg["shift_terminal"]:  # stretch so the last level is shift_terminal
            one_minus = 1 - s
            s = 1 - one_minus / (one_minus[-1] / (1 - cfg["shift_terminal"]))
        if abs(s[0] - 1) < 1e-6:
            s[0] -= 1e-6
        return s

    def _schedule(self, n: int, sigmas):
        """(int timesteps (m,), levels (m + 1,)) as diffusers' set_timesteps builds them."""
        cfg = self.options
        T = cfg["num_train_timesteps"]
        if cfg["use_dynamic_shifting"]:
            raise ValueError("use_dynamic_shifting: needs diffusers' `mu`, which set_timesteps does not take")
        train = schedule.sigmas_from_alphas_cumprod_f32(self.alphas_cumprod)  # diffusers' float32 table
        ladder = schedule.chosen_sigma_ladder(cfg)
        if sigmas is not None and ladder is not None:
            raise ValueError(f"sigmas: custom sigmas cannot be combined with {ladder}")
        if sigmas is not None and not cfg["use_flow_sigmas"]:
            raise ValueError("sigmas: custom sigmas need use_flow_sigmas=True (as in diffusers)")
        if ladder is not None:
            levels = schedule.convert_sigmas(cfg, train[::-1], n)
            if cfg["use_flow_sigmas"] and ladder == "use_karras_sigmas":
                levels = levels / (levels + 1)
                frac_t = levels * T
            else:
                frac_t = schedule.sigma_to_t(levels, np.log(train))
            # karras rounds; the others are truncated by diffusers' int64 cast
            round_t = ladder == "use_karras_sigmas" and not cfg["use_flow_sigmas"]
            ts = (np.round(frac_t) if round_t else np.trunc(frac_t)).astype(np.int64)
            last = levels[-1]
        elif cfg["use_flow_sigmas"]:
            levels = self._flow_levels(n, sigmas)
            ts, last = np.trunc(levels * T).astype(np.int64), levels[-1]
        else:
            ts = schedule.multistep_timesteps(cfg["timestep_spacing"], T, n, cfg["steps_offset"])
            levels = np.interp(ts, np.arange(T), train)
            last = schedule.sigmas_from_alphas_cumprod_f32(self.alphas_cumprod[:1])[0]
        last = last if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        levels = np.concatenate([levels, [last]]).astype(np.float32).astype(np.float64)  # diffusers: float32
        return ts, levels

    def _orders(self, m: int, begin_index: int) -> np.ndarray:
        """Order of each step's predictor: warm-up 1, 2, ... from step ``begin_index`` (the first executed),
        and (lower_order_final) none past the end of the whole schedule."""
        K = self.options["solver_order"]
        i = np.arange(m)
        orders = np.clip(i - begin_index + 1, 1, K)
        if self.options["lower_order_final"]:
            orders = np.minimum(orders, m - i)
        return orders

    def _make_state(self, n, like, *, timesteps=None, sigmas=None, begin_index: int = 0) -> UniPCState:
        cfg = self.options
        ts, levels = self._schedule(n, sigmas)
        m, K = ts.shape[0], cfg["solver_order"]
        alpha, sigma = common.vp_alpha_sigma(levels, flow=bool(cfg["use_flow_sigmas"]))
        lam = schedule.half_log_snr(alpha, sigma)
        orders = self._orders(m, begin_index)
        x0, bh1 = bool(cfg["predict_x0"]), cfg["solver_type"] == "bh1"
        corr_sample, corr_last, corr_out = np.ones(m), np.zeros(m), np.zeros((m, K + 1))
        pred_sample, pred_out = np.zeros(m), np.zeros((m, K + 1))
        disabled = set(cfg["disable_corrector"])
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for i in range(m):
                if i > begin_index and (i - 1) not in disabled:  # UniC from step i - 1 (its order) onto level i
                    c = orders[i - 1]
                    hist = [i - 1 - k for k in range(1, c)]
                    cx, w0, wh, wn = _update_weights(lam, alpha, sigma, i - 1, i, hist, x0, bh1, True)
                    corr_sample[i], corr_last[i] = 0.0, cx
                    corr_out[i, K - 1], corr_out[i, K] = w0, wn
                    corr_out[i, [K - 1 - k for k in range(1, c)]] = wh
                p = orders[i]  # UniP from level i onto level i + 1
                hist = [i - k for k in range(1, p)]
                cx, w0, wh, _ = _update_weights(lam, alpha, sigma, i, i + 1, hist, x0, bh1, False)
                pred_sample[i], pred_out[i, K] = cx, w0
                pred_out[i, [K - k for k in range(1, p)]] = wh
        a, w = _fold_corrector(corr_sample, corr_last, corr_out, pred_sample, pred_out)
        conv_sigma = levels[:m] if cfg["prediction_type"] == "flow_prediction" else sigma[:m]
        return UniPCState(
            timesteps=arrays.host_to_like(ts, like, integer=True),
            sigmas=arrays.host_to_like(levels, like),
            alpha=arrays.host_to_like(alpha[:m], like),
            sigma=arrays.host_to_like(conv_sigma, like),
            sample_coef=arrays.host_to_like(a, like),
            output_coef=arrays.host_to_like(w[:, K], like),
            history_coef=arrays.host_to_like(w[:, :K], like),
            history=arrays.zeros_like_shape(like, (K,)),
            step_index=arrays.counter_like(like),
            init_noise_sigma=arrays.host_to_like(1.0, like),
        )

    # ----- sampling ---------------------------------------------------------------------
    def _convert(self, state: UniPCState, model_output, sample):
        """x0 (predict_x0, thresholded) or eps from the raw model output."""
        cfg = self.options
        i = state.step_index
        alpha, sigma = state.alpha[i], state.sigma[i]
        if cfg["predict_x0"]:
            return common.clamp_x0(
                cfg, common.x0_from_output(cfg["prediction_type"], model_output, sample, alpha, sigma)
            )
        return common.eps_from_output(cfg["prediction_type"], model_output, sample, alpha, sigma)

    def step(self, state: UniPCState, model_output, sample, noise=None, **_: Any):
        """UniC on the sample just evaluated, then UniP to the next level (Zhao et al. 2023, Alg. 1), folded."""
        i = state.step_index
        m = self._convert(state, model_output, sample)  # from the uncorrected sample, as diffusers
        prev_sample = common.linear_multistep(state.sample_coef[i], sample, state.history_coef[i], state.history)
        prev_sample = prev_sample + state.output_coef[i] * m
        history = m[None, ...] if self.options["solver_order"] == 1 else common.push_history(state.history, m)
        return prev_sample, state._replace(history=history, step_index=i + 1)
