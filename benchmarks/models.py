"""SD-1.5-config UNet forward and checkpoint load: ours (torch, flax) vs diffusers, same run.

    python benchmarks/models.py [--batches 1 2] [--dtypes float32 bfloat16] [--repeats 3] [--latent 64]
    python benchmarks/models.py --load-only          # just the load-time / peak-RSS part
    python benchmarks/models.py --load-only --checkpoint DIR --loaders diffusers flax flax-again --load-cores 1 2

Forward: the exact SD-1.5 UNet2DConditionModel config with random weights (the same weights in
all three), 64x64 latents, 77x768 text states. Each round times diffusers, our torch model and
our jitted Flax model (warm: compiled before timing) in turn; medians are reported with ratios
to diffusers, and achieved GFLOP/s against a matmul peak measured in the same run (FLOPs of one
pass counted by torch's FlopCounterMode on our torch model).

Load: a random SD-1.5-size checkpoint is written once with diffusers' ``save_pretrained`` (or an
existing one reused with ``--checkpoint``); each loader then runs in a fresh subprocess (diffusers,
ours torch, ours flax, in turn each round) that reports wall time, CPU time (user + system: steadier
than wall time on a shared machine) and its peak RSS above the RSS it had after imports, next to the
checkpoint size. ``flax-again`` loads twice in one process and reports the second load (the abstract model
is then cached). ``--load-cores N ...`` pins each child to its first N cores (``sched_setaffinity``; our Flax
loader reads and converts on one thread per core it may use); every count is run for every loader, in turn.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import interleaved_medians, machine_line, peak_rss_mib, pin_threads, timed  # noqa: E402

pin_threads()

# The SD-1.5 UNet (stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json), ~860M parameters.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}
TEXT_SHAPE = (77, 768)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` GFLOP/s of an n x n float32 matmul in torch and in jax (same thread settings)."""
    import jax
    import jax.numpy as jnp
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch_best = min(timed(lambda: a @ b) for _ in range(repeats))
    f = jax.jit(jnp.matmul)
    ja, jb = jnp.asarray(a.numpy()), jnp.asarray(b.numpy())
    f(ja, jb).block_until_ready()
    jax_best = min(timed(lambda: f(ja, jb).block_until_ready()) for _ in range(repeats))
    flops = 2 * n**3
    return {"torch": flops / torch_best / 1e9, "jax": flops / jax_best / 1e9}


def build_models(dtype_name: str):
    """diffusers' model (random, seed 0), our torch model and our flax model holding the same weights."""
    import diffusers
    import jax.numpy as jnp
    import torch

    from diffusion_core.flax.models.loading import load_torch_state_dict
    from diffusion_core.flax.models.unet_2d_condition import UNet2DConditionModel as FlaxUNet
    from diffusion_core.torch.models.unet_2d_condition import UNet2DConditionModel as TorchUNet

    torch.manual_seed(0)
    dtype = _torch_dtype(dtype_name)
    ref = diffusers.UNet2DConditionModel(**SD15_UNET).eval()
    state = ref.state_dict()
    ours = TorchUNet.from_config(SD15_UNET)
    ours.load_state_dict(state, strict=True)
    ours = ours.eval().to(dtype)
    ref = ref.to(dtype)
    flax_model = FlaxUNet.from_config(SD15_UNET, dtype=jnp.dtype(dtype_name))
    load_torch_state_dict(flax_model, ((k, v.float().numpy()) for k, v in state.items()))
    return ref, ours, flax_model


def forward_fns(ref, ours, flax_model, batch: int, latent: int, dtype_name: str):
    """Timed callables (one UNet pass each) for diffusers, ours-torch and ours-flax (compiled before timing)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 4, latent, latent)).astype(np.float32)
    ctx = rng.standard_normal((batch, *TEXT_SHAPE)).astype(np.float32)
    dtype = _torch_dtype(dtype_name)
    xt, ct, tt = torch.from_numpy(x).to(dtype), torch.from_numpy(ctx).to(dtype), torch.tensor([500] * batch)
    graph, params = nnx.split(flax_model)

    @jax.jit
    def flax_call(params, x, t, ctx):
        return nnx.merge(graph, params)(x, t, ctx)

    jd = jnp.dtype(dtype_name)
    jx, jc, jt = jnp.asarray(x, jd), jnp.asarray(ctx, jd), jnp.full((batch,), 500, jnp.int32)
    flax_call(params, jx, jt, jc).block_until_ready()  # compile

    def run_ref():
        with torch.inference_mode():
            ref(xt, tt, ct)

    def run_torch():
        with torch.inference_mode():
            ours(xt, tt, ct)

    return {
        "diffusers": lambda: timed(run_ref),
        "torch": lambda: timed(run_torch),
        "flax": lambda: timed(lambda: flax_call(params, jx, jt, jc).block_until_ready()),
    }


def count_flops(model, batch: int, latent: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, 4, latent, latent, dtype=model.dtype)
    ctx = torch.zeros(batch, *TEXT_SHAPE, dtype=model.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([500] * batch), ctx)
    return float(counter.get_total_flops())


def bench_forward(args: argparse.Namespace) -> None:
    peak = matmul_peak_gflops()
    print(f"matmul peak (2048^2 float32): torch {peak['torch']:.1f} GFLOP/s, jax {peak['jax']:.1f} GFLOP/s")
    cols = f"{'dtype':9} {'batch':>5} {'GFLOP':>7} {'diffusers':>10} {'torch':>8} {'ratio':>6} {'flax':>8}"
    print(cols + f" {'ratio':>6}   GFLOP/s (torch, flax; % of matmul peak)")
    for dtype_name in args.dtypes:
        ref, ours, flax_model = build_models(dtype_name)
        for batch in args.batches:
            flops = count_flops(ours, batch, args.latent)
            med = interleaved_medians(forward_fns(ref, ours, flax_model, batch, args.latent, dtype_name), args.repeats)
            rate = {k: flops / med[k] / 1e9 for k in ("torch", "flax")}
            print(
                f"{dtype_name:9} {batch:5d} {flops / 1e9:7.0f} {med['diffusers']:9.2f}s {med['torch']:7.2f}s "
                f"{med['torch'] / med['diffusers']:6.2f} {med['flax']:7.2f}s {med['flax'] / med['diffusers']:6.2f}"
                f"   {rate['torch']:.1f} ({100 * rate['torch'] / peak['torch']:.0f}%), "
                f"{rate['flax']:.1f} ({100 * rate['flax'] / peak['jax']:.0f}%)",
                flush=True,
            )
        del ref, ours, flax_model


def load_child(impl: str, folder: str, cores: int) -> None:
    """Run in a subprocess: import, note RSS, load the checkpoint, print wall/CPU time and peak RSS above that."""
    import gc
    import os
    import resource

    import torch  # noqa: F401  (imported before the baseline in every contender)

    if cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])

    if impl == "diffusers":
        import diffusers

        load = lambda: diffusers.UNet2DConditionModel.from_pretrained(folder)
    elif impl == "torch":
        from diffusion_core.torch.models.unet_2d_condition import UNet2DConditionModel

        load = lambda: UNet2DConditionModel.from_pretrained(folder)
    else:
        import jax
        from flax import nnx

        from diffusion_core.flax.models.unet_2d_condition import UNet2DConditionModel

        load = lambda: jax.block_until_ready(nnx.state(UNet2DConditionModel.from_pretrained(folder)))
        if impl == "flax-again":
            load()
            gc.collect()  # a loaded model is freed only by the cycle collector (as before the fast path)
    with open("/proc/self/statm") as f:
        base_mib = int(f.read().split()[1]) * resource.getpagesize() / 2**20

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    cpu_start = cpu()
    seconds = timed(load)
    cpu_seconds = cpu() - cpu_start
    print(json.dumps({"seconds": seconds, "cpu": cpu_seconds, "peak_mib": peak_rss_mib(), "base_mib": base_mib}))


def _write_checkpoint(folder: str) -> None:
    import diffusers
    import torch

    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(**SD15_UNET).save_pretrained(folder)


def bench_load(args: argparse.Namespace) -> None:
    """Each loader in a fresh process, round by round in turn; medians of wall time, CPU time and peak RSS."""
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = args.checkpoint or tmp
        if not (Path(folder) / "config.json").is_file():
            _write_checkpoint(folder)
        size_mib = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / 2**20
        print(f"checkpoint: {size_mib:.0f} MiB float32 safetensors")
        runs: dict[tuple[str, int], list[dict]] = {(i, c): [] for c in args.load_cores for i in args.loaders}
        for _ in range(args.load_repeats):
            for impl, cores in runs:
                cmd = [sys.executable, __file__, "--load-child", impl, folder, str(cores)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs[impl, cores].append(json.loads(out.strip().splitlines()[-1]))
        for (impl, cores), rs in runs.items():
            secs, cpu = (statistics.median(r[k] for r in rs) for k in ("seconds", "cpu"))
            extra = statistics.median(r["peak_mib"] - r["base_mib"] for r in rs)
            print(
                f"load {impl:10} {cores or 'all'} core(s): {secs:6.2f}s wall {cpu:6.2f}s CPU   "
                f"peak RSS above imports {extra:7.0f} MiB = {extra / size_mib:.2f}x ckpt"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load-repeats", type=int, default=3)
    parser.add_argument("--load-only", action="store_true")
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--tmp", default=None, help="folder for the temporary checkpoint")
    parser.add_argument("--checkpoint", default=None, help="reuse this SD-1.5 UNet folder (written there if absent)")
    parser.add_argument(
        "--loaders",
        nargs="+",
        default=["diffusers", "torch", "flax"],
        choices=["diffusers", "torch", "flax", "flax-again"],
    )
    parser.add_argument("--load-cores", nargs="+", type=int, default=[0], help="pin loaders to N cores (0: all)")
    parser.add_argument("--load-child", nargs=3, metavar=("IMPL", "FOLDER", "CORES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_child:
        impl, folder, cores = args.load_child
        load_child(impl, folder, int(cores))
        return
    print(machine_line())
    if not args.load_only:
        bench_forward(args)
    if not args.forward_only:
        bench_load(args)


if __name__ == "__main__":
    main()
