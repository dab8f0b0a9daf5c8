"""The JAX denoising loop: every scheduler step of a sampling run inside one ``lax.scan``.

Noise for model call ``i`` is ``jax.random.normal(jax.random.fold_in(key, i))``, so a run
does not depend on how the loop is compiled or sharded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_core.schedulers import Scheduler


def _noise_for(scheduler: Scheduler, key, noise_fn, i, x, step_kwargs):
    if not scheduler.needs_noise_for(**step_kwargs):
        return None
    if noise_fn is not None:
        return noise_fn(i)
    if key is None:
        raise ValueError(f"key: {type(scheduler).__name__} draws noise while sampling; pass key=jax.random.key(seed)")
    return jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)


def denoise_loop(
    scheduler: Scheduler,
    model_fn: Callable[[Any, Any], Any],
    latents,
    state,
    *,
    key=None,
    noise_fn: Callable[[Any], Any] | None = None,
    step_kwargs: Mapping[str, Any] | None = None,
):
    """Run all of ``state.timesteps`` as one ``lax.scan``: returns ``(sample, final_state)``.

    ``model_fn(model_input, t)`` is the network; ``latents`` are already scaled by
    ``state.init_noise_sigma``. ``noise_fn(i)`` overrides the per-call noise (tests).
    """
    step_kwargs = dict(step_kwargs or {})
    num_calls = state.timesteps.shape[0]

    def body(carry, i):
        x, st = carry
        t = scheduler.current_timestep(st)
        out = model_fn(scheduler.scale_model_input(st, x), t)
        noise = _noise_for(scheduler, key, noise_fn, i, x, step_kwargs)
        x, st = scheduler.step(st, out, x, noise=noise, **step_kwargs)
        return (x, st), None

    (x, state), _ = jax.lax.scan(body, (latents, state), jnp.arange(num_calls))
    return x, state


def jit_denoise_loop(scheduler: Scheduler, model_fn: Callable[[Any, Any], Any], **step_kwargs):
    """A jitted ``(latents, state, key) -> (sample, state)``; compiled once per shapes/dtypes."""

    @jax.jit
    def run(latents, state, key=None):
        return denoise_loop(scheduler, model_fn, latents, state, key=key, step_kwargs=step_kwargs)

    return run
