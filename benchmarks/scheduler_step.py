"""Time per scheduler call (``scale_model_input`` + ``step``): ours (torch eager, jax jitted, jax scan) vs diffusers.

    python benchmarks/scheduler_step.py [--repeats 5] [--shapes 1,4,64,64 8,4,128,128] [--only DDIM ...]

Each round runs a full 25-step loop (fixed model output, so only scheduler work is timed: the
input scaling and the step, as a sampling loop calls them)
for every contender in turn; the table shows medians in ms per step and ratios to diffusers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import interleaved_medians, machine_line, peak_rss_mib, pin_threads, timed  # noqa: E402

pin_threads()

import diffusers  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffusion_core import schedulers  # noqa: E402
from diffusion_core.flax import denoise_loop  # noqa: E402

STEPS = 25
torch.set_num_threads(1)
diffusers.utils.logging.set_verbosity_error()


def _inputs(shape, n_calls):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    out = (0.5 * rng.standard_normal(shape)).astype(np.float32)
    noise = rng.standard_normal((n_calls,) + shape).astype(np.float32)
    return x, out, noise


def contenders(name: str, shape):
    ours = schedulers.from_config({"_class_name": name})
    ref = getattr(diffusers, name)()
    n_calls = int(ours.set_timesteps(STEPS, like=np.zeros(shape, np.float32)).timesteps.shape[0])
    x_np, out_np, noise_np = _inputs(shape, n_calls)
    x_t, out_t = torch.from_numpy(x_np), torch.from_numpy(out_np)
    noise_t = torch.from_numpy(noise_np)
    wants_noise = ours.needs_noise

    ref_scale = getattr(ref, "scale_model_input", None)  # flow matching has none

    def run_ref():
        ref.set_timesteps(STEPS)
        x = x_t
        for t in ref.timesteps:
            if ref_scale is not None:
                ref_scale(x, t)
            x = ref.step(out_t, t, x, return_dict=False)[0]
        return x

    def run_torch():
        state = ours.set_timesteps(STEPS, like=x_t)
        x = x_t
        for i in range(n_calls):
            ours.scale_model_input(state, x)
            x, state = ours.step(state, out_t, x, noise=noise_t[i] if wants_noise else None)
        return x

    x_j, out_j, noise_j = jnp.asarray(x_np), jnp.asarray(out_np), jnp.asarray(noise_np)
    state_j = ours.set_timesteps(STEPS, like=x_j)

    def call_j(st, x, nz):
        ours.scale_model_input(st, x)  # traced away when unused, as in the scan
        return ours.step(st, out_j, x, noise=nz if wants_noise else None)

    step_j = jax.jit(call_j)

    def run_jax_step():
        state, x = state_j, x_j
        for i in range(n_calls):
            x, state = step_j(state, x, noise_j[i])
        return x.block_until_ready()

    scan = jax.jit(lambda st, x: denoise_loop(ours, lambda _x, _t: out_j, x, st, noise_fn=lambda i: noise_j[i])[0])

    def run_jax_scan():
        return scan(state_j, x_j).block_until_ready()

    for fn in (run_ref, run_torch, run_jax_step, run_jax_scan):  # warm up / compile
        fn()
    per_step = 1e3 / n_calls
    return {
        "diffusers": lambda: timed(run_ref) * per_step,
        "ours_torch": lambda: timed(run_torch) * per_step,
        "ours_jax_step": lambda: timed(run_jax_step) * per_step,
        "ours_jax_scan": lambda: timed(run_jax_scan) * per_step,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", default=["1,4,64,64", "8,4,128,128"])
    parser.add_argument("--only", nargs="*", default=None, help="substrings of scheduler names to run")
    args = parser.parse_args(argv)
    names = [c.__name__ for c in schedulers.all_scheduler_classes()]
    if args.only:
        names = [n for n in names if any(s in n for s in args.only)]
    print(f"# scheduler step, {STEPS}-step loop, ms/step (median of {args.repeats}); {machine_line()}")
    print(f"# torch {torch.__version__}, jax {jax.__version__}, diffusers {diffusers.__version__}")
    header = f"{'scheduler':34s} {'shape':>12s} {'diffusers':>9s} {'torch':>8s} {'ratio':>6s} "
    print(header + f"{'jax-step':>8s} {'ratio':>6s} {'jax-scan':>8s} {'ratio':>6s}")
    for shape_s in args.shapes:
        shape = tuple(int(v) for v in shape_s.split(","))
        for name in names:
            med = interleaved_medians(contenders(name, shape), args.repeats)
            ref = med["diffusers"]
            print(
                f"{name:34s} {shape_s:>12s} {ref:9.3f} {med['ours_torch']:8.3f} {med['ours_torch'] / ref:6.2f} "
                f"{med['ours_jax_step']:8.3f} {med['ours_jax_step'] / ref:6.2f} "
                f"{med['ours_jax_scan']:8.3f} {med['ours_jax_scan'] / ref:6.2f}",
                flush=True,
            )
    print(f"# peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
