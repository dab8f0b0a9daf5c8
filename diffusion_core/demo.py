"""Scheduler demo: sample a known 2-D Gaussian mixture with its exact noise predictor.

The data are x0 ~ 1/2 N(-m, s^2) + 1/2 N(+m, s^2) per coordinate, so the noise-prediction
network is known in closed form (the score of a Gaussian mixture). Every VP scheduler then
samples it in a few steps; the printout compares the samples with the target. Runs on
numpy always, and on torch / jax when they are installed:

    python -m diffusion_core.demo [--steps 25] [--backends numpy torch jax] [--n 4096]
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np

from diffusion_core import arrays, schedulers

MODE, MODE_STD = 2.0, 0.3
# Schedulers whose model contract is a VP noise predictor (flow matching and EDM differ).
VP_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
)
# Stable Diffusion's training schedule (its scheduler_config.json), clip_sample off as SD ships it.
SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False}


def mixture_eps_model(alphas_cumprod: np.ndarray):
    """Exact eps(x_t, t) = -sqrt(1 - a_t) * score_t(x_t) for the two-mode mixture above."""

    def model(x, t):
        xp = arrays.namespace(x)
        a = arrays.interp_table(alphas_cumprod, t, x)  # alpha_bar_t at (fractional) t
        alpha, sigma = xp.sqrt(a), xp.sqrt(1 - a)
        var = alpha**2 * MODE_STD**2 + sigma**2  # per-mode marginal variance at t
        d_plus, d_minus = x - alpha * MODE, x + alpha * MODE
        logit = (d_minus**2 - d_plus**2) / (2 * var)  # log w+ - log w-
        w_plus = 1 / (1 + xp.exp(-xp.clip(logit, -60.0, 60.0)))
        score = -(w_plus * d_plus + (1 - w_plus) * d_minus) / var
        return -sigma * score

    return model


def _to_backend(backend: str, x: np.ndarray):
    if backend == "torch":
        import torch

        return torch.from_numpy(x)
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(x)
    return x


def sample(name: str, steps: int, backend: str, n: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """Draw ``n`` 2-D samples with scheduler ``name``; returns (samples, seconds)."""
    sched = schedulers.from_config({"_class_name": name, **SD_SCHEDULE})
    model = mixture_eps_model(sched.alphas_cumprod)
    rng = np.random.default_rng(seed)
    x = _to_backend(backend, rng.standard_normal((n, 2)).astype(np.float32))
    start = time.perf_counter()
    state = sched.set_timesteps(steps, like=x)
    x = x * state.init_noise_sigma
    for _ in range(state.timesteps.shape[0]):
        out = model(sched.scale_model_input(state, x), sched.current_timestep(state))
        noise = None
        if sched.needs_noise:
            noise = _to_backend(backend, rng.standard_normal((n, 2)).astype(np.float32))
        x, state = sched.step(state, out, x, noise=noise)
    x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    return x, time.perf_counter() - start


def summary(x: np.ndarray) -> tuple[float, float, float]:
    """(share in the + mode, mean |x| , std around the nearest mode) over all coordinates."""
    flat = x.ravel()
    nearest = np.where(flat > 0, MODE, -MODE)
    return float(np.mean(flat > 0)), float(np.mean(np.abs(flat))), float(np.std(flat - nearest))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--backends", nargs="+", default=["numpy", "torch", "jax"])
    args = parser.parse_args(argv)
    backends = [b for b in args.backends if b == "numpy" or importlib.util.find_spec(b) is not None]
    print(f"target: share(+)=0.500  mean|x|={MODE:.3f}  std around mode={MODE_STD:.3f}  ({args.steps} steps)")
    print(f"{'scheduler':34s} {'backend':7s} {'share(+)':>8s} {'mean|x|':>8s} {'std':>7s} {'seconds':>8s}")
    for name in VP_SCHEDULERS:
        for backend in backends:
            x, secs = sample(name, args.steps, backend, args.n)
            share, mean_abs, std = summary(x)
            print(f"{name:34s} {backend:7s} {share:8.3f} {mean_abs:8.3f} {std:7.3f} {secs:8.3f}")


if __name__ == "__main__":
    main()
