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
    if prediction_type == "flow_prediction":  # velocity noise - x0 of x = (1 - s) x0 + s noise; sigma = s
        return sample - sigma * model_output
    raise ValueError(
        f"prediction_type: got {prediction_type!r}; accepted: 'epsilon', 'v_prediction', 'sample', 'flow_prediction'"
    )


def eps_from_output(prediction_type: str, model_output, sample, alpha, sigma):
    """Predicted noise eps for a VP model output (eps, v or x0 parametrisation)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha * model_output) / sigma
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * sample
    raise ValueError(f"prediction_type: got {prediction_type!r}; accepted: 'epsilon', 'v_prediction', 'sample'")


def output_coefficients(prediction_type: str, alpha, sigma):
    """(p, q, r, u) with x0 = p x + q out and eps = r x + u out: the two formulas above as linear maps.

    Arithmetic only, so host float64 tables can fold a whole step into per-step coefficients.
    """
    if prediction_type == "epsilon":
        return 1 / alpha, -sigma / alpha, 0 * alpha, 1 + 0 * alpha
    if prediction_type == "sample":
        return 0 * alpha, 1 + 0 * alpha, 1 / sigma, -alpha / sigma
    if prediction_type == "v_prediction":
        return alpha, -sigma, sigma, alpha
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


def push_history(history, new):
    """Shift a fixed-size (K, ...) history buffer left by one and append ``new`` (oldest first)."""
    xp = arrays.namespace(history)
    return xp.concat([history[1:], new[None, ...]], axis=0)


def linear_multistep(sample_coef, sample, history_coef, history):
    """A linear multistep update: sample_coef * x + sum_k history_coef[k] * history[k].

    ``history_coef`` (K,) is one precomputed row per step (zeros for unused slots during warm-up).
    """
    xp = arrays.namespace(history)
    return sample_coef * sample + xp.tensordot(history_coef, history, axes=1)


def scheduled_alpha_sigma(state_timesteps, state_sigmas, timesteps, like, flow: bool = False):
    """VP (alpha_t, sigma_t) at the scheduled step whose timestep is nearest each of ``timesteps``.

    ``state_sigmas`` are a state's VE (or flow) noise levels, one per step: diffusers looks the
    timestep value up in its schedule (add_noise of DPM-Solver, UniPC, DEIS).
    """
    xp = arrays.namespace(like)
    t = xp.astype(arrays.as_index_array(timesteps, like), like.dtype)
    sched_t = xp.astype(state_timesteps, like.dtype)
    idx = xp.argmin(xp.abs(xp.reshape(t, (-1, 1)) - sched_t[None, :]), axis=1)
    return vp_alpha_sigma(xp.reshape(xp.take(state_sigmas, idx, axis=0), t.shape), flow=flow)


def level_add_noise(original_samples, noise, timesteps, state, flow: bool, num_train_timesteps: int):
    """alpha_t x_0 + sigma_t noise at the state's scheduled level of each timestep (DPM-Solver, UniPC).

    Without a state, flow models use the level t / T; VP models use ``AlphaScheduler.add_noise``.
    """
    like = original_samples
    if state is not None:
        alpha, sigma = scheduled_alpha_sigma(state.timesteps, state.sigmas[:-1], timesteps, like, flow=flow)
    else:
        xp = arrays.namespace(like)
        alpha, sigma = vp_alpha_sigma(
            xp.astype(arrays.as_index_array(timesteps, like), like.dtype) / num_train_timesteps, flow=flow
        )
    nd = like.ndim
    return arrays.broadcast_left(alpha, nd) * like + arrays.broadcast_left(sigma, nd) * noise


def vp_alpha_sigma(level, flow: bool = False):
    """(alpha_t, sigma_t) of a noise level: VE sigma s -> (1, s) / sqrt(1 + s^2); flow sigma s -> (1 - s, s).

    Arithmetic only, so it serves host float64 numpy tables and traced arrays alike.
    """
    if flow:
        return 1.0 - level, level
    alpha = (level * level + 1.0) ** -0.5
    return alpha, level * alpha
