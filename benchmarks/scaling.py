"""Flax scale-out: images/s and compile time of text-to-image on 1, 2, 4, 8 devices, pmap vs mesh, float32 vs bf16.

    python benchmarks/scaling.py [--devices 1 2 4 8] [--images 8] [--steps 10] [--size 64] [--repeats 3]

One random-weight pipeline folder ("tiny" of benchmarks/pipelines.py) is written once; each device count runs in its
own process (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` here; the real devices when JAX sees more than
one). Per (devices, path, dtype): the compile seconds the pipeline reports (``last_compile_seconds``) on the first
call, then the median of ``--repeats`` warm calls as images/s. Forced CPU devices share the machine's cores, so on a
small CPU the numbers show the overhead of each path, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine_line, pin_threads  # noqa: E402

PROMPT = "A painting of a squirrel eating a burger"


def child(args: argparse.Namespace) -> None:
    """Runs in a process with ``args.child_devices`` devices: one JSON line per (path, dtype)."""
    import jax
    import jax.numpy as jnp

    from diffusion_core.flax import DiffusionPipeline

    n = jax.device_count()
    for dtype_name in args.dtypes:
        pipe = DiffusionPipeline.from_pretrained(args.child, dtype=getattr(jnp, dtype_name))
        pipe.set_progress_bar_config(disable=True)
        paths = {"single": {}} if n == 1 else {}
        paths.update(pmap={"parallel": "pmap"}, mesh={"mesh": jax.make_mesh((n,), ("data",))})
        for path, scale in paths.items():
            call = dict(
                prompt=[PROMPT] * args.images, height=args.size, width=args.size, num_inference_steps=args.steps,
                key=jax.random.key(0), output_type="np", **scale,
            )  # fmt: skip
            start = time.perf_counter()
            pipe(**call)
            first, compile_s = time.perf_counter() - start, pipe.last_compile_seconds
            warm = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                pipe(**call)
                warm.append(time.perf_counter() - start)
            line = dict(devices=n, path=path, dtype=dtype_name, compile_s=compile_s, first_s=first)
            line.update(warm_s=statistics.median(warm), images_per_s=args.images / statistics.median(warm))
            print(json.dumps(line), flush=True)


def run_devices(n: int, folder: Path, args: argparse.Namespace) -> list[dict]:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count", "--ignored")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    cmd = [sys.executable, __file__, "--child", str(folder), "--images", str(args.images), "--steps", str(args.steps)]
    cmd += ["--size", str(args.size), "--repeats", str(args.repeats), "--dtypes", *args.dtypes]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{n} devices failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    pin_threads()
    if args.child:
        return child(args)
    from benchmarks.pipelines import write_pipeline

    print(machine_line())
    print(f"{args.images} images, {args.size}x{args.size}, {args.steps} steps, median of {args.repeats} warm calls")
    print(f"{'devices':>7} {'path':>6} {'dtype':>8} {'compile s':>9} {'first s':>8} {'warm s':>7} {'images/s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        write_pipeline("tiny", Path(tmp))
        for n in args.devices:
            for r in run_devices(n, Path(tmp) / "tiny", args):
                print(
                    f"{r['devices']:>7} {r['path']:>6} {r['dtype']:>8} {r['compile_s']:>9.2f} {r['first_s']:>8.2f} "
                    f"{r['warm_s']:>7.3f} {r['images_per_s']:>8.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
