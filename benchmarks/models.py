"""SD-1.5-config UNet forward and checkpoint load: ours (torch, flax) vs diffusers, same run.

    python benchmarks/models.py [--batches 1 2] [--dtypes float32 bfloat16] [--repeats 3] [--latent 64]
    python benchmarks/models.py --forward-only --dtypes bfloat16 --contenders diffusers torch --memory
    python benchmarks/models.py --load-only          # just the load-time / peak-RSS part
    python benchmarks/models.py --load-only --checkpoint DIR --loaders diffusers flax flax-again --load-cores 1 2
    python benchmarks/models.py --load-only --checkpoint DIR --loaders diffusers flax flax-cached

Forward: the exact SD-1.5 UNet2DConditionModel config with random weights (the same weights in
all three), 64x64 latents, 77x768 text states. Each round times diffusers, our torch model and
our jitted Flax model (warm: compiled before timing) in turn; medians are reported with ratios
to diffusers, and achieved GFLOP/s against a matmul peak measured in the same run (FLOPs of one
pass counted by torch's FlopCounterMode on diffusers' model; ours runs the same ones). Each pass also
records the process CPU seconds it used: with one thread they track the work done and move far less
than wall time when other jobs share the cores. ``--contenders`` drops some (flax bfloat16 on XLA:CPU
takes minutes a pass). ``--memory``: each torch contender also runs one pass in a fresh
subprocess that builds only its model and reports its peak RSS during the pass above the RSS before it
(``/proc/self/clear_refs`` resets the peak). The op counts behind the speed (casts, copies, the dtype of
every convolution/matmul/attention) come from ``benchmarks/op_census.py``.

Load: a random SD-1.5-size checkpoint is written once with diffusers' ``save_pretrained`` (or an
existing one reused with ``--checkpoint``); each loader then runs in a fresh subprocess (diffusers,
ours torch, ours flax, in turn each round) that reports wall time, CPU time (user + system: steadier
than wall time on a shared machine) and its peak RSS above the RSS it had after imports, next to the
checkpoint size. ``flax-again`` loads twice in one process and reports the second load (the abstract model
is then cached). ``flax-cached`` loads with the weight cache on (``enable_weight_cache``): one untimed child first
fills a fresh cache folder (its time is printed as the fill), then every timed child maps the converted copy.
``--load-cores N ...`` pins each child to its first N cores (``sched_setaffinity``; our Flax
loader reads and converts on one thread per core it may use); every count is run for every loader, in turn.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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
CONTENDERS = ("diffusers", "torch", "flax")


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def matmul_peak_gflops(dtype_name: str = "float32", with_jax: bool = True, n: int = 2048, repeats: int = 5):
    """Best-of-``repeats`` GFLOP/s of an n x n matmul in ``dtype_name``: torch's, and jax's with ``with_jax``."""
    import torch

    a, b = (torch.randn(n, n).to(_torch_dtype(dtype_name)) for _ in range(2))
    flops = 2 * n**3
    peak = {"torch": flops / min(timed(lambda: a @ b) for _ in range(repeats)) / 1e9}
    if with_jax:
        import jax
        import jax.numpy as jnp

        f = jax.jit(jnp.matmul)
        ja, jb = (jnp.asarray(t.float().numpy(), jnp.dtype(dtype_name)) for t in (a, b))
        f(ja, jb).block_until_ready()
        peak["jax"] = flops / min(timed(lambda: f(ja, jb).block_until_ready()) for _ in range(repeats)) / 1e9
    return peak


def build_models(dtype_name: str, contenders: tuple[str, ...] = CONTENDERS):
    """diffusers' model (random, seed 0), our torch model and our flax model holding the same weights.

    Returns ``(ref, ours, flax_model)``; the torch model or the flax one is None when not in ``contenders``
    (diffusers' model is always built: it makes the weights).
    """
    import diffusers
    import torch

    torch.manual_seed(0)
    dtype = _torch_dtype(dtype_name)
    ref = diffusers.UNet2DConditionModel(**SD15_UNET).eval()
    state = ref.state_dict()
    ours = None
    if "torch" in contenders:
        from diffusion_core.torch.models.unet_2d_condition import UNet2DConditionModel as TorchUNet

        with torch.device("meta"):  # as from_pretrained builds: no float32 copy, no random init
            ours = TorchUNet.from_config(SD15_UNET)
        ours.load_state_dict({k: v.to(dtype, copy=True) for k, v in state.items()}, strict=True, assign=True)
        ours = ours.eval()
    flax_model = _build_flax(state, dtype_name) if "flax" in contenders else None
    return ref.to(dtype), ours, flax_model


def _build_flax(state: dict, dtype_name: str):
    import jax.numpy as jnp

    from diffusion_core.flax.models.loading import load_torch_state_dict
    from diffusion_core.flax.models.unet_2d_condition import UNet2DConditionModel as FlaxUNet

    flax_model = FlaxUNet.from_config(SD15_UNET, dtype=jnp.dtype(dtype_name))
    load_torch_state_dict(flax_model, ((k, v.float().numpy()) for k, v in state.items()))
    return flax_model


def forward_fns(ref, ours, flax_model, batch: int, latent: int, dtype_name: str) -> dict[str, Callable[[], float]]:
    """Timed callables (one UNet pass each) for diffusers, ours-torch and ours-flax (compiled before timing).

    A model passed as None gets no entry.
    """
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 4, latent, latent)).astype(np.float32)
    ctx = rng.standard_normal((batch, *TEXT_SHAPE)).astype(np.float32)
    dtype = _torch_dtype(dtype_name)
    xt, ct, tt = torch.from_numpy(x).to(dtype), torch.from_numpy(ctx).to(dtype), torch.tensor([500] * batch)

    def torch_pass(model):
        def run():
            with torch.inference_mode():
                model(xt, tt, ct)

        return lambda: timed(run)

    fns = {name: torch_pass(model) for name, model in (("diffusers", ref), ("torch", ours)) if model is not None}
    if flax_model is not None:
        fns["flax"] = _flax_pass(flax_model, x, ctx, batch, dtype_name)
    return fns


def _flax_pass(flax_model, x, ctx, batch: int, dtype_name: str) -> Callable[[], float]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graph, params = nnx.split(flax_model)

    @jax.jit
    def flax_call(params, x, t, ctx):
        return nnx.merge(graph, params)(x, t, ctx)

    jd = jnp.dtype(dtype_name)
    jx, jc, jt = jnp.asarray(x, jd), jnp.asarray(ctx, jd), jnp.full((batch,), 500, jnp.int32)
    flax_call(params, jx, jt, jc).block_until_ready()  # compile
    return lambda: timed(lambda: flax_call(params, jx, jt, jc).block_until_ready())


def with_cpu_seconds(fns: dict[str, Callable[[], float]]) -> tuple[dict[str, Callable[[], float]], dict]:
    """Wrap timed callables so each call also appends the process CPU seconds it used to a list per name."""
    cpu: dict[str, list[float]] = {name: [] for name in fns}

    def wrap(name: str, fn: Callable[[], float]) -> Callable[[], float]:
        def run() -> float:
            start = time.process_time()
            wall = fn()
            cpu[name].append(time.process_time() - start)
            return wall

        return run

    return {name: wrap(name, fn) for name, fn in fns.items()}, cpu


def count_flops(model, batch: int, latent: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, 4, latent, latent, dtype=model.dtype)
    ctx = torch.zeros(batch, *TEXT_SHAPE, dtype=model.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([500] * batch), ctx)
    return float(counter.get_total_flops())


def bench_forward(args: argparse.Namespace) -> None:
    others = [c for c in args.contenders if c != "diffusers"]
    head = f"{'dtype':9} {'batch':>5} {'GFLOP':>7} {'diffusers':>16}"
    head += "".join(f" {c:>16} {'ratio':>11}" for c in others) + "   (wall s / CPU s; ratio wall / CPU)"
    for dtype_name in args.dtypes:
        peak = matmul_peak_gflops(dtype_name, with_jax="flax" in args.contenders)
        print(f"matmul peak (2048^2 {dtype_name}, GFLOP/s): " + ", ".join(f"{k} {v:.1f}" for k, v in peak.items()))
        print(head)
        ref, ours, flax_model = build_models(dtype_name, tuple(args.contenders))
        for batch in args.batches:
            flops = count_flops(ref, batch, args.latent)
            fns, cpu = with_cpu_seconds(forward_fns(ref, ours, flax_model, batch, args.latent, dtype_name))
            wall = interleaved_medians(fns, args.repeats)
            cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
            cells = [f"{wall[c]:7.2f}/{cpu_med[c]:7.2f}" for c in args.contenders]
            ratios = [f"{wall[c] / wall['diffusers']:5.2f}/{cpu_med[c] / cpu_med['diffusers']:5.2f}" for c in others]
            row = f"{dtype_name:9} {batch:5d} {flops / 1e9:7.0f} {cells[0]:>16}"
            print(row + "".join(f" {c:>16} {r:>11}" for c, r in zip(cells[1:], ratios, strict=True)), flush=True)
            for c in args.contenders:
                rate = flops / wall[c] / 1e9
                of_peak = 100 * rate / peak["jax" if c == "flax" else "torch"]
                print(f"    {c}: {rate:.1f} GFLOP/s ({of_peak:.0f}% of the {dtype_name} matmul peak)")
            if args.memory:
                print_forward_memory(args, dtype_name, batch)
        del ref, ours, flax_model
        gc.collect()


def print_forward_memory(args: argparse.Namespace, dtype_name: str, batch: int) -> None:
    """Peak RSS of one pass above the RSS before it, each torch contender in a fresh subprocess, in turn."""
    for impl in [c for c in args.contenders if c != "flax"]:
        cmd = [sys.executable, __file__, "--forward-child", impl, dtype_name, str(batch), str(args.latent)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print(f"    {impl}: peak RSS of a pass {json.loads(out.strip().splitlines()[-1])['peak_mib']:.0f} MiB")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def forward_child(impl: str, dtype_name: str, batch: int, latent: int) -> None:
    """Run in a subprocess: build one model (random weights), then report the peak RSS of one pass above before.

    Both contenders are built the same way, directly in ``dtype_name``; the RSS before the pass still holds
    whatever the build left free in the heap, which the pass may reuse, so read the figures side by side.
    """
    import torch

    dtype = _torch_dtype(dtype_name)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # parameters made in the pass's dtype: no freed float32 copy for the pass to reuse
    if impl == "diffusers":
        import diffusers

        model = diffusers.UNet2DConditionModel(**SD15_UNET).eval()
    else:
        from diffusion_core.torch.models.unet_2d_condition import UNet2DConditionModel

        model = UNet2DConditionModel.from_config(SD15_UNET).eval()
    torch.set_default_dtype(torch.float32)
    x = torch.randn(batch, 4, latent, latent, dtype=dtype)
    ctx = torch.randn(batch, *TEXT_SHAPE, dtype=dtype)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = _status_kib("VmRSS")
    with torch.inference_mode():
        model(x, torch.tensor([500] * batch), ctx)
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - base) / 1024}))


def load_child(impl: str, folder: str, cores: int) -> None:
    """Run in a subprocess: import, note RSS, load the checkpoint, print wall/CPU time and peak RSS above that."""
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

        from diffusion_core.flax import enable_weight_cache
        from diffusion_core.flax.models.unet_2d_condition import UNet2DConditionModel

        enable_weight_cache(os.environ["DIFFUSION_CORE_FLAX_WEIGHT_CACHE"] if impl == "flax-cached" else None)
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
        env = dict(os.environ, DIFFUSION_CORE_FLAX_WEIGHT_CACHE=str(Path(tmp) / "flax-weight-cache"))
        if "flax-cached" in args.loaders:  # fill the cache once, untimed in the rounds
            cmd = [sys.executable, __file__, "--load-child", "flax-cached", folder, "0"]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            fill = json.loads(out.strip().splitlines()[-1])
            print(f"weight cache filled by one load that also writes it: {fill['seconds']:.2f}s wall")
        runs: dict[tuple[str, int], list[dict]] = {(i, c): [] for c in args.load_cores for i in args.loaders}
        for _ in range(args.load_repeats):
            for impl, cores in runs:
                cmd = [sys.executable, __file__, "--load-child", impl, folder, str(cores)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
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
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--memory", action="store_true", help="peak RSS of one pass per torch contender")
    parser.add_argument("--tmp", default=None, help="folder for the temporary checkpoint")
    parser.add_argument("--checkpoint", default=None, help="reuse this SD-1.5 UNet folder (written there if absent)")
    parser.add_argument(
        "--loaders",
        nargs="+",
        default=["diffusers", "torch", "flax"],
        choices=["diffusers", "torch", "flax", "flax-again", "flax-cached"],
    )
    parser.add_argument("--load-cores", nargs="+", type=int, default=[0], help="pin loaders to N cores (0: all)")
    parser.add_argument("--load-child", nargs=3, metavar=("IMPL", "FOLDER", "CORES"), help=argparse.SUPPRESS)
    parser.add_argument("--forward-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_child:
        impl, folder, cores = args.load_child
        load_child(impl, folder, int(cores))
        return
    if args.forward_child:
        impl, dtype_name, batch, latent = args.forward_child
        forward_child(impl, dtype_name, int(batch), int(latent))
        return
    if "diffusers" not in args.contenders:
        parser.error("--contenders: diffusers is the reference every ratio is taken against; keep it")
    args.contenders = ["diffusers", *[c for c in CONTENDERS[1:] if c in args.contenders]]
    print(machine_line())
    if not args.load_only:
        bench_forward(args)
    if not args.forward_only:
        bench_load(args)


if __name__ == "__main__":
    main()
