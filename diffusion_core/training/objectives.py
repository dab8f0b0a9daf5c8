"""Training objectives, written once for every array backend: targets, SNR, min-SNR-gamma weights, the loss.

The model sees ``x_t = add_noise(x0, noise, t)`` (the scheduler's own forward process) and learns
the quantity its ``prediction_type`` names:

- ``epsilon``: the noise (Ho et al. 2020);
- ``v_prediction``: ``v = sqrt(a_t) noise - sqrt(1 - a_t) x0`` (Salimans & Ho 2022);
- ``sample``: ``x0`` itself;
- ``flow``: the rectified-flow velocity ``noise - x0`` (Lipman et al. 2023; flow-matching schedulers).

Every function takes arrays of one namespace (numpy, torch or jax) and returns the same kind, so the
Flax and PyTorch trainers compute the identical loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffusion_core import arrays

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def check_prediction_type(prediction_type: str) -> str:
    """``prediction_type`` if it is one of :data:`PREDICTION_TYPES`, else ValueError."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return prediction_type


def scheduler_prediction_type(scheduler: Any) -> str:
    """The training target a scheduler's config implies (flow-matching schedulers learn the velocity)."""
    if type(scheduler).__name__.startswith("FlowMatch"):
        return "flow"
    return check_prediction_type(str(scheduler.config.get("prediction_type", "epsilon")))


def training_target(scheduler: Any, x0: Any, noise: Any, timesteps: Any, prediction_type: str) -> Any:
    """What the network should output at ``add_noise(x0, noise, timesteps)``; (B, ...) like ``x0``."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow":
        return noise - x0
    return scheduler.get_velocity(x0, noise, timesteps)


def snr(scheduler: Any, timesteps: Any, like: Any) -> Any:
    """Signal-to-noise ratio ``a_t / (1 - a_t)`` at integer ``timesteps`` (B,), in ``like``'s namespace."""
    xp = arrays.namespace(like)
    acp = arrays.host_to_like(np.asarray(scheduler.alphas_cumprod, np.float64), like)
    a = acp[xp.astype(arrays.as_index_array(timesteps, like), xp.int32)]
    return a / (1 - a)


def min_snr_weights(snr_t: Any, gamma: float, prediction_type: str) -> Any:
    """Per-example loss weights of min-SNR-gamma (Hang et al. 2023), as diffusers' training scripts use them.

    ``min(snr, gamma)`` divided by ``snr`` (epsilon) or ``snr + 1`` (v-prediction); ``sample`` uses
    ``min(snr, gamma)`` itself. (B,) like ``snr_t``.
    """
    if not gamma > 0:
        raise ValueError(f"snr_gamma must be > 0, got {gamma!r}")
    xp = arrays.namespace(snr_t)
    clipped = xp.minimum(snr_t, xp.full_like(snr_t, float(gamma)))
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"snr_gamma: min-SNR weighting takes epsilon, v_prediction or sample, got {prediction_type!r}")


def diffusion_loss(
    scheduler: Any,
    model_output: Any,
    x0: Any,
    noise: Any,
    timesteps: Any,
    prediction_type: str,
    snr_gamma: float | None = None,
) -> Any:
    """Scalar loss: mean squared error to the target, per-example min-SNR-weighted when ``snr_gamma`` is set."""
    xp = arrays.namespace(model_output)
    target = training_target(scheduler, x0, noise, timesteps, prediction_type)
    err = (model_output - target) ** 2  # (B, C, H, W)
    per_example = xp.mean(xp.reshape(err, (err.shape[0], -1)), axis=1)  # (B,)
    if snr_gamma is None:
        return xp.mean(per_example)
    weights = min_snr_weights(snr(scheduler, timesteps, model_output), snr_gamma, prediction_type)
    return xp.mean(per_example * xp.astype(weights, per_example.dtype))
