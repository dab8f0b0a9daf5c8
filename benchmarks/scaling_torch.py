"""PyTorch scale-out: images/s of text-to-image split over 1, 2, ... ``torchrun`` processes (``enable_distributed``).

    python benchmarks/scaling_torch.py [--processes 1 2] [--images 8] [--steps 10] [--size 64] [--rounds 3]

One random-weight pipeline folder ("tiny" of benchmarks/pipelines.py) is written once. Each round launches
``torchrun --nproc_per_node N`` once per process count, interleaved (1, 2, 1, 2, ...), so a change in the machine's
load hits every count alike; each launch makes one warm-up call and one timed call of the same ``--images`` images
(gloo on CPU, one thread per process), timed on rank 0 between two barriers. Reported: the median over rounds of the
timed call, images/s, and the ratio to one process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import machine_line, pin_threads  # noqa: E402

PROMPT = "A painting of a squirrel eating a burger"


def child(args: argparse.Namespace) -> None:
    """One torchrun process: the same call on every rank; rank 0 prints the timed call as one JSON line."""
    import torch

    from diffusion_core.torch import DiffusionPipeline, distributed

    distributed.initialize("gloo")
    pipe = DiffusionPipeline.from_pretrained(args.child).enable_distributed()
    pipe.set_progress_bar_config(disable=True)

    def call() -> None:
        generator = [torch.Generator().manual_seed(i) for i in range(args.images)]
        pipe([PROMPT] * args.images, height=args.size, width=args.size, num_inference_steps=args.steps,
             generator=generator, output_type="np")  # fmt: skip

    call()  # warm-up
    distributed.barrier()
    start = time.perf_counter()
    call()
    distributed.barrier()
    seconds = time.perf_counter() - start
    if distributed.is_main_process():
        print(json.dumps({"processes": distributed.world_size(), "seconds": seconds}), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, folder: Path, args: argparse.Namespace) -> float:
    """Seconds of the timed call on ``n`` torchrun processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(_free_port()), __file__, "--child", str(folder), "--images", str(args.images)]
    cmd += ["--steps", str(args.steps), "--size", str(args.size)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{n} processes failed:\n{done.stderr[-3000:]}")
    (line,) = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    return float(line["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    pin_threads()
    if args.child:
        return child(args)
    from benchmarks.pipelines import write_pipeline

    print(machine_line())
    print(f"{args.images} images, {args.size}x{args.size}, {args.steps} steps, median of {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        write_pipeline("tiny", Path(tmp))
        times: dict[int, list[float]] = {n: [] for n in args.processes}
        for _ in range(args.rounds):
            for n in args.processes:
                times[n].append(launch(n, Path(tmp) / "tiny", args))
    base = statistics.median(times[args.processes[0]])
    print(f"{'processes':>9} {'seconds':>8} {'images/s':>8} {'vs ' + str(args.processes[0]):>6}")
    for n, values in times.items():
        median = statistics.median(values)
        print(f"{n:>9} {median:>8.3f} {args.images / median:>8.2f} {base / median:>5.2f}x")


if __name__ == "__main__":
    main()
