"""``DiffusionPipeline`` for Flax NNX: component classes, pipeline registry, compiled-program cache and scale-out.

A pipeline's denoising program is traced once per (shapes, static options): programs are cached by
mode, mesh, network graph, scheduler config and step options, and jax caches each per input shapes.
``parallel="pmap"`` splits the batch over ``jax.local_devices()``; ``mesh=`` shards it with
``NamedSharding`` under ``jax.jit``. Per-image keys make the images independent of either.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_core.configuration import config_to_json_string
from diffusion_core.flax.sampling import ScanProgress
from diffusion_core.pipelines import ComponentClass, PipelineBase
from diffusion_core.pipelines.components import backend_component_table, backend_pipeline_registry

# model_index.json class name -> where the Flax class lives (imported only when a pipeline needs it).
FLAX_COMPONENTS: dict[str, ComponentClass] = backend_component_table("diffusion_core.flax.models")

# model_index.json "_class_name" -> pipeline class (DDPM/DDIM here, Stable Diffusion in .stable_diffusion).
FLAX_PIPELINES: dict[str, str] = backend_pipeline_registry("diffusion_core.flax.pipelines")

# Program signature: (params, scheduler_state, batch (B, ...), keys (B,)) -> batch output.
Program = Callable[[Any, Any, jax.Array, jax.Array], jax.Array]


def scale_out_mode(parallel: str | None, mesh: Mesh | None) -> str:
    """``"single"``, ``"pmap"`` or ``"mesh"`` from the call's ``parallel=``/``mesh=`` arguments."""
    if parallel not in (None, "pmap"):
        raise ValueError(f"parallel must be None or 'pmap', got {parallel!r}")
    if mesh is not None and not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    if parallel is not None and mesh is not None:
        raise ValueError("parallel/mesh: pass one of parallel='pmap' or mesh=, not both")
    return "pmap" if parallel == "pmap" else ("mesh" if mesh is not None else "single")


def _check_divisible(batch: int, parts: int, what: str) -> None:
    if batch % parts:
        raise ValueError(f"batch_size: {batch} images cannot be split evenly over {parts} {what}")


def run_program(
    fn: Callable, mode: str, mesh: Mesh | None, params: Any, make_state: Callable[[Any], Any], x, keys
) -> jax.Array:
    """Run a compiled program over batch ``x`` (B, ...) with per-image ``keys`` (B,) in ``mode``.

    ``make_state(like)`` builds the scheduler state for a per-program batch shaped as ``like``.
    """
    batch = x.shape[0]
    if mode == "pmap":
        n = jax.local_device_count()
        _check_divisible(batch, n, "local devices")
        xs = x.reshape((n, batch // n) + x.shape[1:])  # (devices, B/devices, ...)
        out = fn(params, make_state(xs[0]), xs, keys.reshape((n, batch // n)))
        return out.reshape((batch,) + out.shape[2:])
    if mode == "mesh":
        _check_divisible(batch, mesh.size, "mesh devices")
        rows = NamedSharding(mesh, PartitionSpec(mesh.axis_names))  # batch split over every mesh axis
        whole = NamedSharding(mesh, PartitionSpec())
        x, keys = jax.device_put(x, rows), jax.device_put(keys, rows)
        params = jax.device_put(params, whole)
        return fn(params, jax.device_put(make_state(x), whole), x, keys)
    return fn(params, make_state(x), x, keys)


class DiffusionPipeline(PipelineBase):
    """Base of the Flax pipelines; ``DiffusionPipeline.from_pretrained`` picks the class from the folder."""

    _component_table = FLAX_COMPONENTS
    _pipeline_registry = FLAX_PIPELINES

    def __init__(self, **components: Any) -> None:
        super().__init__(**components)
        self.trace_count = 0  # times a denoising program was traced (diagnostics: should not grow per call)
        self._programs: dict[Hashable, tuple[Any, Callable]] = {}
        self._progress = ScanProgress()

    def _scheduler_key(self) -> tuple[str, str]:
        return type(self.scheduler).__name__, config_to_json_string(self.scheduler.config)

    def compiled(self, mode: str, mesh: Mesh | None, static: Hashable, build: Callable[[], Program]) -> Callable:
        """The cached compiled program for ``(mode, mesh, network, static)``; ``build()`` makes it on a miss.

        The network is keyed by identity (NNX graph definitions hold configs and are not hashable);
        the entry keeps the network alive so the identity cannot be reused.
        """
        key = (mode, mesh, id(self.unet), static)
        entry = self._programs.get(key)
        if entry is None or entry[0] is not self.unet:
            program = build()
            fn = jax.pmap(program, in_axes=(None, None, 0, 0)) if mode == "pmap" else jax.jit(program)
            entry = self._programs[key] = (self.unet, fn)
        return entry[1]

    def progress_for_trace(self) -> ScanProgress | None:
        """The progress object a traced loop should tick (None when the bar is disabled)."""
        return None if self.progress_bar_disabled else self._progress
