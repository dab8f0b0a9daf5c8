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
        raise ValueError(
            f"alpha_transform_type: got {alpha_transform_type!r}; accepted: 'cosine', 'exp', 'laplace'"
        )
    betas = [
        min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)
    ]
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
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


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
