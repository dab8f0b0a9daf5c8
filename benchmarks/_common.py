"""Benchmark plumbing: fixed thread counts, interleaved repeats, medians, peak memory."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

THREADS = int(os.environ.get("BENCH_THREADS", "1"))


def pin_threads() -> None:
    """Fix thread counts before torch/jax start (shared machines: see DEVELOPERS.md)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    os.environ.setdefault("MKL_NUM_THREADS", str(THREADS))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Eigen's pool runs XLA:CPU dots and convolutions; without it a jitted 2048^2 matmul or SD UNet forward
    # uses one core (measured: process CPU time / wall time = 1.00). ``intra_op_parallelism_threads`` is a
    # TF session option, not an XLA flag: XLA skipped it as a stray word, so it is not passed any more.
    if THREADS == 1:
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")


def interleaved_medians(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Run each timed function once per round, in turn, ``repeats`` rounds; median seconds per name."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(fn())
    return {k: statistics.median(v) for k, v in samples.items()}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_line() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {THREADS} thread(s), python {platform.python_version()}"
