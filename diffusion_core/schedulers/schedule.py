"""Host-side training schedules in float64 numpy: betas, alphas_cumprod, sigma ladders.

Everything here runs once per scheduler (or per ``set_timesteps``) on the host
("use float64 for accuracy", improved-diffusion); the result is cast to the caller's
framework once by ``diffusion_core.arrays.host_to_like``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
DDPM_EXTRA_BETA_SCHEDULES = ("sigmoid", "laplace")


def betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999, alpha_transform_type: str = "cosine") -> np.ndarray:
    """Betas from a continuous alpha_bar(t) (Nichol & Dhariwal 2021, improved DDPM, eq. 17)."""
    if alpha_transform_type == "cosine":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    elif alpha_transform_type == "exp":

        def alpha_bar(t: float) -> float:
            return math.exp(t * -12.0)

    elif alpha_transform_type == "laplace":

        def alpha_bar(t: float) -> float:
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))

    else:
        raise ValueError(f"alpha_transform_type: got {alpha_transform_type!r}; accepted: 'cosine', 'exp', 'laplace'")
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return np.asarray(betas, dtype=np.float64)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift/scale sqrt(alpha_bar) so the last step has zero SNR (Lin et al. 2023, arXiv 2305.08891, Alg. 1)."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def make_betas(config: Mapping[str, Any], extra_schedules: tuple[str, ...] = ()) -> np.ndarray:
    """The (T,) float64 betas a diffusers config describes (``trained_betas`` wins)."""
    T = int(config["num_train_timesteps"])
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float64)
    else:
        kind = config["beta_schedule"]
        start, end = float(config["beta_start"]), float(config["beta_end"])
        if kind == "linear":
            betas = np.linspace(start, end, T, dtype=np.float64)
        elif kind == "scaled_linear":
            betas = np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            betas = betas_for_alpha_bar(T)
        elif kind == "sigmoid" and "sigmoid" in extra_schedules:
            x = np.linspace(-6, 6, T, dtype=np.float64)
            betas = 1.0 / (1.0 + np.exp(-x)) * (end - start) + start
        elif kind == "laplace" and "laplace" in extra_schedules:
            betas = betas_for_alpha_bar(T, alpha_transform_type="laplace")
        elif kind == "exp" and "exp" in extra_schedules:  # Heun's alpha_bar(t) = exp(-12 t)
            betas = betas_for_alpha_bar(T, alpha_transform_type="exp")
        else:
            accepted = ", ".join(repr(s) for s in BETA_SCHEDULES + extra_schedules)
            raise ValueError(f"beta_schedule: got {kind!r}; accepted: {accepted} (or pass trained_betas)")
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - betas)


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Variance-exploding sigma for each training step: sqrt((1 - a) / a)."""
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def sigmas_from_alphas_cumprod_f32(alphas_cumprod: np.ndarray) -> np.ndarray:
    """``sigmas_from_alphas_cumprod`` evaluated in float32, as diffusers does (returned as float64).

    Near t = 0 the float32 cancellation in 1 - alpha_bar is ~1e-4 relative (sigma_min of the
    'sigma_min' final level); the reference's few-step results depend on it at that level.
    """
    a = np.asarray(alphas_cumprod, dtype=np.float32)
    return np.sqrt((np.float32(1.0) - a) / a).astype(np.float64)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log-sigma (k-diffusion)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma[:, None] - log_sigmas[None, :]
    low_idx = np.clip(np.cumsum(dists >= 0, axis=1).argmax(axis=1), 0, log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(np.shape(sigma))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM, eq. 5) noise levels, high to low."""
    return karras_ramp(sigma_min, sigma_max, np.linspace(0, 1, n), rho)


def karras_ramp(sigma_min: float, sigma_max: float, ramp: np.ndarray, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM, eq. 5) at arbitrary ramp points in [0, 1] (0: sigma_max, 1: sigma_min)."""
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + np.asarray(ramp, dtype=np.float64) * (min_inv - max_inv)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Noise levels evenly spaced in log-sigma, high to low."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Noise levels at Beta(alpha, beta) quantiles (Lee et al. 2024, "Beta Sampling is All You Need")."""
    try:
        from scipy import stats
    except ImportError as e:  # scipy comes with jax; torch-only installs may lack it
        raise ImportError("use_beta_sigmas=True needs scipy (pip install scipy)") from e
    ppf = stats.beta.ppf(1 - np.linspace(0, 1, n), alpha, beta)
    return np.asarray([sigma_min + p * (sigma_max - sigma_min) for p in ppf], dtype=np.float64)


SIGMA_LADDERS = {
    "use_karras_sigmas": karras_sigmas,
    "use_exponential_sigmas": exponential_sigmas,
    "use_beta_sigmas": beta_sigmas,
}


def chosen_sigma_ladder(config: Mapping[str, Any]) -> str | None:
    """Which of the mutually exclusive sigma options is on (validated by the config check)."""
    on = [k for k in SIGMA_LADDERS if config.get(k)]
    return on[0] if on else None


def convert_sigmas(config: Mapping[str, Any], sigmas: np.ndarray, n: int) -> np.ndarray:
    """Re-space a high-to-low sigma ladder with the configured variant (karras/exponential/beta)."""
    ladder = chosen_sigma_ladder(config)
    if ladder is None:
        return sigmas
    sigma_min = config.get("sigma_min") or float(sigmas[-1])
    sigma_max = config.get("sigma_max") or float(sigmas[0])
    return SIGMA_LADDERS[ladder](float(sigma_min), float(sigma_max), n)


def spaced_timesteps(spacing: str, num_train_timesteps: int, n: int, steps_offset: int = 0) -> np.ndarray:
    """High-to-low float timesteps for the three diffusers spacings (Lin et al. 2023, Table 2).

    Integer schedulers round the result; sigma schedulers keep ``linspace`` fractional.
    """
    T = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float64)[::-1].copy()
    if spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        ratio = T / n
        return np.round(np.arange(T, 0, -ratio)).astype(np.float64) - 1
    raise ValueError(f"timestep_spacing: got {spacing!r}; accepted: 'leading', 'linspace', 'trailing'")


def integer_timesteps(timesteps: np.ndarray, num_train_timesteps: int) -> np.ndarray:
    """Custom ``timesteps=`` as int64 training indices; ValueError unless integers in [0, T)."""
    ts = np.asarray(timesteps, dtype=np.float64)
    if np.any(ts != np.round(ts)) or np.any(ts < 0) or np.any(ts >= num_train_timesteps):
        raise ValueError(
            f"timesteps: must be integers in [0, num_train_timesteps={num_train_timesteps}), got {ts.tolist()}"
        )
    return ts.astype(np.int64)


# ----- multistep solvers (DPM-Solver, DEIS, UniPC): timesteps, sigma ladders, warm-up orders -----
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24  # diffusers' floor for the last alpha_bar under zero-terminal-SNR


def floor_zero_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Replace the exactly-zero last alpha_bar of a zero-SNR schedule by 2**-24 (finite lambda)."""
    out = np.array(alphas_cumprod, dtype=np.float64)
    out[-1] = ZERO_SNR_ALPHA_CUMPROD
    return out


def multistep_timesteps(
    spacing: str, num_train_timesteps: int, n: int, steps_offset: int = 0, last_timestep: int | None = None
) -> np.ndarray:
    """High-to-low int timesteps of the multistep solvers: n + 1 grid points, the final 0 dropped.

    ``last_timestep`` (default ``num_train_timesteps``) bounds the grid (DPM's lambda_min_clipped).
    """
    T = num_train_timesteps
    last = T if last_timestep is None else int(last_timestep)
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.arange(last, 0, -T / n).round().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing: got {spacing!r}; accepted: 'leading', 'linspace', 'trailing'")


def flow_sigmas(num_train_timesteps: int, n: int, shift: float) -> np.ndarray:
    """n high-to-low flow-matching sigmas in (0, 1), time-shifted (Esser et al. 2024, SD3, eq. 23)."""
    s = 1.0 - np.linspace(1, 1 / num_train_timesteps, n + 1)
    return flow_shift(s, shift)[::-1][:-1].copy()


def flow_shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Static resolution shift of flow sigmas: s -> shift s / (1 + (shift - 1) s) (Esser et al. 2024, SD3, eq. 23)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_time_shift(sigmas: np.ndarray, mu: float, kind: str = "exponential", power: float = 1.0) -> np.ndarray:
    """Dynamic (image-size dependent) shift of flow sigmas by ``mu`` (Flux): e^mu / (e^mu + (1/s - 1)^power).

    ``kind="linear"`` uses mu in place of e^mu.
    """
    if kind not in ("exponential", "linear"):
        raise ValueError(f"time_shift_type: got {kind!r}; accepted: 'exponential', 'linear'")
    m = math.exp(mu) if kind == "exponential" else mu
    sigmas = np.asarray(sigmas, dtype=np.float64)
    with np.errstate(divide="ignore"):  # s = 0 maps to 0, as 1/0 = inf does in diffusers
        return m / (m + (1 / sigmas - 1) ** power)


def flow_shift_mu(
    image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float
) -> float:
    """Flux's dynamic-shift ``mu``: linear in the latent token count, base_shift at base_seq_len, max_shift at max."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def stretch_to_terminal(sigmas: np.ndarray, shift_terminal: float) -> np.ndarray:
    """Rescale 1 - s so the last flow sigma lands exactly on ``shift_terminal`` (LTX-Video)."""
    one_minus = 1.0 - np.asarray(sigmas, dtype=np.float64)
    if one_minus[-1] == 0:
        raise ValueError("shift_terminal: the last sigma is 1, nothing to stretch (use more than one step)")
    return 1.0 - one_minus * ((1.0 - shift_terminal) / one_minus[-1])


def half_log_snr(alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """lambda_t = log(alpha_t / sigma_t) (Lu et al. 2022, DPM-Solver, arXiv 2206.00927); +inf at sigma_t = 0."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(alpha, dtype=np.float64)) - np.log(np.asarray(sigma, dtype=np.float64))


def clipped_last_timestep(config: Mapping[str, Any], alphas_cumprod: np.ndarray) -> int:
    """Upper end of DPM-Solver's timestep grid: drop the training steps whose lambda_t < lambda_min_clipped."""
    lam = half_log_snr(np.sqrt(alphas_cumprod), np.sqrt(1.0 - alphas_cumprod))  # (T,) decreasing in t
    return config["num_train_timesteps"] - int(np.searchsorted(lam[::-1], config["lambda_min_clipped"]))


def multistep_orders(
    n: int, solver_order: int, lower_final: bool, lower_second: bool, begin_index: int = 0
) -> np.ndarray:
    """Solver order at each of n steps: warm up 1, 2, ... and (optionally) step down at the end.

    The warm-up counts from step ``begin_index``, the first one executed (img2img: no history before it);
    ``lower_final``: the last step is first order; ``lower_second``: the second-to-last is at
    most second order (diffusers' lower_order_final for short schedules). Both count in absolute
    steps of the whole schedule.
    """
    orders = np.clip(np.arange(n) - begin_index + 1, 1, solver_order)
    if lower_second and n >= 2:
        orders[-2] = min(orders[-2], 2)
    if lower_final and n >= 1:
        orders[-1] = 1
    return orders


def multistep_ladder(config: Mapping[str, Any], train_sigmas: np.ndarray, n: int):
    """``(fractional timesteps, n sigmas)`` of the configured non-default ladder, or None.

    Ladders: karras/exponential/beta (``use_*_sigmas``), uniform log-SNR (``use_lu_lambdas``,
    Lu et al. 2022, arXiv 2206.00927, sec. 3.3) or shifted flow sigmas (``use_flow_sigmas``).
    ``train_sigmas`` is the (T,) VE ladder, low to high. Rounding is the caller's rule.
    """
    T = train_sigmas.shape[0]
    if chosen_sigma_ladder(config) is not None:
        sigmas = convert_sigmas(config, train_sigmas[::-1], n)
    elif config.get("use_lu_lambdas"):  # uniform in log-sigma (= -lambda) between the table's ends
        log_max, log_min = float(np.log(train_sigmas[-1])), float(np.log(train_sigmas[0]))
        sigmas = np.exp(log_max + np.linspace(0, 1, n) * (log_min - log_max))
    elif config.get("use_flow_sigmas"):
        sigmas = flow_sigmas(T, n, float(config["flow_shift"]))
        return sigmas * T, sigmas
    else:
        return None
    return sigma_to_t(sigmas, np.log(train_sigmas)), sigmas


def torch_linspace_float32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=float32)`` bit for bit: float32 step, ramps from both ends."""
    step = np.float32((end - start) / (n - 1)) if n > 1 else np.float32(0.0)
    i = np.arange(n, dtype=np.float64)
    # n = 1 gives [start], as torch does
    ramp = np.where(i < max(n // 2, 1), np.float32(start) + step * i, np.float32(end) - step * (n - 1 - i))
    return ramp.astype(np.float32)


def betas_float32(config: Mapping[str, Any], extra_schedules: tuple[str, ...] = ()) -> np.ndarray:
    """The float32 betas diffusers' torch schedulers build for a config (linear/scaled_linear/cosine)."""
    kind = config.get("beta_schedule")
    T = int(config["num_train_timesteps"])
    if config.get("trained_betas") is not None or kind not in ("linear", "scaled_linear"):
        betas = make_betas({**config, "rescale_betas_zero_snr": False}, extra_schedules).astype(np.float32)
    elif kind == "linear":
        betas = torch_linspace_float32(float(config["beta_start"]), float(config["beta_end"]), T)
    else:
        root = torch_linspace_float32(float(config["beta_start"]) ** 0.5, float(config["beta_end"]) ** 0.5, T)
        betas = root * root
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas.astype(np.float64)).astype(np.float32)
    return betas


def alphas_cumprod_float32(betas: np.ndarray) -> np.ndarray:
    """alpha_bar as diffusers' float32 tables hold it (float32 alphas, float64-accumulated product, float32).

    Near t = 0, 1 - alpha_bar loses ~1e-3 relative precision in float32; sigma ladders built from
    these tables (their sigma_min end, ``sigma_to_t``) follow that rounding, so parity needs it.
    """
    alphas = (np.float32(1.0) - np.asarray(betas).astype(np.float32)).astype(np.float64)
    return np.cumprod(alphas).astype(np.float32).astype(np.float64)


def lagged(values: np.ndarray, n: int, k: int) -> np.ndarray:
    """(n,) array whose entry i is ``values[i - k]`` (NaN where i < k): a multistep solver's older nodes."""
    out = np.full(n, np.nan)
    if n > k:
        out[k:] = values[: n - k]
    return out
