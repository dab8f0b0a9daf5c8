"""The JAX denoising loop: every scheduler step of a sampling run inside one ``lax.scan``.

Noise for model call ``i`` is ``jax.random.normal(jax.random.fold_in(key, i))``, so a run
does not depend on how the loop is compiled or sharded. With per-image ``keys`` (image ``b``'s key
is ``fold_in(key, b)``, see :func:`per_example_keys`), image ``b``'s noise at call ``i`` is drawn from
``fold_in(keys[b], i)``: the same whichever device (or how many) computes that image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from diffusion_core.pipelines.sdxl import check_stop
from diffusion_core.schedulers import Scheduler


def as_key(key: Any, name: str = "key", batched: bool = False) -> jax.Array:
    """A PRNG key as a typed key array (``key<impl>`` dtype), the only form the loops and programs see.

    Accepts a typed key (``jax.random.key(seed)``) and a raw key (``jax.random.PRNGKey(seed)``: ``uint32[2]`` for
    the default threefry implementation), jax or numpy; the same seed gives the same key either way.
    ``batched``: a (B,) vector of keys (raw: ``uint32[B, 2]``) instead of one key.
    """
    lead = 1 if batched else 0
    what = "a (B,) vector of PRNG keys" if batched else "one PRNG key"
    if isinstance(key, (jax.Array, np.ndarray)):
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.ndim == lead:
                return key
        elif key.dtype == np.uint32 and key.ndim == lead + 1 and key.shape[lead:] == _raw_key_shape():
            return jax.random.wrap_key_data(jnp.asarray(key))
        desc = f"an array of shape {key.shape} and dtype {key.dtype}"
    else:
        desc = type(key).__name__
    raise ValueError(
        f"{name} must be {what}: jax.random.key(seed) or jax.random.PRNGKey(seed) "
        f"(raw uint32{list(_raw_key_shape())}), got {desc}"
    )


def _raw_key_shape() -> tuple[int, ...]:
    """The raw key shape of the default PRNG implementation ((2,) for threefry)."""
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape


def per_example_keys(key: Any, batch_size: int, offset: int = 0) -> jax.Array:
    """(B,) typed keys ``fold_in(key, offset + b)``: image ``b`` of a call always draws from its own key.

    ``key`` is a typed or raw key (see :func:`as_key`).
    """
    key = as_key(key)
    return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch_size) + offset)


def per_example_normal(keys: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """(B, *shape) standard normal noise, row ``b`` drawn from ``keys[b]``."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys)


class ScanProgress:
    """A tqdm bar advanced from inside a compiled loop (``jax.debug.callback``).

    The callback is traced once and keeps pointing at this object; each run opens a fresh bar with
    :meth:`start` and closes it with :meth:`close`. Repeated ticks for one step (one per device under
    ``pmap``) advance the bar once.
    """

    def __init__(self) -> None:
        self.bar: Any = None

    def start(self, total: int, disable: bool = False, initial: int = 0) -> None:
        """Open a bar over ``total`` model calls, ``initial`` of them already done (a loop from ``first``)."""
        self.bar = tqdm(total=total, initial=initial, disable=disable)

    def tick(self, i: Any) -> None:
        done = int(i) + 1
        if self.bar is not None and done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        jax.effects_barrier()  # let pending callbacks land before the bar closes
        if self.bar is not None:
            self.bar.close()
        self.bar = None


def _noise_for(scheduler: Scheduler, key, keys, noise_fn, i, x, step_kwargs):
    if not scheduler.needs_noise_for(**step_kwargs):
        return None
    if noise_fn is not None:
        return noise_fn(i)
    if keys is not None:
        return per_example_normal(jax.vmap(lambda k: jax.random.fold_in(k, i))(keys), x.shape[1:], x.dtype)
    if key is None:
        raise ValueError(f"key: {type(scheduler).__name__} draws noise while sampling; pass key=jax.random.key(seed)")
    return jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)


def denoise_loop(
    scheduler: Scheduler,
    model_fn: Callable[..., Any],
    latents,
    state,
    *,
    key=None,
    keys=None,
    noise_fn: Callable[[Any], Any] | None = None,
    step_kwargs: Mapping[str, Any] | None = None,
    progress: ScanProgress | None = None,
    first: int = 0,
    index_model_fn: bool = False,
    post_step: Callable[[Any, Any], Any] | None = None,
    stop: int | None = None,
):
    """Run model calls ``first .. len(state.timesteps) - 1`` (or ``.. stop - 1``: SDXL's ``denoising_end``) as one
    ``lax.scan``: returns ``(sample, final_state)``.

    ``model_fn(model_input, t)`` is the network; ``latents`` are already scaled by
    ``state.init_noise_sigma``. Noise comes from ``noise_fn(i)`` (tests), per-image ``keys`` (B,)
    or one ``key``; ``i`` is the absolute model-call index. ``progress`` is ticked once per model call
    from inside the scan. ``first`` (a static int) is where a state from
    ``scheduler.set_timesteps(n, like=..., begin_index=first)`` starts (img2img / inpaint). ``index_model_fn``: call
    ``model_fn(model_input, t, i)`` with the absolute call index ``i`` (ControlNet's guidance window, the latent
    upscaler's sigma). ``post_step(x, new_state)`` rewrites the sample after each step (4-channel inpainting
    keeps the known region).
    """
    step_kwargs = dict(step_kwargs or {})
    key = None if key is None else as_key(key)
    keys = None if keys is None else as_key(keys, "keys", batched=True)
    num_calls = state.timesteps.shape[0]
    if not isinstance(first, int) or not 0 <= first < num_calls:
        raise ValueError(f"first must be an int in [0, {num_calls}) (the schedule's model calls), got {first!r}")

    def body(carry, i):
        x, st = carry
        t = scheduler.current_timestep(st)
        model_input = scheduler.scale_model_input(st, x)
        out = model_fn(model_input, t, i) if index_model_fn else model_fn(model_input, t)
        noise = _noise_for(scheduler, key, keys, noise_fn, i, x, step_kwargs)
        x, st = scheduler.step(st, out, x, noise=noise, **step_kwargs)
        if post_step is not None:
            x = post_step(x, st)
        if progress is not None:
            jax.debug.callback(progress.tick, i)
        return (x, st), None

    (x, state), _ = jax.lax.scan(body, (latents, state), jnp.arange(first, check_stop(stop, first, num_calls)))
    return x, state


def jit_denoise_loop(scheduler: Scheduler, model_fn: Callable[[Any, Any], Any], **step_kwargs):
    """A jitted ``(latents, state, key) -> (sample, state)``; compiled once per shapes/dtypes."""

    @jax.jit
    def run(latents, state, key=None):
        return denoise_loop(scheduler, model_fn, latents, state, key=key, step_kwargs=step_kwargs)

    return run
