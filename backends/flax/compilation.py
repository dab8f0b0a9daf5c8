"""Compilation bookkeeping for the Flax backend: how long a call spent compiling, and the opt-in persistent cache.

:class:`compile_timer` sums JAX's own compile-duration events (tracing, lowering, XLA compilation) recorded while it
is open; the pipelines report it as ``pipe.last_compile_seconds``. :func:`enable_compilation_cache` points JAX's
persistent compilation cache at a folder, so a second process loads compiled programs instead of compiling them.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import jax

# JAX's monitoring events whose durations make up one compilation (jax._src.dispatch names them).
COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    }
)

_open_timers = threading.local()  # the timers open on this thread (a stack: nested timers all count)


class CompileTimer:
    """Seconds spent compiling while the timer was open (``seconds``)."""

    def __init__(self) -> None:
        self.seconds = 0.0


def _on_duration(event: str, duration: float, **_: object) -> None:
    if event in COMPILE_EVENTS:
        for timer in getattr(_open_timers, "stack", ()):
            timer.seconds += duration


jax.monitoring.register_event_duration_secs_listener(_on_duration)


@contextlib.contextmanager
def compile_timer() -> Iterator[CompileTimer]:
    """``with compile_timer() as t: ...`` -> ``t.seconds`` compiled on this thread inside the block."""
    timer = CompileTimer()
    stack = _open_timers.__dict__.setdefault("stack", [])
    stack.append(timer)
    try:
        yield timer
    finally:
        stack.remove(timer)


def enable_compilation_cache(cache_dir: str | os.PathLike, min_compile_time_secs: float = 1.0) -> None:
    """Keep compiled programs in ``cache_dir`` (JAX's persistent compilation cache) and reuse them across processes.

    Programs that took at least ``min_compile_time_secs`` to compile are written (0 writes every program). Call it
    before the first pipeline call; the folder (``~`` expanded) is created if missing.
    """
    if not isinstance(cache_dir, (str, os.PathLike)) or not str(cache_dir):
        raise ValueError(f"cache_dir must be a folder path, got {cache_dir!r}")
    if not isinstance(min_compile_time_secs, (int, float)) or min_compile_time_secs < 0:
        raise ValueError(f"min_compile_time_secs must be a number >= 0, got {min_compile_time_secs!r}")
    cache_dir = os.path.expanduser(os.fspath(cache_dir))
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
