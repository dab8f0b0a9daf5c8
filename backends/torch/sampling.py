"""The PyTorch denoising loop: a Python loop over pure scheduler steps with a progress bar.

Noise is drawn with ``randn_tensor``: one ``torch.Generator`` for the whole batch, or a list with one
generator per image (image i's noise then depends only on generator i, as in diffusers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from diffusion_core.pipelines.sdxl import check_stop
from diffusion_core.schedulers import Scheduler

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn_tensor(
    shape: Sequence[int],
    generator: Generators = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` drawn on the generator's device, then moved to ``device``.

    A list of generators draws image ``i`` (``shape[0]`` must equal the list length) from generator ``i``.
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"generator: got a list of {len(generator)} generators for a batch of {shape[0]}")
        parts = [_draw((1, *shape[1:]), g, dtype) for g in generator]  # each (1, ...)
        noise = torch.cat(parts, dim=0)
    else:
        noise = _draw(shape, generator, dtype)
    return noise if device is None else noise.to(device)


def _draw(shape: tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            f"generator must be a torch.Generator, a list of them, or None, got {type(generator).__name__}"
        )
    device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def denoise_loop(
    scheduler: Scheduler,
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    state,
    *,
    generator: Generators = None,
    noise_fn: Callable[[int], torch.Tensor] | None = None,
    step_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
    callback: Callable[[int, torch.Tensor, Any], torch.Tensor | None] | None = None,
    index_model_fn: bool = False,
    post_step: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    stop: int | None = None,
):
    """Run every remaining model call of ``state`` (up to call ``stop``, exclusive, when given: SDXL's
    ``denoising_end``); returns ``(sample, final_state)``.

    Noise (where the scheduler needs it) comes from ``noise_fn(i)`` or ``randn_tensor`` with
    ``generator`` (drawn on the generator's device, moved to ``latents.device``: the same numbers on
    any device). ``callback(i, sample, state)`` runs after each call; a tensor it returns replaces the
    sample. Starts at ``state.step_index``; noise is drawn only at the calls ``scheduler.noise_calls`` names.
    ``index_model_fn``: call ``model_fn(model_input, t, i)`` with the model-call index ``i``; ``post_step(x, new
    state)`` rewrites the sample after each step (4-channel inpainting), as in the flax loop.
    """
    step_kwargs = dict(step_kwargs or {})
    draws = scheduler.noise_calls(state, **step_kwargs)  # (num_calls,) host bool: where diffusers draws
    x = latents
    first, num_calls = int(state.step_index), int(state.timesteps.shape[0])
    num_calls = check_stop(stop, first, num_calls)
    with torch.inference_mode():
        for i in tqdm(range(first, num_calls), disable=not progress):
            t = scheduler.current_timestep(state)
            model_input = scheduler.scale_model_input(state, x)
            out = model_fn(model_input, t, i) if index_model_fn else model_fn(model_input, t)
            noise = None
            if draws[i]:
                noise = noise_fn(i) if noise_fn is not None else randn_tensor(x.shape, generator, x.dtype, x.device)
            x, state = scheduler.step(state, out, x, noise=noise, **step_kwargs)
            if post_step is not None:
                x = post_step(x, state)
            if callback is not None:
                replaced = callback(i, x, state)
                if replaced is not None:  # a callback may hand back a new sample
                    x = replaced
    return x, state
