"""Training step time of the digits UNet: flax (jitted optax step) vs torch vs a plain diffusers + PyTorch loop.

    python benchmarks/training.py [--batch 32] [--rounds 5] [--steps-per-round 3] [--no-memory]

All three train the shipped digits config (class-conditional ``UNet2DModel``, 16x16) on the same batches
(``training.step_batch`` of the digits data: images, noise, timesteps, labels) with AdamW, global-norm
clipping at 1.0 and an EMA copy. The diffusers loop is its example script's recipe (train_unconditional.py:
``add_noise``, ``F.mse_loss`` on the noise, ``clip_grad_norm_``, ``EMAModel.step``) around diffusers' own
``UNet2DModel``. After a warm-up (flax: its compile, reported), rounds run ``--steps-per-round`` steps of each
in turn; the medians of the per-step times are compared against the diffusers loop measured in the same run,
both wall-clock and process CPU time (``time.process_time``: user + system time of all the process's threads).
On a shared machine the CPU time is the figure that survives load: wall time also counts the time a step
waits for a core. Peak memory (max RSS) is measured per path in its own child process (one process's RSS
covers all three).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import THREADS, interleaved_medians, machine_line, peak_rss_mib, pin_threads  # noqa: E402

pin_threads()

PATHS = ("diffusers", "torch", "flax")


def _digits_batches(batch: int, count: int) -> list:
    from diffusion_core import training

    data = training.load_digits(16)
    return [training.step_batch(data, s, batch, 0, 1000) for s in range(count)]


def diffusers_step(batch_size: int) -> Callable:
    """One step of diffusers' example training recipe (train_unconditional.py) on a ``StepBatch``."""
    import diffusers
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import EMAModel

    from diffusion_core.training.presets import DIGITS_UNET_CONFIG

    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**DIGITS_UNET_CONFIG).train()
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ema = EMAModel(model.parameters(), use_ema_warmup=True, inv_gamma=1.0, power=0.75, decay=0.9999)

    def step(batch) -> float:
        x0, noise = torch.from_numpy(batch.images), torch.from_numpy(batch.noise)
        t, y = torch.from_numpy(batch.timesteps), torch.from_numpy(batch.labels)
        noisy = sched.add_noise(x0, noise, t)
        loss = F.mse_loss(model(noisy, t, class_labels=y).sample.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        return float(loss.detach())

    return step


def library_step(backend: str, batch_size: int) -> Callable:
    """One ``Trainer.train_step`` of this library's ``backend`` (AdamW, clipping 1.0, EMA as diffusers')."""
    from diffusion_core import training
    from diffusion_core.cli_train import build_trainer
    from diffusion_core.training.presets import DIGITS_UNET_CONFIG

    trainer = build_trainer(backend, DIGITS_UNET_CONFIG, training.TrainConfig(batch_size=batch_size, seed=0))
    return lambda batch: trainer.train_step(batch, 1e-3, 0.99)


def make_step(path: str, batch_size: int) -> Callable:
    if path == "torch":
        import torch

        torch.set_num_threads(THREADS)
    return diffusers_step(batch_size) if path == "diffusers" else library_step(path, batch_size)


def peak_rss_of_this_process_mib() -> float:
    """VmHWM: this process's peak RSS since its exec (``ru_maxrss`` keeps the forking parent's peak across exec)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return peak_rss_mib()


def child(path: str, batch_size: int, steps: int) -> None:
    """Runs alone in a process: warm-up plus ``steps`` steps of ``path``; prints its peak RSS as JSON."""
    step, batches = make_step(path, batch_size), _digits_batches(batch_size, steps + 1)
    for b in batches:
        step(b)
    print(json.dumps({"path": path, "peak_rss_mib": round(peak_rss_of_this_process_mib(), 1)}))


def peak_memory(batch_size: int, steps: int) -> dict[str, float]:
    out = {}
    for path in PATHS:
        cmd = [sys.executable, __file__, "--child", path, "--batch", str(batch_size), "--steps-per-round", str(steps)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        out[path] = json.loads(line)["peak_rss_mib"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.batch, args.steps_per_round)
    batches = _digits_batches(args.batch, args.steps_per_round)
    steps, warm = {}, {}
    for path in PATHS:
        steps[path] = make_step(path, args.batch)
        start = time.perf_counter()
        steps[path](batches[0])  # flax: traces and compiles here
        warm[path] = time.perf_counter() - start

    cpu: dict[str, list[float]] = {p: [] for p in PATHS}

    def timed_round(path: str) -> Callable[[], float]:
        def run() -> float:
            start, start_cpu = time.perf_counter(), time.process_time()
            for b in batches:
                steps[path](b)
            cpu[path].append((time.process_time() - start_cpu) / len(batches))
            return (time.perf_counter() - start) / len(batches)

        return run

    medians = interleaved_medians({p: timed_round(p) for p in PATHS}, args.rounds)
    cpu_medians = {p: statistics.median(v) for p, v in cpu.items()}
    print(f"# {time.strftime('%Y-%m-%d')} · {machine_line()} · batch {args.batch}, {args.rounds} rounds")
    cols = "first step (s) | s/step (median) | steps/s | vs diffusers loop | CPU s/step (median) | CPU vs diffusers"
    print(f"| path | {cols} |")
    print("|---|---|---|---|---|---|---|")
    for path in PATHS:
        s, c = medians[path], cpu_medians[path]
        ratios = f"{s / medians['diffusers']:.2f}x | {c:.3f} | {c / cpu_medians['diffusers']:.2f}x"
        print(f"| {path} | {warm[path]:.2f} | {s:.3f} | {1 / s:.2f} | {ratios} |")
    if not args.no_memory:
        mem = peak_memory(args.batch, args.steps_per_round)
        print("peak RSS (MiB, each path alone): " + ", ".join(f"{p} {m:.0f}" for p, m in mem.items()))


if __name__ == "__main__":
    main()
