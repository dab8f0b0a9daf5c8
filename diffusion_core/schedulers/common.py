"""Small pure functions shared by many schedulers: parametrisation changes and x0 clamping.

Each converts once at the edge (k-diffusion / EDM style), so a solver works on (x0, eps)
whatever the network predicts. ``alpha``/``sigma`` are the VP coefficients
sqrt(alpha_bar) and sqrt(1 - alpha_bar), already broadcastable against ``sample``.
"""

from __future__ import annotations

from typing import Any

from diffusion_core import arrays


def x0_from_output(prediction_type: str, model_output, sample, alpha, sigma):
    """Predicted clean sample x0 for a VP model output (eps, v or x0 parametrisation)."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    raise ValueError(f"prediction_type: got {prediction_type!r}; accepted: 'epsilon', 'v_prediction', 'sample'")


def eps_from_output(prediction_type: str, model_output, sample, alpha, sigma):
    """Predicted noise eps for a VP model output (eps, v or x0 parametrisation)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha * model_output) / sigma
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * sample
    raise ValueError(f"prediction_type: got {prediction_type!r}; accepted: 'epsilon', 'v_prediction', 'sample'")


def dynamic_threshold(x0, ratio: float, max_value: float):
    """Per-sample dynamic thresholding (Saharia et al. 2022, Imagen, sec. 2.3).

    s = quantile(|x0|, ratio) per batch item, clamped to [1, max_value]; x0 -> clip(x0, -s, s) / s.
    """
    xp = arrays.namespace(x0)
    batch = x0.shape[0]
    flat = xp.reshape(x0, (batch, -1))  # (B, C*H*W)
    s = arrays.quantile_last_axis(xp.abs(flat), ratio)  # (B,)
    s = xp.clip(s, 1.0, max_value)
    s = xp.reshape(s, (batch,) + (1,) * (x0.ndim - 1))
    return xp.clip(x0, -s, s) / s


def clamp_x0(config: Any, x0):
    """Apply the config's x0 correction: dynamic thresholding, else ``clip_sample``, else none."""
    if config.get("thresholding"):
        return dynamic_threshold(x0, config["dynamic_thresholding_ratio"], config["sample_max_value"])
    if config.get("clip_sample"):
        r = config["clip_sample_range"]
        return arrays.namespace(x0).clip(x0, -r, r)
    return x0
