"""The PyTorch denoising loop: a Python loop over pure scheduler steps with a progress bar."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from diffusion_core.schedulers import Scheduler


def denoise_loop(
    scheduler: Scheduler,
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    state,
    *,
    generator: torch.Generator | None = None,
    noise_fn: Callable[[int], torch.Tensor] | None = None,
    step_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
):
    """Run every model call of ``state``; returns ``(sample, final_state)``.

    Noise (where the scheduler needs it) comes from ``noise_fn(i)`` or is drawn on the CPU
    from ``generator`` and moved to ``latents.device`` (same numbers on any device).
    """
    step_kwargs = dict(step_kwargs or {})
    wants_noise = scheduler.needs_noise_for(**step_kwargs)
    x = latents
    num_calls = int(state.timesteps.shape[0])
    with torch.inference_mode():
        for i in tqdm(range(num_calls), disable=not progress):
            t = scheduler.current_timestep(state)
            out = model_fn(scheduler.scale_model_input(state, x), t)
            noise = None
            if wants_noise:
                if noise_fn is not None:
                    noise = noise_fn(i)
                else:
                    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x, state = scheduler.step(state, out, x, noise=noise, **step_kwargs)
    return x, state
